"""Shared pieces of the training tests: the tiny config, fresh random batches, tree distances."""

from __future__ import annotations

import zlib

import jax
import ml_collections
import numpy as np

from configs.bsmamba2 import get_config

SEGMENT = 11025  # 0.25 s at 44.1 kHz: a few STFT frames, fast on CPU


def tiny_config(**optim) -> ml_collections.ConfigDict:
    config = get_config("tiny")
    config.optim.update(optim)
    return config


def stable_seed(*values) -> int:
    """A seed from `values` that is the same in every process (unlike `hash`, salted per run)."""
    return zlib.crc32(repr(values).encode())


def random_batch(seed: int, batch: int, samples: int = SEGMENT) -> dict[str, np.ndarray]:
    """Vocals-like and accompaniment-like noise (never zero); mixture = their sum."""
    rng = np.random.default_rng(seed)
    vocals = 0.3 * rng.standard_normal((batch, 2, samples)).astype(np.float32)
    other = 0.3 * rng.standard_normal((batch, 2, samples)).astype(np.float32)
    return {"mixture": vocals + other, "vocals": vocals}


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
