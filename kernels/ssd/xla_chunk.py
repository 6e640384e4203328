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
dim, n state dim. States are kept as (k, g, n, j, p) so that C H and B^T X are plain matmuls
with the heads of a group side by side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _cumsum(a: jax.Array, reverse: bool = False) -> jax.Array:
    """Inclusive cumulative sum along axis 1 of (k, q, ...), as a triangular matmul.

    XLA:CPU lowers jnp.cumsum to a slow reduce-window; a (q, q) matmul is cheap and exact to
    float32 rounding (HIGHEST: no TF32 on GPUs, the decays are exponentials of it).
    """
    q = a.shape[1]
    tri = jnp.tril(jnp.ones((q, q), f32))  # tri[t, s] = s <= t
    return jnp.einsum("ts,ks...->kt...", tri.T if reverse else tri, a,
                      precision=jax.lax.Precision.HIGHEST)


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

    cs: (k, q, g, j). Returns u (k, r1 - r0, g, j) and v (k, r0, g, j), both <= 1 if dt A <= 0.
    """
    ref = cs[:, r0 - 1:r0]
    return jnp.exp(cs[:, r0:r1] - ref), jnp.exp(ref - cs[:, :r0])


def _pad_sum(parts: list[tuple[int, jax.Array]], length: int) -> jax.Array:
    """Sum of (start, piece) pairs placed at `start` along axis 1 of a `length`-long array."""
    out = None
    for start, t in parts:
        t = jnp.pad(t, [(0, 0), (start, length - start - t.shape[1])] + [(0, 0)] * (t.ndim - 2))
        out = t if out is None else out + t
    return out


def chunk_forward(x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array, A: jax.Array,
                  H: jax.Array | None, row_block: int, with_state_out: bool
                  ) -> tuple[jax.Array, jax.Array | None]:
    """Outputs and leaving state of one chunk.

    Args:
      x: (k, q, g, j, p). dt: (k, q, g, j) float32. B, C: (k, q, g, n). A: (g, j) float32.
      H: (k, g, n, j, p) float32 state entering the chunk, or None for a zero state.
      row_block: R, rows per block. with_state_out: also return the state after the chunk.
    Returns:
      y (k, q, g, j, p) float32, and H_next (k, g, n, j, p) float32 or None.
    """
    q = x.shape[1]
    mm = x.dtype  # matmul operands stay in the input dtype; accumulation is float32
    cs = _cumsum(dt * A)  # (k, q, g, j)
    X = x.astype(f32) * dt[..., None]  # (k, q, g, j, p)
    cb = jnp.einsum("kqgn,ksgn->kgqs", C, B, preferred_element_type=f32)  # (k, g, q, s)
    cs_t = cs.transpose(0, 2, 3, 1)  # (k, g, j, q)
    rows = []
    for r0 in range(0, q, row_block):
        r1 = min(r0 + row_block, q)
        scores = ((cb[:, :, r0:r1, r0:r1] * _causal(r1 - r0))[:, :, None]
                  * _diag_decay(cs_t, r0, r1))  # (k, g, j, r, r)
        y_r = jnp.einsum("kgjqs,ksgjp->kqgjp", scores.astype(mm), X[:, r0:r1].astype(mm),
                         preferred_element_type=f32)
        if r0:
            u, v = _boundary_decays(cs, r0, r1)
            left = jnp.einsum("kgqs,ksgjp->kqgjp", cb[:, :, r0:r1, :r0].astype(mm),
                              (X[:, :r0] * v[..., None]).astype(mm), preferred_element_type=f32)
            y_r = y_r + u[..., None] * left
        rows.append(y_r)
    y = jnp.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]
    if H is not None:
        y_state = jnp.einsum("kqgn,kgnjp->kqgjp", C, H.astype(mm), preferred_element_type=f32)
        y = y + y_state * jnp.exp(cs)[..., None]
    if not with_state_out:
        return y, None
    to_end = jnp.exp(cs[:, -1:] - cs)  # (k, q, g, j)
    H_next = jnp.einsum("kqgn,kqgjp->kgnjp", B, (X * to_end[..., None]).astype(mm),
                        preferred_element_type=f32)
    if H is not None:
        H_next = H_next + jnp.exp(cs[:, -1])[:, :, None, :, None] * H
    return y, H_next


def chunk_backward(x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array, A: jax.Array,
                   H: jax.Array | None, y: jax.Array, dy: jax.Array, dH_next: jax.Array | None,
                   row_block: int) -> tuple[jax.Array, ...]:
    """Cotangents of `chunk_forward`.

    Args: as `chunk_forward`, plus y (k, q, g, j, p) float32, its output, dy the cotangent of y
      (float32, same shape), and dH_next (k, g, n, j, p) float32, the cotangent of the leaving
      state, or None where it is zero (the leaving state was not asked for, or is unused).
    Returns:
      dx (k, q, g, j, p) in x.dtype; ddt (k, q, g, j), dB, dC (k, q, g, n), dA (k, g, j) and
      dH (k, g, n, j, p), the cotangent of the entering state (None if H is None): float32.
    """
    q = x.shape[1]
    mm = x.dtype
    cs = _cumsum(dt * A)
    X = x.astype(f32) * dt[..., None]
    Xm = X.astype(mm)
    cb = jnp.einsum("kqgn,ksgn->kgqs", C, B, preferred_element_type=f32)
    cs_t = cs.transpose(0, 2, 3, 1)
    dym = dy.astype(mm)
    dX_parts, dC_parts, dB_parts = [], [], []  # (start along q, piece)
    d_last = None  # extra dcs of the last step, (k, g, j)
    dH = None

    if H is not None:  # y += exp(cs) C H
        dy_decayed = (dy * jnp.exp(cs)[..., None]).astype(mm)
        dC_parts.append((0, jnp.einsum("kqgjp,kgnjp->kqgn", dy_decayed, H.astype(mm),
                                       preferred_element_type=f32)))
        dH = jnp.einsum("kqgn,kqgjp->kgnjp", C, dy_decayed, preferred_element_type=f32)
    if dH_next is not None:  # H_next = exp(cs_last) H + B^T (exp(cs_last - cs) X)
        to_end = jnp.exp(cs[:, -1:] - cs)
        dH_next_m = dH_next.astype(mm)
        dX_state = jnp.einsum("kqgn,kgnjp->kqgjp", B, dH_next_m,
                              preferred_element_type=f32) * to_end[..., None]
        dB_parts.append((0, jnp.einsum("kqgjp,kgnjp->kqgn", (X * to_end[..., None]).astype(mm),
                                       dH_next_m, preferred_element_type=f32)))
        dX_parts.append((0, dX_state))
        d_last = jnp.einsum("kqgjp,kqgjp->kgj", X, dX_state)
        if H is not None:
            decay = jnp.exp(cs[:, -1])  # (k, g, j)
            d_last = d_last + jnp.einsum("kgnjp,kgnjp->kgj", dH_next, H) * decay
            dH = dH + decay[:, :, None, :, None] * dH_next

    for r0 in range(0, q, row_block):
        r1 = min(r0 + row_block, q)
        causal = _causal(r1 - r0)
        decay = _diag_decay(cs_t, r0, r1)
        scores = (cb[:, :, r0:r1, r0:r1] * causal)[:, :, None] * decay
        dy_r = dym[:, r0:r1]
        dX_parts.append((r0, jnp.einsum("kgjqs,kqgjp->ksgjp", scores.astype(mm), dy_r,
                                        preferred_element_type=f32)))
        d_scores = jnp.einsum("kqgjp,ksgjp->kgjqs", dy_r, Xm[:, r0:r1],
                              preferred_element_type=f32)
        dcb_rows = jnp.einsum("kgjqs,kgjqs->kgqs", d_scores, decay) * causal  # (k, g, r, r)
        if r0:
            u, v = _boundary_decays(cs, r0, r1)
            dy_u = (dy[:, r0:r1] * u[..., None]).astype(mm)
            X_v = (X[:, :r0] * v[..., None]).astype(mm)
            dX_v = jnp.einsum("kgqs,kqgjp->ksgjp", cb[:, :, r0:r1, :r0].astype(mm), dy_u,
                              preferred_element_type=f32)
            dX_parts.append((0, dX_v * v[..., None]))
            dcb_left = jnp.einsum("kqgjp,ksgjp->kgqs", dy_u, X_v, preferred_element_type=f32)
            dcb_rows = jnp.concatenate([dcb_left, dcb_rows], axis=-1)  # (k, g, r, r1)
        dcb_rows = dcb_rows.astype(mm)
        dC_parts.append((r0, jnp.einsum("kgqs,ksgn->kqgn", dcb_rows, B[:, :r1],
                                        preferred_element_type=f32)))
        dB_parts.append((0, jnp.einsum("kgqs,kqgn->ksgn", dcb_rows, C[:, r0:r1],
                                       preferred_element_type=f32)))

    dX = _pad_sum(dX_parts, q)
    # Inner products over p as einsums: XLA:CPU runs sum(a * b, -1) several times slower here.
    dcs = jnp.einsum("kqgjp,kqgjp->kqgj", dy, y) - jnp.einsum("kqgjp,kqgjp->kqgj", X, dX)
    if d_last is not None:
        dcs = dcs.at[:, -1].add(d_last)
    da = _cumsum(dcs, reverse=True)  # cotangent of dt * A
    ddt = da * A + jnp.einsum("kqgjp,kqgjp->kqgj", x.astype(f32), dX)
    dA = jnp.einsum("kqgj,kqgj->kgj", da, dt)
    dx = (dX * dt[..., None]).astype(x.dtype)
    return dx, ddt, _pad_sum(dB_parts, q), _pad_sum(dC_parts, q), dA, dH
