"""Training: train state, optimizer, sharded steps, checkpoints, validation and logging.

`train.py` at the top of the repository composes these; evaluation code loads models through
`bsmamba2_jax.loading.load_model`, which reads checkpoints with `checkpoint.load_params`.
"""
