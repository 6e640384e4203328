"""Metrics against museval (the reference) and against plain float64 formulas."""

from __future__ import annotations

import numpy as np
import pytest

from bsmamba2_jax import metrics

RATE = 44100


def _signals(seed: int, seconds: float, silences: list[tuple[int, float, float]]):
    """Random vocals/accompaniment references and noisy estimates, channel-first.

    silences: (source, start_s, stop_s) stretches set to exact zero in the references.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    refs = rng.standard_normal((2, 2, n)) * np.array([0.3, 0.5])[:, None, None]
    for src, a, b in silences:
        refs[src, :, int(a * RATE):int(b * RATE)] = 0.0
    # Estimates: reference plus leakage of the other source plus noise, with varying quality.
    gains = rng.uniform(0.05, 0.6, size=(2, 1, 1))
    ests = refs + gains * refs[::-1] + 0.1 * rng.standard_normal(refs.shape)
    return refs, ests


def _museval(refs, ests, rate=RATE):
    museval = pytest.importorskip("museval")
    sdr, _, _, _ = museval.evaluate(np.swapaxes(refs, 1, 2), np.swapaxes(ests, 1, 2),
                                    win=rate, hop=rate)
    return sdr


@pytest.mark.parametrize("seed,seconds,silences,est_silence", [
    # vocals silent for two whole seconds (NaN frames) and part of another (not NaN)
    (0, 5.5, [(0, 1.0, 3.0), (0, 3.5, 3.7)], None),
    # accompaniment silent in one frame, vocal estimate silent in another; trailing 0.3 s dropped
    (1, 4.3, [(1, 2.0, 3.0)], (0, 0.0, 1.0)),
])
def test_csdr_frames_equal_museval(seed, seconds, silences, est_silence):
    refs, ests = _signals(seed, seconds, silences)
    if est_silence is not None:
        src, a, b = est_silence
        ests[src, :, int(a * RATE):int(b * RATE)] = 0.0
    expected = _museval(refs, ests)
    got = metrics.csdr_frames(refs, ests, rate=RATE)
    assert got.shape == expected.shape == (2, int(seconds))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(got).any() and np.isfinite(got).any()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # Sources given as lists of float32 arrays (no stacking) give the same frames.
    as_lists = metrics.csdr_frames([r.astype(np.float32) for r in refs],
                                   [e.astype(np.float32) for e in ests], rate=RATE)
    expected32 = _museval(refs.astype(np.float32), ests.astype(np.float32))
    np.testing.assert_allclose(as_lists, expected32, atol=1e-6, rtol=0)
    # Track score: museval's aggregate is the nanmedian over frames.
    np.testing.assert_allclose(metrics.csdr(refs, ests), np.nanmedian(expected, axis=1), atol=1e-6)


def test_csdr_antiphase_counts_as_silent_like_museval():
    """museval sums channels before its silence test, so L = -R reads as silent."""
    refs, ests = _signals(2, 3.0, [])
    refs[0, 1, RATE:2 * RATE] = -refs[0, 0, RATE:2 * RATE]
    got = metrics.csdr_frames(refs, ests, rate=RATE)
    expected = _museval(refs, ests)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(got[:, 1]).all()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_csdr_short_signal_is_one_frame():
    refs, ests = _signals(3, 0.5, [])
    got = metrics.csdr_frames(refs, ests, rate=RATE)
    np.testing.assert_allclose(got, _museval(refs, ests), atol=1e-6)
    assert got.shape == (2, 1)


def test_csdr_frames_matches_loop_reference_other_rate():
    """A plain per-frame loop in float64, with a window that is not 44100."""
    refs, ests = _signals(4, 2.0, [(0, 0.2, 0.6)])
    win = 10000
    got = metrics.csdr_frames(refs, ests, rate=win)
    nwin = refs.shape[-1] // win
    for t in range(nwin):
        r, e = refs[..., t * win:(t + 1) * win], ests[..., t * win:(t + 1) * win]
        silent = any(np.all(x[j].sum(0) == 0) for x in (r, e) for j in range(2))
        for j in range(2):
            ratio = np.sum(r[j] ** 2) / np.sum((e[j] - r[j]) ** 2)
            want = np.nan if silent else 10 * np.log10(ratio)
            np.testing.assert_allclose(got[j, t], want, atol=1e-9)


def test_usdr_formula():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((2, 3000))
    s_hat = s + 0.3 * rng.standard_normal((2, 3000))
    want = 10 * np.log10((np.sum(s**2) + 1e-7) / (np.sum((s - s_hat) ** 2) + 1e-7))
    assert metrics.usdr(s, s_hat) == pytest.approx(want, abs=1e-12)
    # Silent reference and silent estimate: the regulariser gives 0 dB, not NaN.
    assert metrics.usdr(np.zeros((2, 10)), np.zeros((2, 10))) == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        metrics.csdr_frames(np.ones((2, 2, 100)), np.ones((2, 2, 99)))
    with pytest.raises(ValueError, match="channel-last"):
        metrics.csdr_frames(np.ones((2, 100, 2)), np.ones((2, 100, 2)))


def test_silent_leakage():
    rng = np.random.default_rng(6)
    n = 4 * RATE
    vocals = 0.3 * rng.standard_normal((2, n))
    vocals[:, RATE:3 * RATE] = 0.0  # seconds 1 and 2 silent
    mix = vocals + 0.3 * rng.standard_normal((2, n))
    est = vocals + 0.01 * rng.standard_normal((2, n))
    leak, nsil = metrics.silent_leakage(vocals, est, mix, rate=RATE)
    sl = slice(RATE, 3 * RATE)
    want = 10 * np.log10(np.sum(est[:, sl] ** 2) / np.sum(mix[:, sl] ** 2))
    assert nsil == 2
    assert leak == pytest.approx(want, abs=1e-9)
    # No silent frame: NaN.
    assert np.isnan(metrics.silent_leakage(mix, est, mix)[0])


def test_active_stretches():
    rng = np.random.default_rng(7)
    vocals = np.zeros((2, 10 * RATE))
    for a, b in [(0.5, 2.0), (3.0, 6.0), (7.0, 7.3)]:
        i, j = round(a * RATE), round(b * RATE)
        vocals[:, i:j] = 0.2 * rng.standard_normal((2, j - i))
    got = metrics.active_stretches(vocals, rate=RATE)
    seconds = np.array(got, dtype=np.float64) / RATE
    np.testing.assert_allclose(seconds, [(0.5, 2.0), (3.0, 6.0), (7.0, 7.3)], atol=1e-9)
