"""The web side of `bsmamba2-serve`: the page, its static files and the HTTP API (Starlette).

    GET    /                        the page (static/index.html; its script uses the API below)
    GET    /api/info                the model, the formats, the upload limit, the time-to-live
    POST   /api/jobs?name=N&format=F  the audio file as the raw request body -> 201, the job
    GET    /api/jobs/ID             the job: state, place in the queue, progress, error
    GET    /api/jobs/ID/STEM        vocals or accompaniment, once done (?download=1: attachment)
    DELETE /api/jobs/ID             removes the job (stops it if it runs) and its files

Errors are JSON {"error": "..."} in words: 400 bad format, 403 a cross-site request, 404 no such
job or stem, 409 not done yet, 413 past the upload limit, 415 a multipart form, 422 not audio.
No client string reaches the file system: the static files are three fixed names read at start,
a job is looked up by its id in the queue's table, a stem by name among `STEMS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from bsmamba2_jax.separate_cli import FORMATS, STEMS, SeparationError
from bsmamba2_jax.serve.jobs import Job, JobQueue, display_name

# The page's files: name -> media type. Read once from the package; nothing from the internet.
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# The page may load and talk to this server only (no CDN, no inline script).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "media-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
MEDIA = {"WAV": "audio/wav", "FLAC": "audio/flac"}
FORMAT_LABELS = {"wav": "WAV, 32-bit float", "flac": "FLAC, 24-bit", "wav16": "WAV, 16-bit",
                 "wav24": "WAV, 24-bit"}
MAX_ID_ECHO = 64  # characters of an unknown job id repeated in its error


class _TooLarge(Exception):
    pass


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def _static_files() -> dict[str, bytes]:
    folder = resources.files("bsmamba2_jax.serve") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC}


def _cross_site(request: Request) -> bool:
    """True for a browser request sent by another site's page (its Origin is not this host):
    such a page may not submit or delete jobs. Tools such as curl send no Origin."""
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host")


def build_app(jobs: JobQueue, *, description: str, max_upload: int, default_format: str = "wav",
              allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app serving `jobs`.

    description: what model is loaded, shown on the page. max_upload: bytes of one upload.
    allowed_hosts: Host header names accepted (None: any); a server on 127.0.0.1 accepts only
      its loopback names, so another site cannot reach it by DNS rebinding.
    When the server stops, `jobs.close()` removes every job and its files.
    """
    if default_format not in FORMATS:
        raise ValueError(f"--format={default_format!r} is not one of {sorted(FORMATS)}")
    static = _static_files()

    def view(job: Job) -> dict[str, Any]:
        v = jobs.view(job)
        v["stems"] = {} if v["state"] != "done" else {
            stem: {"url": f"/api/jobs/{job.id}/{stem}", "filename": job.download_name(stem)}
            for stem in STEMS}
        return v

    def no_job(job_id: str) -> JSONResponse:
        return _error(404, f"no job {job_id[:MAX_ID_ECHO]!r}: unknown, deleted, or removed "
                           f"{jobs.ttl / 60:g} minutes after it ended")

    async def page(request: Request) -> Response:
        return Response(static["index.html"], media_type=STATIC["index.html"],
                        headers={"content-security-policy": CSP,
                                 "x-content-type-options": "nosniff",
                                 "cache-control": "no-cache"})

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _error(404, f"no file {name[:MAX_ID_ECHO]!r}")
        return Response(static[name], media_type=STATIC[name],
                        headers={"x-content-type-options": "nosniff", "cache-control": "no-cache"})

    async def info(request: Request) -> Response:
        return JSONResponse({
            "model": description,
            "formats": [{"name": f, "label": FORMAT_LABELS.get(f, f)} for f in sorted(FORMATS)],
            "default_format": default_format,
            "stems": list(STEMS),
            "max_upload_bytes": max_upload,
            "ttl_seconds": jobs.ttl,
        })

    async def submit(request: Request) -> Response:
        if _cross_site(request):
            return _error(403, "cross-site request refused: submit from this server's own page "
                               "or without an Origin header (curl)")
        fmt = request.query_params.get("format", default_format)
        if fmt not in FORMATS:
            return _error(400, f"format={fmt[:MAX_ID_ECHO]!r} is not one of {sorted(FORMATS)}")
        name = display_name(request.query_params.get("name"))
        if request.headers.get("content-type", "").startswith("multipart/"):
            return _error(415, "send the audio file itself as the request body, not a form: "
                               "curl --data-binary @song.wav 'http://HOST/api/jobs?name=song.wav'")
        limit = (f"over this server's upload limit of {_size(max_upload)}; a larger file needs "
                 "bsmamba2-serve --max-upload-mb")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload:
            return _error(413, f"{name}: {_size(int(declared))} is {limit}")
        try:
            job = jobs.new_job(name, fmt)
        except RuntimeError as e:
            return _error(503, str(e))
        try:
            size = 0
            with open(job.upload, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload:
                        raise _TooLarge
                    f.write(chunk)
            if size == 0:
                raise SeparationError(f"{job.name}: the upload is empty; send the audio file "
                                      "as the request body")
            await anyio.to_thread.run_sync(jobs.start, job)
        except _TooLarge:
            jobs.discard(job)
            return _error(413, f"{name}: more than {_size(max_upload)} is {limit}")
        except ClientDisconnect:
            jobs.discard(job)
            return _error(400, f"{job.name}: the upload was cut off")
        except SeparationError as e:
            jobs.discard(job)
            return _error(422, str(e))
        except RuntimeError as e:  # shutting down
            jobs.discard(job)
            return _error(503, str(e))
        except BaseException:
            jobs.discard(job)
            raise
        return JSONResponse(view(job), status_code=201,
                            headers={"location": f"/api/jobs/{job.id}"})

    async def job_route(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if request.method == "DELETE":
            if _cross_site(request):
                return _error(403, "cross-site request refused")
            if not jobs.delete(job_id):
                return no_job(job_id)
            return JSONResponse({"deleted": job_id})
        job = jobs.get(job_id)
        return no_job(job_id) if job is None else JSONResponse(view(job))

    async def stem_route(request: Request) -> Response:
        job_id, stem = request.path_params["job_id"], request.path_params["stem"]
        job = jobs.get(job_id)
        if job is None:
            return no_job(job_id)
        if stem not in STEMS:
            return _error(404, f"no stem {stem[:MAX_ID_ECHO]!r}; the stems are "
                               f"{', '.join(STEMS)}")
        if job.state != "done":
            return _error(409, f"{job.name} is {job.state}; its stems are there once it is done")
        path = job.output(stem)
        attachment = request.query_params.get("download") not in (None, "", "0")
        return FileResponse(path, media_type=MEDIA[FORMATS[job.fmt][0]],
                            filename=job.download_name(stem),
                            content_disposition_type="attachment" if attachment else "inline",
                            headers={"x-content-type-options": "nosniff",
                                     "cache-control": "no-store"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        jobs.close()

    routes = [
        Route("/", page),
        Route("/static/{name}", static_file),
        Route("/api/info", info),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_route, methods=["GET", "DELETE"]),
        Route("/api/jobs/{job_id}/{stem}", stem_route),
    ]
    middleware = ([] if allowed_hosts is None else
                  [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)])

    async def not_routed(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path[:100]}")
        return _error(exc.status_code, f"nothing at {request.url.path[:100]}; the API is under "
                                       "/api/jobs (see the README)")

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={404: not_routed, 405: not_routed})
