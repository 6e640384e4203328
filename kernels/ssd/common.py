"""Argument checks and the element-wise pre/post steps shared by every SSD implementation.

Letters: b batch, l sequence, c chunk, h heads, p head dim, g groups, n state dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_args(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
               initial_states=None) -> None:
    """Validates the shapes of `mamba_chunk_scan`'s arguments; raises ValueError naming the culprit.

    Shapes: x, z (b, l, h, p); dt (b, l, h); A, dt_bias (h,); B, C (b, l, g, n); D (h,) or (h, p);
    initial_states (b, h, p, n).
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (batch, seqlen, nheads, headdim), got {x.shape}")
    b, l, h, p = x.shape
    if l < 1:
        raise ValueError(f"x has seqlen={l}; the sequence must hold at least one step")
    if B.ndim != 4:
        raise ValueError(f"B must have shape (batch, seqlen, ngroups, dstate), got {B.shape}")
    g, n = B.shape[2], B.shape[3]
    if B.shape[:2] != (b, l):
        raise ValueError(f"B has (batch, seqlen)={B.shape[:2]} but x has {(b, l)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {B.shape}, got {C.shape}")
    if g < 1 or h % g != 0:
        raise ValueError(f"nheads={h} must be a multiple of ngroups={g} (B.shape[2])")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must have shape (batch, seqlen, nheads)={(b, l, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must have shape (nheads,)={(h,)}, got {A.shape}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must have shape (nheads,)={(h,)} or (nheads, headdim)={(h, p)}, "
                         f"got {D.shape}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {x.shape}, got {z.shape}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must have shape (nheads,)={(h,)}, got {dt_bias.shape}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"initial_states must have shape (batch, nheads, headdim, dstate)="
                         f"{(b, h, p, n)}, got {initial_states.shape}")


def prepare_dt(dt: jax.Array, dt_bias: jax.Array | None, dt_softplus: bool) -> jax.Array:
    """dt (b, l, h) -> float32 step sizes, with the bias and softplus applied when asked.

    Kept in float32 whatever the input dtype: bf16 softplus/cumsum is where Mamba2 NaNs start.
    """
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def skip_and_gate(y: jax.Array, x: jax.Array, D: jax.Array | None,
                  z: jax.Array | None) -> jax.Array:
    """y (b, l, h, p) float32 -> (y + D x) * silu(z), cast to x.dtype."""
    if D is not None:
        d = D.astype(jnp.float32)
        d = d[:, None] if d.ndim == 1 else d  # (h, 1) or (h, p)
        y = y + x.astype(jnp.float32) * d
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)
