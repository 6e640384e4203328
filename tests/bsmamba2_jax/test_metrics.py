"""Metrics against museval (the reference) and against plain float64 formulas."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bsmamba2_jax import metrics
from bsmamba2_jax.data.musdb import SAMPLE_RATE as RATE


def _seed(*values) -> int:
    return zlib.crc32(repr(values).encode())


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
    refs, ests = _signals(_seed("loop", 10000), 2.0, [(0, 0.2, 0.6)])
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


def test_sdr_scores_equal_museval_on_vocals_alone():
    """The paper's protocol: museval's bss_eval on one source; uSDR over every sample."""
    museval = pytest.importorskip("museval")
    seed = _seed("sdr_scores", 4.6)
    rng = np.random.default_rng(seed)
    n = int(4.6 * RATE)
    ref = (0.3 * rng.standard_normal((2, n))).astype(np.float32)
    ref[:, RATE:2 * RATE] = 0.0  # a silent second: NaN
    ref[:, int(2.5 * RATE):int(2.7 * RATE)] = 0.0  # part of a second: scored
    est = ref + (0.1 * rng.standard_normal((2, n))).astype(np.float32)
    est[:, 3 * RATE:4 * RATE] = 0.0  # a silent estimate: NaN
    usdr, frames = metrics.sdr_scores(ref, est)
    want = museval.metrics.bss_eval(ref.T[None], est.T[None], window=RATE, hop=RATE)[0][0]
    np.testing.assert_array_equal(np.isnan(frames), np.isnan(want), err_msg=f"{seed=}")
    assert np.isnan(frames).sum() == 2, f"{seed=}"
    np.testing.assert_allclose(frames, want, atol=1e-6, err_msg=f"{seed=}")
    r, e = ref.astype(np.float64), est.astype(np.float64)
    want_u = 10 * np.log10((np.sum(r**2) + 1e-7) / (np.sum((e - r) ** 2) + 1e-7))
    assert usdr == pytest.approx(want_u, abs=1e-6), f"{seed=}"
    assert usdr == metrics.usdr(ref, est)  # one computation, one result


def _loop_reference(ref, est, win):
    """Plain float64 per-frame energies and museval's silence rule, frame by frame."""
    r, e = ref.astype(np.float64), est.astype(np.float64)
    n = r.shape[-1]
    count = n // win if win < n else 1
    w = min(n, count * win) // count
    out = []
    for t in range(count):
        rf, ef = r[:, t * w:(t + 1) * w], e[:, t * w:(t + 1) * w]
        silent = not np.any(ref[:, t * w:(t + 1) * w].sum(0)) or \
            not np.any(est[:, t * w:(t + 1) * w].sum(0))
        out.append((np.sum(rf**2), np.sum((ef - rf) ** 2), silent))
    ref_e, err_e, silent = (np.array(x) for x in zip(*out, strict=True))
    return ref_e, err_e, silent, np.sum(r**2), np.sum((e - r) ** 2)


@pytest.mark.parametrize("channels,samples,win", [
    (2, 3 * RATE + 777, RATE), (1, 5000, 1024), (3, 12345, 4000), (2, 700, RATE),
    (2, 513, 512), (2, 4 * 4096, 4096),
])
def test_source_stats_float32_against_float64_loop(channels, samples, win):
    """Awkward shapes, wide dynamic range, silent frames: float32 sums stay within the documented
    2e-7 of the float64 loop, the silence flags are exact, memory order is invisible."""
    seed = _seed("stats", channels, samples, win)
    rng = np.random.default_rng(seed)
    gains = 10.0 ** rng.uniform(-4, 1, size=samples // 300 + 1)
    ref = (rng.standard_normal((channels, samples)) * np.repeat(gains, 300)[:samples])
    ref = ref.astype(np.float32)
    est = (ref + 0.05 * rng.standard_normal((channels, samples)) * ref.std()).astype(np.float32)
    if samples > 2 * win:
        ref[:, win:2 * win] = 0.0
        if channels > 1:
            ref[-1, 2 * win:3 * win] = -ref[:-1, 2 * win:3 * win].sum(0)  # channel sum is 0
    got = metrics.source_stats(ref, est, win)
    want = _loop_reference(ref, est, win)
    np.testing.assert_array_equal(got.silent, want[2], err_msg=f"{seed=}")
    np.testing.assert_allclose(got.ref_energy, want[0], rtol=2e-7, err_msg=f"{seed=}")
    np.testing.assert_allclose(got.err_energy, want[1], rtol=2e-7, err_msg=f"{seed=}")
    assert got.ref_total == pytest.approx(want[3], rel=2e-7), f"{seed=}"
    assert got.err_total == pytest.approx(want[4], rel=2e-7), f"{seed=}"
    fortran = metrics.source_stats(np.asfortranarray(ref), np.asfortranarray(est), win)
    np.testing.assert_array_equal(fortran.err_energy, got.err_energy, err_msg=f"{seed=}")
    assert fortran.ref_total == got.ref_total


def test_silence_is_decided_on_every_sample():
    """Frames whose first samples are silent, near-anti-phase channels, squares that underflow
    or overflow in float32: decided like museval's exact rule and float64 sums."""
    seed = _seed("silence")
    rng = np.random.default_rng(seed)
    win = 1000
    ref = (0.3 * rng.standard_normal((2, 6 * win))).astype(np.float32)
    est = (ref + 0.1 * rng.standard_normal(ref.shape)).astype(np.float32)
    ref[:, 0:win - 1] = 0.0  # frame 0: one non-zero sample, at its very end
    ref[:, win:2 * win] = 0.0  # frame 1: silent
    ref[1, 2 * win:3 * win] = -ref[0, 2 * win:3 * win]  # frame 2: anti-phase ...
    ref[1, 3 * win - 1] += 0.5  # ... except the last sample
    ref[:, 3 * win:4 * win] = 1e-30 * np.sign(ref[:, 3 * win:4 * win])  # frame 3: underflows
    est[:, 3 * win:4 * win] = 2e-30 * np.sign(ref[:, 3 * win:4 * win])
    ref[:, 4 * win:5 * win] *= 1e20  # frame 4: overflows in float32 squares
    est[:, 4 * win:5 * win] = ref[:, 4 * win:5 * win] * 1.5
    _, frames = metrics.sdr_scores(ref, est, rate=win)
    want = _loop_reference(ref, est, win)
    np.testing.assert_array_equal(np.isnan(frames), want[2], err_msg=f"{seed=}")
    assert list(np.isnan(frames)) == [False, True, False, False, False, False], f"{seed=}"
    with np.errstate(divide="ignore"):
        want_db = 10 * np.log10(want[0] / want[1])
    np.testing.assert_allclose(frames[~want[2]], want_db[~want[2]], atol=1e-6,
                               err_msg=f"{seed=}")
    assert frames[3] == pytest.approx(0.0, abs=1e-6) and frames[4] == pytest.approx(
        -20 * np.log10(0.5), abs=1e-6), f"{seed=}"
