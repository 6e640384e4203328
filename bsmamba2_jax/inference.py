"""Whole-track separation by segments (docs/DESIGN.md#evaluation).

The paper's protocol: non-overlapping 8 s segments, concatenated, the last one zero-padded
(`overlap=0`). With `overlap > 0` segments overlap by that fraction and are blended by
overlap-add with a fade window, divided by the summed window, so the blend is exact: an
identity model returns its input for any overlap.

The segmentation and the overlap-add are small pure numpy functions (`plan_segments`,
`split_segments`, `overlap_add`, `separate_with`) so they can be tested with any callable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SegmentPlan(NamedTuple):
    """How a track of `length` samples is cut: segment starts are i * hop, i < count."""

    length: int  # samples of the track
    segment: int  # samples per segment
    hop: int  # samples between segment starts
    count: int  # number of segments

    @property
    def padded_length(self) -> int:
        return (self.count - 1) * self.hop + self.segment


def plan_segments(length: int, segment: int, overlap: float = 0.0) -> SegmentPlan:
    """Segments of `segment` samples, overlapping by the fraction `overlap`, covering `length`.

    A track no longer than one segment is one segment of the track's own length (no padding, so
    the result equals the unsegmented model's).
    """
    if length < 1 or segment < 1:
        raise ValueError(f"length={length} and segment={segment} must be positive")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap} must be a fraction in [0, 1)")
    if length <= segment:
        return SegmentPlan(length, length, length, 1)
    hop = max(1, segment - int(round(overlap * segment)))
    count = 1 + -(-(length - segment) // hop)
    return SegmentPlan(length, segment, hop, count)


def fade_window(segment: int, hop: int) -> np.ndarray:
    """(segment,) float32: 1 in the middle, linear fades over the overlap (segment - hop) at
    both ends. Strictly positive, so the summed window never vanishes; all ones when hop ==
    segment (plain concatenation)."""
    fade = segment - hop
    w = np.ones(segment, np.float64)
    if fade > 0:
        ramp = np.arange(1, fade + 1) / (fade + 1)  # never 0 nor 1
        w[:fade] = ramp
        w[segment - fade:] = ramp[::-1]
    return w.astype(np.float32)


def split_segments(audio: np.ndarray, plan: SegmentPlan) -> np.ndarray:
    """audio (b, c, length) -> segments (b, count, c, segment), the tail zero-padded."""
    b, c, n = audio.shape
    padded = np.zeros((b, c, plan.padded_length), np.float32)
    padded[..., :n] = audio
    starts = np.arange(plan.count) * plan.hop
    idx = starts[:, None] + np.arange(plan.segment)[None, :]  # (count, segment)
    return np.transpose(padded[:, :, idx], (0, 2, 1, 3))


def overlap_add(segments: np.ndarray, plan: SegmentPlan,
                window: np.ndarray | None = None) -> np.ndarray:
    """segments (b, count, c, segment) -> (b, c, length): sum of window * segment / summed window.

    `window` defaults to `fade_window(segment, hop)`.
    """
    b, count, c, seg = segments.shape
    window = fade_window(seg, plan.hop) if window is None else window
    out = np.zeros((b, c, plan.padded_length), np.float64)
    total = np.zeros(plan.padded_length, np.float64)
    for i in range(count):
        s = i * plan.hop
        out[:, :, s:s + seg] += segments[:, i] * window
        total[s:s + seg] += window
    return (out / total)[..., :plan.length].astype(np.float32)


def separate_with(fn: Callable[[np.ndarray], Any], audio: np.ndarray, plan: SegmentPlan,
                  batch_size: int) -> np.ndarray:
    """Runs `fn` (n, c, segment) -> (n, c, segment) over all segments, batch_size at a time.

    Every call gets exactly batch_size segments (the last batch is zero-filled), so a jitted fn
    compiles once per segment shape. audio (b, c, length) -> (b, c, length) float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    segs = split_segments(audio, plan)  # (b, count, c, seg)
    b, count, c, seg = segs.shape
    flat = segs.reshape(b * count, c, seg)
    batch_size = min(batch_size, flat.shape[0])  # no all-padding batch for short tracks
    outs = []
    for s in range(0, flat.shape[0], batch_size):
        chunk = flat[s:s + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - real, c, seg), np.float32)])
        outs.append(np.asarray(fn(chunk), np.float32)[:real])
    out = np.concatenate(outs).reshape(b, count, c, seg)
    return overlap_add(out, plan)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: Any, params: Any, audio: jax.Array) -> jax.Array:
    return model.apply(params, audio)


def separate(model: Any, params: Any, audio: Any, segment_seconds: float = 8.0,
             overlap: float = 0.0, batch_size: int = 4, sample_rate: int = 44100) -> np.ndarray:
    """Vocals of whole tracks.

    Args:
      model: a `BSMamba2` (any Flax module mapping (n, 2, samples) -> (n, 2, samples)).
      params: its variables, as given to `model.apply`.
      audio: (2, samples) or (batch, 2, samples) float, numpy or jax.
      segment_seconds: segment length; tracks shorter than that are processed whole.
      overlap: fraction of a segment shared with the next, in [0, 1); 0 = the paper's
        concatenated segments (last one zero-padded), > 0 = overlap-add with a fade window.
      batch_size: segments per model call.
      sample_rate: Hz, to turn segment_seconds into samples.
    Returns:
      vocals as a float32 numpy array of the input's shape.
    """
    shape = getattr(audio, "shape", None)
    if shape is None or len(shape) not in (2, 3) or shape[-2] != 2:
        raise ValueError(f"audio must have shape (2, samples) or (batch, 2, samples) (stereo), "
                         f"got {shape}")
    if not jnp.issubdtype(audio.dtype, jnp.floating):
        raise ValueError(f"audio must be floating point, got dtype {audio.dtype}")
    x = np.asarray(audio, np.float32)
    x3 = x[None] if x.ndim == 2 else x
    plan = plan_segments(x3.shape[-1], int(round(segment_seconds * sample_rate)), overlap)
    out = separate_with(lambda seg: _apply(model, params, seg), x3, plan, batch_size)
    return out[0] if x.ndim == 2 else out
