"""One chunk of the SSD for a few sequences: forward and hand-written backward, in plain jnp.

`kernels.ssd.xla` loops these over chunks (carrying the state) and over groups of sequences.
For one chunk of Q steps, with X = dt x (the dt-scaled input), cs the within-chunk cumulative
sum of dt A, H the (p, n) state entering the chunk (per head; heads of a group share B and C):

  y_q    = sum_{s<=q} (C_q . B_s) exp(cs_q - cs_s) X_s  +  exp(cs_q) C_q H        (outputs)
  H_next = exp(cs_last) H  +  sum_s exp(cs_last - cs_s) X_s B_s^T                 (state)

Rows are taken in blocks of R (`row_block`). Each block's own R x R diagonal block gets an
explicit per-head decay mask: exp of the difference, capped at 0 above the diagonal so the
masked entries never overflow. For the columns left of the block (s < r0 <= q) the decay
factors through the block boundary r = r0 - 1:

  exp(cs_q - cs_s) = exp(cs_q - cs_r) exp(cs_r - cs_s)

With dt A <= 0 (Mamba2: A < 0, dt > 0) both factors are <= 1: neither overflows, and where one
underflows the exact product is below float32's range too. (With dt A > 0 a factor can overflow
where the product would not; the recurrence itself grows without bound there.) The left part of
the block is then a single matmul over all heads of a group, u * (CB[rows, :r0] @ (v * X[:r0])):
no per-head (Q, Q) tensor is formed, only per-head R x R blocks on the diagonal.

Backward. The matmuls' gradients are matmuls of the same shapes (CB, the decays and the diagonal
blocks are recomputed from the inputs). The gradient of cs needs no (Q, Q) tensor either: each
pair s <= q adds dM_qs M_qs to dcs_q and subtracts it from dcs_s (M the decay-weighted scores,
dM = dy X^T), and summed over s, resp. q, those terms are inner products of vectors we have:

  dcs_t = <dy_t, y_t> - <X_t, dX_t>      (+ at the chunk's last step: the terms of the state
                                           update, <X, dX_state> summed over the chunk and the
                                           decay of H)

where y is the chunk's full output (stored by the forward) and dX the full cotangent of X.

Letters: k sequences, q/s positions in the chunk, g groups, j heads per group (h = g j), p head
dim, n state dim. Inside, arrays are group-major, (k, g, q, ...), and states (k, g, n, j p),
so that C H, B^T X and the blocks left of the diagonal are plain matmuls with a group's heads
side by side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _cumsum(a: jax.Array, reverse: bool = False) -> jax.Array:
    """Inclusive cumulative sum along axis 2 of (k, g, q, j), as a triangular matmul.

    XLA:CPU lowers jnp.cumsum to a slow reduce-window; a (q, q) matmul is cheap and exact to
    float32 rounding (HIGHEST: no TF32 on GPUs, the decays are exponentials of it).
    """
    q = a.shape[2]
    tri = jnp.tril(jnp.ones((q, q), f32))  # tri[t, s] = s <= t
    return jnp.einsum("ts,kgsj->kgtj", tri.T if reverse else tri, a,
                      precision=jax.lax.Precision.HIGHEST)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., M, K) @ (..., K, N) -> (..., M, N) float32, batched over the leading axes.

    Every matmul is written in this form, with an explicit transpose of the smaller operand
    where one is needed: from einsum, XLA:CPU sometimes transposed the (q, h p) operand and
    the result instead (measured ~1.4x slower on such a product).
    """
    batch = tuple(range(a.ndim - 2))
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                               preferred_element_type=f32)


