"""The training loss: waveform L1 plus multi-resolution STFT magnitude-of-difference L1.

See docs/DESIGN.md#loss-and-recipe (paper Sec. III-D, Eq. (8), and the authors' code).

    L = 10 * mean|s_hat - s|
        + sum_{w in (4096, 2048, 1024, 512, 256)} mean|STFT_w(s_hat) - STFT_w(s)|

STFT_w: hop 147, n_fft = max(w, 2048), periodic Hann(w) zero-padded (centred) to n_fft,
center=True with reflect padding (torch.stft semantics, `bsmamba2_jax.audio.stft`); |.| of a
complex number is its modulus; each mean runs over batch, channels, bins and frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bsmamba2_jax import audio

LOSS_WINDOWS = (4096, 2048, 1024, 512, 256)  # Hann window lengths of the STFT terms
LOSS_HOP = 147  # STFT hop of every term (3.33 ms at 44.1 kHz)
LOSS_MIN_NFFT = 2048  # n_fft = max(window, LOSS_MIN_NFFT): short windows get finer bins
WAVEFORM_WEIGHT = 10.0


def separation_loss(estimate: jax.Array, target: jax.Array) -> jax.Array:
    """The training loss of one batch (docs/DESIGN.md#loss-and-recipe).

    Args:
      estimate, target: (batch, 2, samples) real, any float dtype (computed in float32);
        samples > 2048 (reflect padding of the 4096-point STFT needs it).
    Returns:
      float32 scalar.
    """
    if estimate.shape != target.shape or estimate.ndim != 3:
        raise ValueError(f"estimate {estimate.shape} and target {target.shape} must both be "
                         "(batch, channels, samples)")
    diff = estimate.astype(jnp.float32) - target.astype(jnp.float32)
    loss = WAVEFORM_WEIGHT * jnp.mean(jnp.abs(diff))
    for window in LOSS_WINDOWS:
        # The STFT is linear: STFT(s_hat) - STFT(s) = STFT(s_hat - s), one transform not two.
        spec = audio.stft(diff, max(window, LOSS_MIN_NFFT), LOSS_HOP, window_length=window)
        # jnp.abs of complex: the modulus, with a zero (not NaN) gradient at 0, which occurs
        # (silent estimate and target; a hand-written sqrt(re^2 + im^2) would give NaN there).
        loss = loss + jnp.mean(jnp.abs(spec))
    return loss.astype(jnp.float32)
