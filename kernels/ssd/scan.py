"""The SSD recurrence, one step at a time with `lax.scan`: the slow, obviously-right reference.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h: (b, h, p, n)
    y_t = C_t h_t                                     y: (b, h, p)

Letters: b batch, l sequence, h heads, p head dim, g groups, n state dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ssd_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             chunk_size: int, initial_states: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Sequential SSD in float32.

    Args:
      x: (b, l, h, p). dt: (b, l, h) float32, already biased/softplus'd. A: (h,).
      B, C: (b, l, g, n). chunk_size: unused (the recurrence has no chunks).
      initial_states: (b, h, p, n) or None (zeros).
    Returns:
      y (b, l, h, p) float32 without the D skip, final state (b, h, p, n) float32.
    """
    del chunk_size
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    f32 = jnp.float32
    # Broadcast each group to its heads: head i reads group i // (h // g).
    B = jnp.repeat(B.astype(f32), h // g, axis=2)  # (b, l, h, n)
    C = jnp.repeat(C.astype(f32), h // g, axis=2)  # (b, l, h, n)
    x = x.astype(f32)
    A = A.astype(f32)
    state0 = jnp.zeros((b, h, p, n), f32) if initial_states is None else initial_states.astype(f32)

    def step(state, inputs):
        x_t, dt_t, B_t, C_t = inputs  # (b,h,p) (b,h) (b,h,n) (b,h,n)
        decay = jnp.exp(dt_t * A)[:, :, None, None]
        state = decay * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t)
        return state, y_t

    time_major = lambda t: jnp.moveaxis(t, 1, 0)
    final, y = jax.lax.scan(step, state0, (time_major(x), time_major(dt), time_major(B),
                                           time_major(C)))
    return jnp.moveaxis(y, 0, 1), final
