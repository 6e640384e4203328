"""The `tiny` BSMamba2 with random weights, built without compiling `model.init`.

`jax.eval_shape(model.init)` gives the parameter tree; filling it with small random numbers takes
milliseconds, where a compiled init of even the tiny model takes tens of seconds on a busy CPU.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def tiny_model_and_params(seed: int = 0):
    """(BSMamba2 tiny, params as float32 numpy, run config)."""
    import jax

    from bsmamba2_jax.model import BSMamba2
    from configs.bsmamba2 import get_config

    config = get_config("tiny")
    model = BSMamba2(**config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 2, 4410), np.float32))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    return model, params, config
