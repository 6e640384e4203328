"""Separation metrics: uSDR, museval-exact cSDR, silent-region leakage, vocal-active stretches.

Audio is channel-first everywhere in this module, like the rest of the project:
a signal is `(channels, samples)` and a set of sources is `(sources, channels, samples)`.
(museval uses `(sources, samples, channels)`; transpose with `np.swapaxes(x, -1, -2)`.)

Why cSDR can be exact and fast: museval's BSSEval v4 in images mode computes, per frame,
`SDR = 10 log10(|s_true|^2 / |e_spat + e_interf + e_artif|^2)` with
`e_artif = s_hat - s_true - e_spat - e_interf`; the distortion filters (length 512, fitted on the
whole track) cancel algebraically, so the frame SDR is `10 log10(sum s^2 / sum (s_hat - s)^2)` over
the frame's samples and channels. This was checked numerically against museval (agreement to
~1e-13 dB, see tests/bsmamba2_jax/test_metrics.py), so no projection is needed. The filters matter
only for ISR, SIR and SAR, for which evaluate.py can still run full museval (`--museval`).

museval's NaN rule, reproduced here: a frame is NaN for every source when any reference or any
estimate is "silent" in it, where silent means the per-sample sum over channels is exactly 0 at
every sample of the frame (`museval.metrics._any_source_silent`). Frames are `win` samples with hop
`win`; a trailing partial frame is dropped, except that a signal not longer than one window is one
frame. Unlike museval, a source silent over the whole track gives NaN frames instead of an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 44100
USDR_EPS = 1e-7  # uSDR regulariser (SPEC §6), added to numerator and denominator


def _as_sources(x: np.ndarray | Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    """(sources, channels, samples) array, or a sequence of (channels, samples) arrays -> list.

    A sequence is not stacked, which saves a copy of every source on long tracks.
    """
    sources = [np.asarray(s) for s in x]
    if not sources:
        raise ValueError(f"{name} is empty; pass (sources, channels, samples) audio")
    for s in sources:
        if s.ndim != 2 or s.size == 0 or not np.issubdtype(s.dtype, np.floating):
            raise ValueError(f"{name} must be (sources, channels, samples) float audio; got a "
                             f"source of dtype {s.dtype} and shape {s.shape}")
        if s.shape != sources[0].shape:
            raise ValueError(f"{name}: sources differ in shape, {s.shape} vs {sources[0].shape}")
    if sources[0].shape[-1] < sources[0].shape[-2]:
        raise ValueError(f"{name} sources of shape {sources[0].shape} have fewer samples than "
                         "channels: this looks channel-last (museval order); pass "
                         "(sources, channels, samples)")
    return sources


def _check_sources(references, estimates) -> tuple[list[np.ndarray], list[np.ndarray]]:
    refs, ests = _as_sources(references, "references"), _as_sources(estimates, "estimates")
    if len(refs) != len(ests) or refs[0].shape != ests[0].shape:
        raise ValueError(f"references ({len(refs)} x {refs[0].shape}) and estimates "
                         f"({len(ests)} x {ests[0].shape}) must have the same shape (sources, "
                         "channels, samples); trim or pad the estimates")
    return refs, ests


def _energies(reference: np.ndarray, estimate: np.ndarray,
              block: int = 1 << 17) -> tuple[float, float]:
    """(sum r^2, sum (e - r)^2) in float64, block by block (no whole-track float64 copies)."""
    r, e = reference.reshape(-1), estimate.reshape(-1)
    x_buf = np.empty(min(block, r.size))
    d_buf = np.empty_like(x_buf)
    num = den = 0.0
    for i in range(0, r.size, block):
        k = min(block, r.size - i)
        x, d = x_buf[:k], d_buf[:k]
        np.copyto(x, r[i:i + k])
        np.copyto(d, e[i:i + k])
        np.subtract(d, x, out=d)
        num += float(np.einsum("i,i->", x, x))  # not BLAS: its threads spin on small calls
        den += float(np.einsum("i,i->", d, d))
    return num, den


def usdr(reference: np.ndarray, estimate: np.ndarray, eps: float = USDR_EPS) -> float:
    """Utterance SDR in dB over all channels and samples (SPEC §6).

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
    num, den = _energies(reference, estimate)
    return float(10.0 * np.log10((num + eps) / (den + eps)))


def num_frames(samples: int, win: int) -> int:
    """museval's frame count for window = hop = win (`museval.metrics.Framing.nwin`)."""
    return samples // win if win < samples else 1