def _t(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def _causal(size: int) -> jax.Array:
    return jnp.tril(jnp.ones((size, size), bool))


def _diag_decay(cs_t: jax.Array, r0: int, r1: int) -> jax.Array:
    """exp(cs_q - cs_s) on the diagonal block [r0, r1)^2, 1 above the diagonal: (k, g, j, r, r).

    cs_t: (k, g, j, q) float32. The difference is capped at 0 above the diagonal (a min against
    a constant: XLA:CPU vectorises it, unlike where(mask, seg, -inf)).
    """
    causal = _causal(r1 - r0)
    seg = cs_t[..., r0:r1, None] - cs_t[..., None, r0:r1]
    return jnp.exp(jnp.minimum(seg, jnp.where(causal, jnp.inf, 0.0)))


def _boundary_decays(cs: jax.Array, r0: int, r1: int) -> tuple[jax.Array, jax.Array]:
    """u = exp(cs_q - cs_r) for rows [r0, r1) and v = exp(cs_r - cs_s) for s < r0, r = r0 - 1.

    cs: (k, g, q, j). Returns u (k, g, r1 - r0, j, 1) and v (k, g, r0, j, 1), both <= 1 when
    dt A <= 0, shaped to scale (k, g, rows, j, p) arrays.
    """
    ref = cs[:, :, r0 - 1:r0]
    return jnp.exp(cs[:, :, r0:r1] - ref)[..., None], jnp.exp(ref - cs[:, :, :r0])[..., None]


def _heads_major(a: jax.Array) -> jax.Array:
    """(k, g, rows, j, p) -> (k, g, j, rows, p), for the per-head diagonal blocks."""
    return a.transpose(0, 1, 3, 2, 4)


def _pad_sum(parts: list[tuple[int, jax.Array]], length: int) -> jax.Array:
    """Sum of (start, piece) pairs placed at `start` along axis 2 of a `length`-long array."""
    out = None
    for start, t in parts:
        widths = [(0, 0)] * t.ndim
        widths[2] = (start, length - start - t.shape[2])
        t = jnp.pad(t, widths)
        out = t if out is None else out + t
    return out


def _group_major(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """(k, q, g, ...) -> (k, g, q, ...): a bitcast when g = 1."""
    return tuple(jnp.swapaxes(a, 1, 2) for a in arrays)


def chunk_forward(x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array, A: jax.Array,
                  H: jax.Array | None, row_block: int, with_state_out: bool
                  ) -> tuple[jax.Array, jax.Array | None]:
    """Outputs and leaving state of one chunk.

    Args:
      x: (k, q, g, j, p). dt: (k, q, g, j) float32. B, C: (k, q, g, n). A: (g, j) float32.
      H: (k, g, n, j p) float32 state entering the chunk, or None for a zero state.
      row_block: R, rows per block. with_state_out: also return the state after the chunk.
    Returns:
      y (k, q, g, j, p) float32, and H_next (k, g, n, j p) float32 or None.
    """
    k, q, g, j, p = x.shape
    mm = x.dtype  # matmul operands stay in the input dtype; accumulation is float32
    x, dt, B, C = _group_major(x, dt, B, C)  # (k, g, q, ...)
    cs = _cumsum(dt * A[:, None])  # (k, g, q, j)
    X = x.astype(f32) * dt[..., None]  # (k, g, q, j, p)
    cb = _mm(C, _t(B))  # (k, g, q, s)
    cs_t = _t(cs)  # (k, g, j, q)
    flat = lambda a: a.reshape(*a.shape[:3], j * p).astype(mm)  # (k, g, rows, j p)
    rows = []
    for r0 in range(0, q, row_block):
        r1 = min(r0 + row_block, q)
        scores = ((cb[:, :, r0:r1, r0:r1] * _causal(r1 - r0))[:, :, None]
                  * _diag_decay(cs_t, r0, r1))  # (k, g, j, r, r)
        y_r = _heads_major(_mm(scores.astype(mm), _heads_major(X[:, :, r0:r1]).astype(mm)))
        if r0:
            u, v = _boundary_decays(cs, r0, r1)
            left = _mm(cb[:, :, r0:r1, :r0].astype(mm), flat(X[:, :, :r0] * v))
            y_r = y_r + u * left.reshape(y_r.shape)
        rows.append(y_r)
    y = jnp.concatenate(rows, axis=2) if len(rows) > 1 else rows[0]  # (k, g, q, j, p)
    if H is not None:
        y = y + _mm(C.astype(mm), H.astype(mm)).reshape(y.shape) * jnp.exp(cs)[..., None]
    y = jnp.swapaxes(y, 1, 2)  # (k, q, g, j, p)
    if not with_state_out:
        return y, None
    to_end = jnp.exp(cs[:, :, -1:] - cs)[..., None]  # (k, g, q, j, 1)
    H_next = _mm(_t(B), flat(X * to_end))  # (k, g, n, j p)
    if H is not None:
        decay = jnp.exp(cs[:, :, -1])  # (k, g, j)
        H_next = H_next + (jnp.repeat(decay, p, axis=-1)[:, :, None] * H)
    return y, H_next


def chunk_backward(x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array, A: jax.Array,
                   H: jax.Array | None, y: jax.Array, dy: jax.Array, dH_next: jax.Array | None,
                   row_block: int) -> tuple[jax.Array, ...]:
    """Cotangents of `chunk_forward`.

    Args: as `chunk_forward`, plus y (k, q, g, j, p) float32, its output, dy the cotangent of y
      (float32, same shape), and dH_next (k, g, n, j p) float32, the cotangent of the leaving
      state, or None where it is zero (the leaving state was not asked for, or is unused).
    Returns:
      dx (k, q, g, j, p) in x.dtype; ddt (k, q, g, j), dB, dC (k, q, g, n), dA (k, g, j) and
      dH (k, g, n, j p), the cotangent of the entering state (None if H is None): float32.
    """
    k, q, g, j, p = x.shape
    mm = x.dtype
    x, dt, B, C, y, dy = _group_major(x, dt, B, C, y, dy)  # (k, g, q, ...)
    cs = _cumsum(dt * A[:, None])
    X = x.astype(f32) * dt[..., None]  # (k, g, q, j, p)
    cb = _mm(C, _t(B))
    cs_t = _t(cs)
    flat = lambda a: a.reshape(*a.shape[:3], j * p).astype(mm)
    Bm, Cm = B.astype(mm), C.astype(mm)
    dX_parts, dC_parts, dB_parts = [], [], []  # (start along q, piece)
    d_last = None  # extra dcs of the last step, (k, g, j)
    dH = None
    per_head = lambda d: jnp.repeat(d, p, axis=-1)[:, :, None]  # (k, g, j) -> (k, g, 1, j p)

    if H is not None:  # y += exp(cs) C H
        dy_decayed = flat(dy * jnp.exp(cs)[..., None])
        dC_parts.append((0, _mm(dy_decayed, _t(H).astype(mm))))
        dH = _mm(_t(Cm), dy_decayed)
    if dH_next is not None:  # H_next = exp(cs_last) H + B^T (exp(cs_last - cs) X)
        to_end = jnp.exp(cs[:, :, -1:] - cs)[..., None]
        dH_next_m = dH_next.astype(mm)
        dX_state = _mm(Bm, dH_next_m).reshape(X.shape) * to_end
        dB_parts.append((0, _mm(flat(X * to_end), _t(dH_next_m))))
        dX_parts.append((0, dX_state))
        d_last = jnp.einsum("kgqjp,kgqjp->kgj", X, dX_state)
        if H is not None:
            decay = jnp.exp(cs[:, :, -1])  # (k, g, j)
            d_last = d_last + jnp.einsum("kgnjp,kgnjp->kgj", dH_next.reshape(k, g, -1, j, p),
                                         H.reshape(k, g, -1, j, p)) * decay
            dH = dH + per_head(decay) * dH_next

    for r0 in range(0, q, row_block):
        r1 = min(r0 + row_block, q)
        causal = _causal(r1 - r0)
        decay = _diag_decay(cs_t, r0, r1)
        scores = (cb[:, :, r0:r1, r0:r1] * causal)[:, :, None] * decay  # (k, g, j, r, r)
        dy_h = _heads_major(dy[:, :, r0:r1]).astype(mm)  # (k, g, j, r, p)
        dX_parts.append((r0, _heads_major(_mm(_t(scores).astype(mm), dy_h))))
        d_scores = _mm(dy_h, _t(_heads_major(X[:, :, r0:r1])).astype(mm))  # (k, g, j, r, r)
        dcb_rows = jnp.einsum("kgjqs,kgjqs->kgqs", d_scores, decay) * causal  # (k, g, r, r)
        if r0:
            u, v = _boundary_decays(cs, r0, r1)
            dy_u = flat(dy[:, :, r0:r1] * u)  # (k, g, r, j p)
            X_v = flat(X[:, :, :r0] * v)  # (k, g, r0, j p)
            dX_v = _mm(_t(cb[:, :, r0:r1, :r0]).astype(mm), dy_u)  # (k, g, r0, j p)
            dX_parts.append((0, dX_v.reshape(*X_v.shape[:3], j, p) * v))
            dcb_left = _t(_mm(X_v, _t(dy_u)))  # (k, g, r, r0); transposes the smaller dy_u
            dcb_rows = jnp.concatenate([dcb_left, dcb_rows], axis=-1)  # (k, g, r, r1)
        dcb_rows = dcb_rows.astype(mm)
        dC_parts.append((r0, _mm(dcb_rows, Bm[:, :, :r1])))
        dB_parts.append((0, _mm(_t(dcb_rows), Cm[:, :, r0:r1])))

    dX = _pad_sum(dX_parts, q)  # (k, g, q, j, p)
    # Inner products over p as einsums: XLA:CPU runs sum(a * b, -1) several times slower here.
    x_dX = jnp.einsum("kgqjp,kgqjp->kgqj", x.astype(f32), dX)  # <X, dX> = dt <x, dX>
    dcs = jnp.einsum("kgqjp,kgqjp->kgqj", dy, y) - dt * x_dX
    if d_last is not None:
        dcs = dcs.at[:, :, -1].add(d_last)
    da = _cumsum(dcs, reverse=True)  # cotangent of dt * A
    ddt = da * A[:, None] + x_dX
    dA = jnp.einsum("kgqj,kgqj->kgj", da, dt)
    dx = (dX * dt[..., None]).astype(x.dtype)
    dB, dC = _pad_sum(dB_parts, q), _pad_sum(dC_parts, q)
    dx, ddt, dB, dC = _group_major(dx, ddt, dB, dC)  # back to (k, q, g, ...)
    return dx, ddt, dB, dC, dA, dH
