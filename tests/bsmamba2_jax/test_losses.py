"""The training loss (docs/DESIGN.md#loss-and-recipe) against a direct NumPy float64 computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.losses import separation_loss


def _stft_reference(x: np.ndarray, window: int, hop: int = 147) -> np.ndarray:
    """torch.stft(center=True, pad_mode="reflect") of (..., samples) in float64, written out:
    reflect-pad n_fft // 2, frames every hop, periodic Hann(window) centred in n_fft, rfft."""
    n_fft = max(window, 2048)
    pad = n_fft // 2
    padded = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    hann = np.zeros(n_fft)
    left = (n_fft - window) // 2
    hann[left:left + window] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
    frames = 1 + x.shape[-1] // hop
    out = []
    for t in range(frames):
        out.append(np.fft.rfft(padded[..., t * hop:t * hop + n_fft] * hann, axis=-1))
    return np.stack(out, axis=-1)  # (..., bins, frames)


def _loss_reference(estimate: np.ndarray, target: np.ndarray) -> float:
    e, s = estimate.astype(np.float64), target.astype(np.float64)
    loss = 10 * np.mean(np.abs(e - s))
    for w in (4096, 2048, 1024, 512, 256):
        loss += np.mean(np.abs(_stft_reference(e, w) - _stft_reference(s, w)))
    return float(loss)


@pytest.mark.parametrize("samples", [2500, 7001])
def test_matches_numpy_float64(samples):
    rng = np.random.default_rng(samples)
    target = rng.standard_normal((2, 2, samples)).astype(np.float32) * 0.3
    estimate = target + rng.standard_normal(target.shape).astype(np.float32) * 0.1
    estimate[0, :, :samples // 3] = target[0, :, :samples // 3]  # exact in places
    got = jax.jit(separation_loss)(estimate, target)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), _loss_reference(estimate, target), rtol=2e-6)


def test_terms_and_weights():
    """Each term on its own: a constant offset c has waveform term 10 c; the STFT terms see it."""
    rng = np.random.default_rng(0)
    target = rng.standard_normal((1, 2, 4000)).astype(np.float32)
    c = 0.25
    got = float(separation_loss(target + c, target))
    spectral = sum(np.mean(np.abs(_stft_reference(np.full((1, 2, 4000), c), w)))
                   for w in (4096, 2048, 1024, 512, 256))
    np.testing.assert_allclose(got, 10 * c + spectral, rtol=2e-6)


def test_zero_at_the_target_with_finite_gradients():
    rng = np.random.default_rng(1)
    value_and_grad = jax.jit(jax.value_and_grad(separation_loss))
    target = jnp.asarray(rng.standard_normal((2, 2, 3000)), jnp.float32)
    for t in (target, jnp.zeros_like(target)):  # equality, all-zero spectra: no NaN from |0|
        value, grad = value_and_grad(t, t)
        assert float(value) == 0.0
        assert np.all(np.isfinite(grad))
    part = target.at[:, :, 1000:].set(0.0)  # silent tail in both
    est = part + 0.1 * jnp.asarray(rng.standard_normal(target.shape), jnp.float32)
    est = est.at[:, :, 1000:].set(0.0)
    value, grad = value_and_grad(est, part)
    assert np.all(np.isfinite(grad)) and float(value) > 0
    # A small step against the gradient lowers the loss.
    stepped, _ = value_and_grad(est - 1e-3 * grad / jnp.abs(grad).max(), part)
    assert float(stepped) < float(value)


def test_dtypes_and_shapes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 3000)).astype(np.float32)
    y = rng.standard_normal((1, 2, 3000)).astype(np.float32)
    bf16 = separation_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(float(bf16), _loss_reference(
        np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
        np.asarray(jnp.asarray(y, jnp.bfloat16), np.float32)), rtol=2e-6)
    with pytest.raises(ValueError, match=r"\(batch, channels, samples\)"):
        separation_loss(x, y[..., :2999])
    with pytest.raises(ValueError, match=r"\(batch, channels, samples\)"):
        separation_loss(x[0], y[0])
    with pytest.raises(ValueError, match="needs more than 2048 samples"):
        separation_loss(x[..., :2000], y[..., :2000])
