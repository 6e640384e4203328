"""Training: train state, optimizer, sharded steps, checkpoints, validation and logging.

`train.py` at the top of the repository composes these; evaluation code needs only
`checkpoint.load_ema_params(path) -> (ema_params, config)`.
"""
