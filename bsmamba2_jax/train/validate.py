"""Validation on aligned segments with the EMA weights: uSDR of the model and of the mixture."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from bsmamba2_jax.metrics import usdr
from bsmamba2_jax.train.sharding import batch_sharding


def stack_segments(segments: Sequence[dict], key: str) -> np.ndarray:
    """(n, 2, S) float32 from segments' `key` arrays (2, s_i), zero-padded to the longest S."""
    length = max(s[key].shape[-1] for s in segments)
    out = np.zeros((len(segments), 2, length), np.float32)
    for i, s in enumerate(segments):
        out[i, :, : s[key].shape[-1]] = s[key]
    return out


def validate(eval_step: Callable, params, segments: Sequence[dict], mesh: Mesh,
             batch_size: int) -> dict[str, float]:
    """Mean uSDR over segments of the estimate and of the mixture taken as the estimate.

    eval_step: jitted `(params, mixture (b, 2, S)) -> estimate (b, 2, S)` with a replicated output.
    segments: {"mixture": (2, S), "vocals": (2, S), ...}; every process passes the same list.
    batch_size: rounded up to a multiple of the device count; the last batch is zero-padded.
    """
    if not segments:
        raise ValueError("No validation segments: the validation split is empty")
    n_dev = mesh.size
    batch_size = -(-batch_size // n_dev) * n_dev
    mixtures = stack_segments(segments, "mixture")
    sharding = batch_sharding(mesh)
    model_scores, mixture_scores = [], []
    for start in range(0, len(segments), batch_size):
        chunk = mixtures[start:start + batch_size]
        padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        # Every process holds the whole batch; each device takes its slice of it.
        global_batch = jax.make_array_from_callback(padded.shape, sharding, padded.__getitem__)
        estimates = np.asarray(eval_step(params, global_batch))
        for j, seg in enumerate(segments[start:start + batch_size]):
            length = seg["vocals"].shape[-1]
            model_scores.append(usdr(seg["vocals"], estimates[j, :, :length]))
            mixture_scores.append(usdr(seg["vocals"], seg["mixture"]))
    return {"usdr": float(np.mean(model_scores)),
            "usdr_mixture_baseline": float(np.mean(mixture_scores)),
            "usdr_gain": float(np.mean(model_scores) - np.mean(mixture_scores)),
            "segments": float(len(segments))}
