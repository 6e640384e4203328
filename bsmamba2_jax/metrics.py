"""Separation metrics: uSDR, museval-exact cSDR, silent-region leakage, vocal-active stretches.

Audio is channel-first everywhere in this module, like the rest of the project:
a signal is `(channels, samples)` and a set of sources is `(sources, channels, samples)`.
(museval uses `(sources, samples, channels)`; transpose with `np.swapaxes(x, -1, -2)`.)

Why cSDR can be exact and fast (docs/DESIGN.md#metrics): museval's BSSEval v4 in images mode
computes, per frame, `SDR = 10 log10(|s_true|^2 / |e_spat + e_interf + e_artif|^2)` with
`e_artif = s_hat - s_true - e_spat - e_interf`; the distortion filters (length 512, fitted on the
whole track) cancel algebraically, so the frame SDR is `10 log10(sum s^2 / sum (s_hat - s)^2)` over
the frame's samples and channels. No projection is needed; the filters matter only for ISR, SIR
and SAR, for which evaluate.py can still run full museval (`--museval`).

The paper's protocol (the authors' `src/utils/utils_test.py`, `compute_SDRs`) scores the vocals
alone: `museval.metrics.bss_eval(vocals, estimate, window=44100, hop=44100)`, then the nanmedian
over frames. `sdr_scores` is that, plus the uSDR, from one pass over the two signals.
`csdr_frames` also takes several sources, scored jointly as `museval.evaluate` does.

museval's NaN rule, reproduced here: a frame is NaN for every source when any reference or any
estimate is "silent" in it, where silent means the per-sample sum over channels is exactly 0 at
every sample of the frame (`museval.metrics._any_source_silent`). Frames are `win` samples with hop
`win`; a trailing partial frame is dropped, except that a signal not longer than one window is one
frame. Unlike museval, a source silent over the whole track gives NaN frames instead of an error.

Precision: sums of squares are taken in the input's dtype over rows of `ROW` samples and in
float64 across rows. For float32 audio a frame energy is off by at most ~2e-7 relative (1e-6 dB)
in a frame of a few rows, and by ~1e-8 in a 1 s stereo frame, whose 689 row errors average out;
float64 audio stays float64 throughout. (museval itself is float64.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from bsmamba2_jax.data.musdb import SAMPLE_RATE

USDR_EPS = 1e-7  # uSDR regulariser, added to numerator and denominator (authors' compute_uSDR)
ROW = 128  # samples per partial sum in the input's dtype; see _sum_squares
BLOCK = 1 << 17  # samples (all channels) per block of the error signal: stays in the L2 cache
PROBE = 64  # leading samples of a frame looked at before a full silence check
SILENCE_DB = -60.0  # a 1 s frame of a reference at or below this mean square (dBFS) is silent


def _as_sources(x: np.ndarray | Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    """(sources, channels, samples) array, or a sequence of (channels, samples) arrays -> list.

    A sequence is not stacked, which saves a copy of every source on long tracks.
    """
    sources = [np.asarray(s) for s in x]
    if not sources:
        raise ValueError(f"{name} is empty; pass (sources, channels, samples) audio")
    for s in sources:
        _check_signal(s, name)
        if s.shape != sources[0].shape:
            raise ValueError(f"{name}: sources differ in shape, {s.shape} vs {sources[0].shape}")
    return sources


def _check_signal(s: np.ndarray, name: str) -> None:
    if s.ndim != 2 or s.size == 0 or not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"{name} must be (channels, samples) float audio per source; got dtype "
                         f"{s.dtype} and shape {s.shape}")
    if s.shape[-1] < s.shape[-2]:
        raise ValueError(f"{name} of shape {s.shape} has fewer samples than channels: this looks "
                         "channel-last (museval order); pass (channels, samples)")


def _check_sources(references, estimates) -> tuple[list[np.ndarray], list[np.ndarray]]:
    refs, ests = _as_sources(references, "references"), _as_sources(estimates, "estimates")
    if len(refs) != len(ests) or refs[0].shape != ests[0].shape:
        raise ValueError(f"references ({len(refs)} x {refs[0].shape}) and estimates "
                         f"({len(ests)} x {ests[0].shape}) must have the same shape (sources, "
                         "channels, samples); trim or pad the estimates")
    return refs, ests


def _sum_squares(x: np.ndarray) -> np.ndarray:
    """Sum of squares over the last axis: (..., n) -> (...) float64.

    NumPy's einsum dot loop reads `x` once at SIMD speed, but accumulates in x's dtype; keeping
    each such sum to ROW samples and adding the rows in float64 keeps the float32 rounding near
    1e-7 relative per row (see the module docstring). A float32 overflow (|x| > 1e19) is redone
    in float64.
    """
    n = x.shape[-1]
    q = n // ROW
    out = np.zeros(x.shape[:-1])
    if q:
        rows = x[..., :q * ROW].reshape(*x.shape[:-1], q, ROW)  # a view: rows never cross frames
        out += np.einsum("...l,...l->...", rows, rows).sum(axis=-1, dtype=np.float64)
    if q * ROW < n:
        tail = x[..., q * ROW:]
        out += np.einsum("...l,...l->...", tail, tail)
    if x.dtype != np.float64 and not np.all(np.isfinite(out)) and np.all(np.isfinite(x)):
        return _sum_squares(x.astype(np.float64))
    return out


def num_frames(samples: int, win: int) -> int:
    """museval's frame count for window = hop = win (`museval.metrics.Framing.nwin`)."""
    return samples // win if win < samples else 1


