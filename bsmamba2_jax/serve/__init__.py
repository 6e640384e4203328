"""`bsmamba2-serve`: vocal separation from a web page and over HTTP (the `[serve]` extra).

    jobs.py  the job queue: one file per job in its own folder, run one at a time through the
             CLI's input checks and streaming separator (`bsmamba2_jax.separate_cli`)
    app.py   the Starlette app: the page, its static files (static/, shipped in the package),
             the HTTP API
    cli.py   the command: binds, loads the model once, runs the app under uvicorn

Only `app.py` and `cli.py` import the web libraries.
"""
