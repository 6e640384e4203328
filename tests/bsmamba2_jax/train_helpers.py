"""Shared pieces of the training tests: the tiny model, its optimizer and fresh random batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bsmamba2_jax.losses import separation_loss
from bsmamba2_jax.model import BSMamba2
from bsmamba2_jax.train.optim import make_optimizer
from bsmamba2_jax.train.state import init_train_state
from bsmamba2_jax.train.step import make_train_step
from configs.bsmamba2 import get_config

SEGMENT = 11025  # 0.25 s at 44.1 kHz: a few STFT frames, fast on CPU



def tiny_config(**optim) -> ml_collections.ConfigDict:
    config = get_config("tiny")
    config.optim.update(optim)
    return config


def random_batch(seed: int, batch: int, samples: int = SEGMENT) -> dict[str, np.ndarray]:
    """Vocals-like and accompaniment-like noise (never zero); mixture = their sum."""
    rng = np.random.default_rng(seed)
    vocals = 0.3 * rng.standard_normal((batch, 2, samples)).astype(np.float32)
    other = 0.3 * rng.standard_normal((batch, 2, samples)).astype(np.float32)
    return {"mixture": vocals + other, "vocals": vocals}


def build(config: ml_collections.ConfigDict):
    """(model, tx, init_fn(rng) -> TrainState, train_step) for `config`."""
    model = BSMamba2(**config.model)
    tx = make_optimizer(config)
    init_fn = functools.partial(init_train_state, model, tx,
                                example_audio=jnp.zeros((1, 2, SEGMENT), jnp.float32))
    step = make_train_step(model, tx, separation_loss, config.ema_decay)
    return model, tx, init_fn, step


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