def frame(x: np.ndarray, win: int) -> np.ndarray:
    """Non-overlapping frames of the last axis: (..., samples) -> (..., nframes, win), a view.

    The trailing partial frame is dropped; a signal of at most `win` samples is one (short) frame.
    """
    n = num_frames(x.shape[-1], win)
    length = min(x.shape[-1], n * win)
    return x[..., :length].reshape(*x.shape[:-1], n, length // n)


def _channel_sum_silent(x: np.ndarray, win: int) -> np.ndarray:
    """museval's silence test per frame: the channel sum is exactly 0 at every sample.

    Args: x (channels, samples). Returns (nframes,) bool.

    A frame with a non-zero channel sum among its first PROBE samples is not silent; only the
    rest (digital silence, or channels in exact anti-phase) are checked on every sample.
    """
    frames = frame(x, win)  # (c, t, w)
    # The channel sum in channel order and in the input's dtype, as museval's np.sum does.
    silent = ~np.any(np.add.reduce(frames[:, :, :PROBE], axis=0), axis=-1)
    for t in np.flatnonzero(silent):
        silent[t] = not np.any(np.add.reduce(frames[:, t], axis=0))
    return silent


class SourceStats(NamedTuple):
    """Energies of one reference/estimate pair, per 1-window frame and over the whole signal."""

    ref_energy: np.ndarray  # (frames,) sum of s^2 over the frame's samples and channels
    err_energy: np.ndarray  # (frames,) sum of (s_hat - s)^2
    silent: np.ndarray  # (frames,) bool: the reference or the estimate is silent (museval)
    ref_total: float  # sum of s^2 over every sample, the trailing partial frame included
    err_total: float  # sum of (s_hat - s)^2 over every sample


def source_stats(reference: np.ndarray, estimate: np.ndarray, win: int) -> SourceStats:
    """Frame and track energies of one source in one pass (see SourceStats).

    Args:
      reference, estimate: (channels, samples) float audio of one shape.
      win: frame length = hop in samples (museval's window, 1 s).

    The error signal is formed a few frames at a time in a buffer that stays in the cache, so the
    two signals are read from memory about once.
    """
    _check_signal(reference, "reference")
    _check_signal(estimate, "estimate")
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} must have the "
                         "same shape (channels, samples); trim or pad the estimate")
    if win < 1:
        raise ValueError(f"win={win} must be a positive number of samples")
    # The sums' rounding depends on the memory order: one order gives one result.
    reference, estimate = np.ascontiguousarray(reference), np.ascontiguousarray(estimate)
    c, n = reference.shape
    nframes = num_frames(n, win)
    w = min(n, nframes * win) // nframes
    dtype = np.result_type(reference.dtype, estimate.dtype)
    ref = _sum_squares(frame(reference, win)).sum(axis=0)
    err = np.empty(nframes)
    per_block = max(1, BLOCK // (c * w))
    buf = np.empty((c, min(per_block, nframes) * w), dtype)
    for t0 in range(0, nframes, per_block):
        t1 = min(nframes, t0 + per_block)
        d = buf[:, :(t1 - t0) * w]
        np.subtract(estimate[:, t0 * w:t1 * w], reference[:, t0 * w:t1 * w], out=d)
        err[t0:t1] = _sum_squares(d.reshape(c, t1 - t0, w)).sum(axis=0)
    silent = _channel_sum_silent(reference, win) | _channel_sum_silent(estimate, win)
    # float32 squares below ~1e-38 vanish; decide such frames in float64 like museval.
    for t in np.flatnonzero(((ref == 0) | (err == 0)) & ~silent):
        r = reference[:, t * w:(t + 1) * w].astype(np.float64)
        e = estimate[:, t * w:(t + 1) * w].astype(np.float64)
        ref[t], err[t] = np.sum(r * r), np.sum((e - r) ** 2)
    tail_r = reference[:, nframes * w:]
    tail_d = estimate[:, nframes * w:] - tail_r
    ref_total = float(ref.sum() + _sum_squares(tail_r).sum())
    err_total = float(err.sum() + _sum_squares(tail_d).sum())
    return SourceStats(ref, err, silent, ref_total, err_total)


def _db(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """10 log10(num / den), +inf where den == 0 (museval's _safe_db)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.inf, 10.0 * np.log10(num / np.where(den == 0, 1.0, den)))


def _usdr_db(num: float, den: float, eps: float = USDR_EPS) -> float:
    return float(10.0 * np.log10((num + eps) / (den + eps)))


def usdr(reference: np.ndarray, estimate: np.ndarray, eps: float = USDR_EPS) -> float:
    """Utterance SDR in dB over all channels and samples (the authors' `compute_uSDR`).

    `10 log10((sum s^2 + eps) / (sum (s - s_hat)^2 + eps))`, sums in float64.

    Args:
      reference: (channels, samples) (any shape works; everything is summed).
      estimate: same shape as `reference`.
    """
    reference, estimate = np.asarray(reference), np.asarray(estimate)
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} must have the "
                         "same shape")
    if reference.size == 0:
        raise ValueError("reference is empty; pass audio shaped (channels, samples)")
    r, e = _float(reference), _float(estimate)
    if r.ndim != 2 or r.shape[0] > r.shape[1]:
        r, e = r.reshape(1, -1), e.reshape(1, -1)
    # Frames of SAMPLE_RATE, as sdr_scores: both give the same uSDR to the last bit.
    stats = source_stats(r, e, win=SAMPLE_RATE)
    return _usdr_db(stats.ref_total, stats.err_total, eps)


def sdr_scores(reference: np.ndarray, estimate: np.ndarray,
               rate: int = SAMPLE_RATE) -> tuple[float, np.ndarray]:
    """uSDR and museval's frame SDRs of one source scored alone (the paper's protocol).

    Args:
      reference, estimate: (channels, samples) float audio of one shape, e.g. the vocals and
        their estimate.
      rate: museval's window = hop, in samples (1 s).
    Returns:
      (usdr in dB, frames (nframes,) float64) with frames equal to
      `museval.metrics.bss_eval(ref, est, window=rate, hop=rate)[0][0]` in channel-last layout;
      NaN where the reference or the estimate is silent, +inf where the estimate is exact.
      The track's cSDR is `nanmedian(frames)`.
    """
    stats = source_stats(np.asarray(reference), np.asarray(estimate), rate)
    frames = _db(stats.ref_energy, stats.err_energy)
    frames[stats.silent] = np.nan
    return _usdr_db(stats.ref_total, stats.err_total), frames


def csdr_frames(references: np.ndarray | Sequence[np.ndarray],
                estimates: np.ndarray | Sequence[np.ndarray],
                rate: int = SAMPLE_RATE) -> np.ndarray:
    """Framewise SDR in dB, equal to `museval.evaluate(..., win=rate, hop=rate)[0]` (v4, images).

    The sources are scored jointly, as museval does: a frame is NaN for all of them when any one
    is silent. For the paper's cSDR (vocals alone) pass one source, or use `sdr_scores`.

    Args:
      references: (sources, channels, samples), e.g. [vocals, accompaniment] (an array, or a list
        of (channels, samples) arrays); any float dtype.
      estimates: same shape.
      rate: window and hop in samples (1 s).
    Returns:
      (sources, nframes) float64; NaN in frames where any reference or estimate is silent; +inf
      where the estimate is exact.
    """
    references, estimates = _check_sources(references, estimates)
    stats = [source_stats(r, e, rate) for r, e in zip(references, estimates, strict=True)]
    sdr = np.stack([_db(s.ref_energy, s.err_energy) for s in stats])
    sdr[:, np.any([s.silent for s in stats], axis=0)] = np.nan
    return sdr


def nanmedian(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """np.nanmedian without the all-NaN RuntimeWarning (an all-NaN slice gives NaN)."""
    x = np.asarray(x, dtype=np.float64)
    allnan = np.all(np.isnan(x), axis=axis)
    filled = np.where(np.expand_dims(allnan, axis), 0.0, x)
    return np.where(allnan, np.nan, np.nanmedian(filled, axis=axis))


def csdr(references: np.ndarray, estimates: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Track cSDR per source: the nanmedian of `csdr_frames` over frames (museval's aggregate).

    Args:
      references, estimates: (sources, channels, samples).
    Returns:
      (sources,) float64; NaN when every frame is NaN.
    """
    return nanmedian(csdr_frames(references, estimates, rate), axis=-1)


def _float(x: np.ndarray) -> np.ndarray:
    """x as a float array: float dtypes as they are, anything else as float64."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def frame_energy(x: np.ndarray, win: int) -> np.ndarray:
    """Energy per frame: (channels, samples) -> (nframes,), summed over channels and samples."""
    return _sum_squares(frame(_float(x), win)).sum(axis=0)


def vocal_silent_frames(reference_vocals: np.ndarray, rate: int = SAMPLE_RATE,
                        silence_db: float = SILENCE_DB) -> np.ndarray:
    """Frames (1 s) where the reference vocals are silent: mean square below `silence_db` dBFS.

    Exact digital silence (museval's NaN frames) is included; -60 dBFS also catches the faint bleed
    and noise floor that real stems carry in their silent parts.

    Args:
      reference_vocals: (channels, samples).
    Returns:
      (nframes,) bool.
    """
    f = frame(_float(reference_vocals), rate)
    mean_square = _sum_squares(f).sum(axis=0) / (f.shape[0] * f.shape[-1])
    return mean_square <= 10.0 ** (silence_db / 10.0)


def reference_silent(reference: np.ndarray, rate: int = SAMPLE_RATE,
                     silence_db: float = SILENCE_DB) -> bool:
    """True when every 1 s frame of a reference is silent (`vocal_silent_frames`).

    Such a reference has no score: museval refuses an all-zero one, and its uSDR is set by the
    1e-7 regulariser, i.e. by the estimate's energy alone. Args: reference (channels, samples).
    """
    return bool(np.all(vocal_silent_frames(reference, rate, silence_db)))


def silent_leakage(reference_vocals: np.ndarray, estimate_vocals: np.ndarray, mixture: np.ndarray,
                   rate: int = SAMPLE_RATE, silence_db: float = SILENCE_DB) -> tuple[float, int]:
    """Silent-region leakage: the estimate's energy where the reference vocals are silent.

    `10 log10(sum_{silent frames} s_hat^2 / sum_{silent frames} x^2)` in dB relative to the
    mixture x in the same frames; lower is better (-inf: nothing leaked).

    Args:
      reference_vocals, estimate_vocals, mixture: (channels, samples), same shape.
    Returns:
      (leakage_db, n_silent_frames); leakage is NaN when there is no silent frame or the mixture is
      itself silent there.
    """
    shapes = {np.shape(reference_vocals), np.shape(estimate_vocals), np.shape(mixture)}
    if len(shapes) != 1:
        raise ValueError(f"reference, estimate and mixture must have one shape, got {shapes}")
    silent = vocal_silent_frames(reference_vocals, rate, silence_db)
    n = int(silent.sum())
    mix_e = float(frame_energy(mixture, rate)[silent].sum())
    if n == 0 or mix_e == 0.0:
        return float("nan"), n
    est_e = float(frame_energy(estimate_vocals, rate)[silent].sum())
    with np.errstate(divide="ignore"):
        return float(10.0 * np.log10(est_e / mix_e)), n


def active_stretches(reference_vocals: np.ndarray, rate: int = SAMPLE_RATE,
                     hop_seconds: float = 0.1, threshold_db: float = -40.0,
                     floor_db: float = -60.0) -> list[tuple[int, int]]:
    """Vocal-active stretches of a reference vocal track, as sample ranges [start, stop).

    Activity is judged on 100 ms frames: a frame is active when its mean square is within
    `threshold_db` of the track's loudest frame and above `floor_db` dBFS. Consecutive active frames
    form one stretch; the trailing partial frame is dropped.

    Args:
      reference_vocals: (channels, samples).
    Returns:
      list of (start_sample, stop_sample), in order.
    """
    ref = _float(reference_vocals)
    hop = int(round(hop_seconds * rate))
    if ref.shape[-1] < hop:
        return []
    n = ref.shape[-1] // hop
    f = ref[..., : n * hop].reshape(ref.shape[0], n, hop)
    ms = _sum_squares(f).sum(axis=0) / (f.shape[0] * hop)
    peak = ms.max()
    if peak <= 0:
        return []
    active = (ms >= peak * 10.0 ** (threshold_db / 10.0)) & (ms > 10.0 ** (floor_db / 10.0))
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a) * hop, int(b) * hop) for a, b in zip(starts, stops, strict=True)]
