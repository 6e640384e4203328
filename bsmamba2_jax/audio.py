"""STFT and inverse STFT in JAX with torch.stft / torch.istft semantics (docs/DESIGN.md#model).

Conventions (those of torch.stft with `center=True, pad_mode="reflect", normalized=False,
onesided=True` and a periodic Hann window):
  - the signal is reflect-padded by n_fft // 2 on both sides, so frame t is centred on sample
    t * hop_length and there are 1 + samples // hop_length frames;
  - a window shorter than n_fft (the multi-resolution loss uses Hann(256) inside n_fft 2048) is
    zero-padded on both sides to n_fft, i.e. centred in the frame, as torch.stft does;
  - the spectrum layout is (..., n_fft // 2 + 1 bins, frames), complex64.

Everything is float32 whatever the caller's dtype: spectra feed masks and the loss, where bf16
would cost several dB. All functions are jit-able and differentiable (gather / scatter-add framing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hann_window(window_length: int, n_fft: int | None = None) -> np.ndarray:
    """Periodic Hann window of `window_length`, zero-padded (centred) to `n_fft`: (n_fft,) float32.

    Periodic (torch.hann_window default): w[i] = 0.5 - 0.5 cos(2 pi i / window_length).
    """
    n_fft = window_length if n_fft is None else n_fft
    if not 0 < window_length <= n_fft:
        raise ValueError(f"window_length={window_length} must be in [1, n_fft={n_fft}]")
    i = np.arange(window_length)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * i / window_length)
    left = (n_fft - window_length) // 2  # torch.stft pads the window this way
    out = np.zeros(n_fft, np.float64)
    out[left:left + window_length] = w
    return out.astype(np.float32)


def num_frames(samples: int, hop_length: int) -> int:
    """Frames of a centred STFT of `samples` samples: 1 + samples // hop_length."""
    return 1 + samples // hop_length


def _frame_indices(frames: int, n_fft: int, hop_length: int) -> np.ndarray:
    """(frames, n_fft) int32 indices into the padded signal: frame t starts at t * hop_length."""
    return (np.arange(frames)[:, None] * hop_length + np.arange(n_fft)[None, :]).astype(np.int32)


def _check_sizes(n_fft: int, hop_length: int, window_length: int | None) -> int:
    if n_fft < 2 or hop_length < 1:
        raise ValueError(f"n_fft={n_fft} must be >= 2 and hop_length={hop_length} >= 1")
    window_length = n_fft if window_length is None else window_length
    if not 0 < window_length <= n_fft:
        raise ValueError(f"window_length={window_length} must be in [1, n_fft={n_fft}]")
    return window_length


def stft(audio: jax.Array, n_fft: int, hop_length: int,
         window_length: int | None = None) -> jax.Array:
    """Centred, reflect-padded STFT with a periodic Hann window.

    Args:
      audio: (..., samples) real; any leading dims (e.g. batch, channel). samples > n_fft // 2
        (reflect padding needs it).
      n_fft: FFT size; bins = n_fft // 2 + 1.
      hop_length: hop between frames in samples.
      window_length: Hann window length (default n_fft), centred in the n_fft frame.
    Returns:
      (..., n_fft // 2 + 1, 1 + samples // hop_length) complex64.
    """
    window_length = _check_sizes(n_fft, hop_length, window_length)
    samples = audio.shape[-1]
    pad = n_fft // 2
    if samples <= pad:
        raise ValueError(f"STFT with n_fft={n_fft} needs more than {pad} samples (reflect padding "
                         f"of n_fft // 2), got {samples}; use a longer signal")
    x = jnp.asarray(audio).astype(jnp.float32)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = num_frames(samples, hop_length)
    framed = x[..., _frame_indices(frames, n_fft, hop_length)]  # (..., frames, n_fft)
    framed = framed * hann_window(window_length, n_fft)
    spec = jnp.fft.rfft(framed, n=n_fft, axis=-1)  # (..., frames, bins)
    return jnp.swapaxes(spec, -1, -2).astype(jnp.complex64)


def _window_envelope(frames: int, n_fft: int, hop_length: int,
                     window: np.ndarray) -> np.ndarray:
    """Sum over frames of the squared window at each padded-signal sample: (padded_len,)."""
    env = np.zeros((frames - 1) * hop_length + n_fft, np.float64)
    sq = window.astype(np.float64) ** 2
    for t in range(frames):
        env[t * hop_length:t * hop_length + n_fft] += sq
    return env


def istft(spec: jax.Array, n_fft: int, hop_length: int, length: int,
          window_length: int | None = None) -> jax.Array:
    """Inverse of `stft` (torch.istft with center=True): windowed overlap-add / sum of window^2.

    Args:
      spec: (..., n_fft // 2 + 1, frames) complex.
      n_fft, hop_length, window_length: as given to `stft`.
      length: samples of the output (the original signal length).
    Returns:
      (..., length) float32. Samples that no window covers (only possible for a window much
      shorter than n_fft) are 0, as are samples past the last frame.
    """
    window_length = _check_sizes(n_fft, hop_length, window_length)
    bins, frames = spec.shape[-2], spec.shape[-1]
    if bins != n_fft // 2 + 1:
        raise ValueError(f"spec has {bins} bins but n_fft={n_fft} needs {n_fft // 2 + 1}")
    window = hann_window(window_length, n_fft)
    spec = jnp.swapaxes(jnp.asarray(spec).astype(jnp.complex64), -1, -2)  # (..., frames, bins)
    framed = jnp.fft.irfft(spec, n=n_fft, axis=-1) * window  # (..., frames, n_fft)
    lead = framed.shape[:-2]
    padded_len = (frames - 1) * hop_length + n_fft
    idx = _frame_indices(frames, n_fft, hop_length)
    y = jnp.zeros(lead + (padded_len,), jnp.float32).at[..., idx].add(framed)
    env = _window_envelope(frames, n_fft, hop_length, window)
    # Divide only where some window covers the sample (torch raises instead; zero is the honest
    # value for the uncovered edge samples of a short window).
    covered = env > 1e-11
    inv_env = np.where(covered, 1.0 / np.where(covered, env, 1.0), 0.0).astype(np.float32)
    y = y * inv_env
    start = n_fft // 2
    y = y[..., start:start + length]
    if y.shape[-1] < length:  # asked for more than the frames cover
        y = jnp.pad(y, [(0, 0)] * len(lead) + [(0, length - y.shape[-1])])
    return y
