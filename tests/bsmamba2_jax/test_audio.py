"""STFT / iSTFT against a float64 NumPy transcription of torch.stft's definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.audio import hann_window, istft, num_frames, stft


def stft_reference(x: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """float64 centred reflect-padded STFT, written from the definition: (..., bins, frames)."""
    pad = n_fft // 2
    xp = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    i = np.arange(win)
    w = np.zeros(n_fft)
    left = (n_fft - win) // 2
    w[left:left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * i / win)
    frames = 1 + x.shape[-1] // hop
    k = np.arange(n_fft // 2 + 1)
    m = np.arange(n_fft)
    basis = np.exp(-2j * np.pi * np.outer(m, k) / n_fft)  # (n_fft, bins), a plain DFT
    cols = [(xp[..., t * hop:t * hop + n_fft] * w) @ basis for t in range(frames)]
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("n_fft,hop,win,length", [
    (2048, 441, None, 5003),  # the model's STFT
    (2048, 147, 256, 3001),  # loss resolution with a window shorter than n_fft
    (512, 128, 400, 1999),
])
def test_stft_matches_reference(n_fft, hop, win, length):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, length)).astype(np.float32)
    got = np.asarray(stft(jnp.asarray(x), n_fft, hop, win))
    want = stft_reference(x, n_fft, hop, win or n_fft)
    assert got.shape == (2, 2, n_fft // 2 + 1, num_frames(length, hop))
    assert got.dtype == np.complex64
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)


def test_hann_window_is_periodic_and_centred():
    w = hann_window(256, 2048)
    assert w.shape == (2048,)
    assert np.all(w[:896] == 0) and np.all(w[896 + 256:] == 0)
    # periodic: w[i] = w[win - i], and the value one past the end would be 0 again
    core = w[896:896 + 256]
    np.testing.assert_allclose(core[1:], core[1:][::-1], atol=1e-7)
    assert core[0] == 0 and core[128] == pytest.approx(1.0)


@pytest.mark.parametrize("length", [4411, 44101, 9999])
def test_round_trip_odd_lengths(length):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((3, 2, length)).astype(np.float32)
    spec = stft(jnp.asarray(x), 2048, 441)
    y = np.asarray(istft(spec, 2048, 441, length))
    assert y.shape == x.shape
    assert np.max(np.abs(y - x)) < 1e-5


def test_round_trip_under_jit_and_gradient_is_finite():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2, 3001)).astype(np.float32))
    rt = jax.jit(lambda a: istft(stft(a, 512, 128), 512, 128, a.shape[-1]))
    np.testing.assert_allclose(np.asarray(rt(x)), np.asarray(x), atol=1e-5)
    # The loss differentiates through the STFT (short window inside n_fft): finite, nonzero.
    g = jax.grad(lambda a: jnp.sum(jnp.abs(stft(a, 512, 128, 256)) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_too_short_signal_is_an_error():
    with pytest.raises(ValueError, match="samples"):
        stft(jnp.ones((2, 1000)), 2048, 441)
    with pytest.raises(ValueError, match="window_length"):
        stft(jnp.ones((2, 5000)), 512, 128, 1024)
