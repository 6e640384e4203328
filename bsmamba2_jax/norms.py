"""The BS-RoFormer-family RMSNorm, shared by the band split, the final norm and the transformer.

The authors' code (EuiYeonKim/BSMamba2 `src/model/bs_model.py`, `RMSNorm`) normalises with
`F.normalize(x) * sqrt(dim) * gamma` everywhere outside the Mamba2 mixers (those use mamba_ssm's
standard RMSNorm, `bsmamba2_jax/mamba2.py`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def l2_rms_norm(x: jax.Array, gamma: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) * sqrt(dim) * gamma over the last axis, in float32.

    The BS-RoFormer-family RMSNorm (F.normalize * sqrt(dim) * gamma) used by the authors outside
    the Mamba2 mixers.
    """
    x = x.astype(jnp.float32)
    # sqrt(max(|x|^2, eps^2)) == max(|x|, eps), but its gradient stays finite at x = 0 (a silent
    # band, a padding sequence): sqrt's derivative at 0 is infinite, and inf * 0 = NaN.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
    return x / norm * math.sqrt(x.shape[-1]) * gamma.astype(jnp.float32)


class L2RMSNorm(nn.Module):
    """`l2_rms_norm` with a learned gamma (init 1) over the last axis."""

    param_dtype: Dtype = jnp.float32  # storage dtype of gamma

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d) -> (..., d) float32."""
        gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return l2_rms_norm(x, gamma)