def frame(x: np.ndarray, win: int) -> np.ndarray:
    """Non-overlapping frames of the last axis: (..., samples) -> (..., nframes, win).

    The trailing partial frame is dropped; a signal of at most `win` samples is one (short) frame.
    """
    n = num_frames(x.shape[-1], win)
    length = min(x.shape[-1], n * win)
    return x[..., :length].reshape(*x.shape[:-1], n, length // n)


def silent_frames(sources: np.ndarray, win: int = SAMPLE_RATE) -> np.ndarray:
    """museval's silence test per source and frame.

    Args:
      sources: (sources, channels, samples).
    Returns:
      (sources, nframes) bool: the channel-summed signal is exactly zero on the whole frame.
    """
    summed = np.sum(np.asarray(sources, dtype=np.float64), axis=-2)  # (sources, samples)
    return ~np.any(frame(summed, win), axis=-1)


def _channel_sum_silent(x: list[np.ndarray], gram: np.ndarray, w: int) -> np.ndarray:
    """museval's silence flag per source and frame, from the channel Gram matrix of each frame.

    The channel sum is zero on the whole frame iff its energy, the sum of all Gram entries, is
    zero. Frames whose channel-sum energy is zero or tiny next to their channel energies (digital
    silence, anti-phase channels) are checked exactly on the samples, like museval, since summing
    the Gram entries can leave rounding residue.

    Args: x: per source, the (c, b*w) block of the input; gram (s, c, c, b).
    Returns (s, b) bool.
    """
    trace = np.einsum("scct->st", gram)
    summed = gram.sum(axis=(1, 2))
    silent = np.zeros(trace.shape, dtype=bool)
    # Every candidate is decided on the samples (squares of tiny float64 values can underflow to
    # a zero trace); frames with clearly non-zero channel-sum energy are never silent.
    for j, t in zip(*np.nonzero(np.abs(summed) <= 1e-9 * trace), strict=True):
        silent[j, t] = not np.any(np.sum(x[j][:, t * w:(t + 1) * w], axis=0, dtype=np.float64))
    return silent


def _frame_stats(references: list[np.ndarray], estimates: list[np.ndarray], win: int,
                 block: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per source and frame: reference energy, error energy, and museval's silence flag.

    Works through `block` frames at a time in preallocated float64 buffers, so the copies and the
    difference stay in cache and no fresh pages are faulted in; all reductions are dot products.
    Returns: (ref_energy (s, t), err_energy (s, t), silent (t,) = any source silent).
    """
    nsrc, (nchan, n) = len(references), references[0].shape
    nwin = num_frames(n, win)
    w = min(n, nwin * win) // nwin
    ref_energy = np.empty((nsrc, nwin))
    err_energy = np.empty((nsrc, nwin))
    silent = np.empty(nwin, dtype=bool)
    r_buf = np.empty((nsrc, nchan, block * w))
    e_buf = np.empty_like(r_buf)
    for b0 in range(0, nwin, block):
        b1 = min(nwin, b0 + block)
        k = (b1 - b0) * w
        r, e = r_buf[..., :k], e_buf[..., :k]
        for j in range(nsrc):
            np.copyto(r[j], references[j][:, b0 * w:b1 * w])
            np.copyto(e[j], estimates[j][:, b0 * w:b1 * w])
        r4, e4 = r.reshape(nsrc, nchan, -1, w), e.reshape(nsrc, nchan, -1, w)
        gram_r = np.einsum("sctw,sdtw->scdt", r4, r4)
        gram_e = np.einsum("sctw,sdtw->scdt", e4, e4)
        ref_energy[:, b0:b1] = np.einsum("scct->st", gram_r)
        np.subtract(e, r, out=e)  # e is the error from here on
        err_energy[:, b0:b1] = np.einsum("sctw,sctw->st", e4, e4)
        quiet = _channel_sum_silent([x[:, b0 * w:b1 * w] for x in references], gram_r, w)
        quiet |= _channel_sum_silent([x[:, b0 * w:b1 * w] for x in estimates], gram_e, w)
        silent[b0:b1] = np.any(quiet, axis=0)
    return ref_energy, err_energy, silent


def csdr_frames(references: np.ndarray, estimates: np.ndarray,
                rate: int = SAMPLE_RATE) -> np.ndarray:
    """Framewise SDR in dB, equal to `museval.evaluate(..., win=rate, hop=rate)[0]` (v4, images).

    Args:
      references: (sources, channels, samples), e.g. [vocals, accompaniment] (an array, or a list
        of (channels, samples) arrays); any float dtype (sums are float64).
      estimates: same shape.
      rate: window and hop in samples (1 s).
    Returns:
      (sources, nframes) float64; NaN in frames where any reference or estimate is silent; +inf
      where the estimate is exact.
    """
    references, estimates = _check_sources(references, estimates)
    num, den, silent = _frame_stats(references, estimates, rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        sdr = 10.0 * np.log10(num / den)
    sdr = np.where(den == 0, np.inf, sdr)  # museval's _safe_db
    sdr[:, silent] = np.nan
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


def frame_energy(x: np.ndarray, win: int) -> np.ndarray:
    """Energy per frame: (channels, samples) -> (nframes,), summed over channels and samples."""
    f = frame(np.asarray(x, dtype=np.float64), win)
    return np.einsum("ctw,ctw->t", f, f)


def vocal_silent_frames(reference_vocals: np.ndarray, rate: int = SAMPLE_RATE,
                        silence_db: float = -60.0) -> np.ndarray:
    """Frames (1 s) where the reference vocals are silent: mean square below `silence_db` dBFS.

    Exact digital silence (museval's NaN frames) is included; -60 dBFS also catches the faint bleed
    and noise floor that real stems carry in their silent parts.

    Args:
      reference_vocals: (channels, samples).
    Returns:
      (nframes,) bool.
    """
    ref = np.asarray(reference_vocals, dtype=np.float64)
    f = frame(ref, rate)
    mean_square = np.einsum("ctw,ctw->t", f, f) / (f.shape[0] * f.shape[-1])
    return mean_square <= 10.0 ** (silence_db / 10.0)


def silent_leakage(reference_vocals: np.ndarray, estimate_vocals: np.ndarray, mixture: np.ndarray,
                   rate: int = SAMPLE_RATE, silence_db: float = -60.0) -> tuple[float, int]:
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
    ref = np.asarray(reference_vocals, dtype=np.float64)
    hop = int(round(hop_seconds * rate))
    if ref.shape[-1] < hop:
        return []
    n = ref.shape[-1] // hop
    f = ref[..., : n * hop].reshape(ref.shape[0], n, hop)
    ms = np.einsum("ctw,ctw->t", f, f) / (f.shape[0] * hop)
    peak = ms.max()
    if peak <= 0:
        return []
    active = (ms >= peak * 10.0 ** (threshold_db / 10.0)) & (ms > 10.0 ** (floor_db / 10.0))
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a) * hop, int(b) * hop) for a, b in zip(starts, stops, strict=True)]
