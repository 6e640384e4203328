"""Backward Pallas kernels of the chunked SSD (Triton backend).

Within one chunk and head, with L[t, s] = exp(cs_t - cs_s) (s <= t), CB[t, s] = C_t . B_s,
H the state entering the chunk, G = dL/dS the gradient of the chunk's own state contribution
S = sum_s w_s dt_s x_s^T B_s (w_s = exp(cs_last - cs_s)), and dy the output gradient:

  dx_s   = dt_s [ sum_{t>=s} CB[t,s] L[t,s] dy_t + w_s B_s G^T ]
  ddt_s  = x_s . [ the bracket above ]                  (split: intra part, state part)
  dB_s   = sum_{t>=s} L[t,s] dt_s (dy_t . x_s) C_t + w_s dt_s x_s G
  dC_t   = sum_{s<=t} L[t,s] dt_s (dy_t . x_s) B_s + exp(cs_t) dy_t H
  dcs_t  = sum_{s<=t} M[t,s] + exp(cs_t) dy_t . (C_t H^T)    (row part, M = CB L dt (dy.x))
           - dt_t ddt_t                                  (column part, assembled in JAX)

Two kernels split the work by the side of the (t, s) triangle that a sum runs over, so that every
sum stays inside one program (no atomics): `chunk_scan_bwd_rows` (grid over row blocks t: dC,
dcs row part) and `chunk_scan_bwd_cols` (grid over column blocks s: dx, ddt, dB). dB and dC come
out per head (b, L, h, N) and are summed over a group's heads in JAX.
Layouts as in `kernels.ssd.pallas_fwd`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.ssd.pallas_fwd import SSDBlockSizes, compiler_params, decay_block, dot

f32 = jnp.float32


def _rows_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, block_m: int, with_state: bool,
                 interpret: bool):
    state_ref, dy_ref, dc_ref, dcs_ref = refs if with_state else (None, *refs)
    it = pl.program_id(0)
    t0 = it * block_m
    rows = pl.ds(t0, block_m)
    c_t = c_ref[rows, :]  # (bm, N)
    dy_t = dy_ref[rows, :]  # (bm, P), matmul dtype
    cs_t = cs_ref[rows]
    mm = c_t.dtype
    if with_state:  # the state-to-output term exp(cs_t) C_t H^T
        state = state_ref[...].astype(mm)  # (P, N)
        out_decay = jnp.exp(cs_t)
        dc = dot(dy_t, state, interpret=interpret) * out_decay[:, None]  # (bm, N)
        y_off = dot(c_t, state, trans_b=True, interpret=interpret)  # (bm, P)
        dcs = out_decay * jnp.sum(dy_t.astype(f32) * y_off, axis=1)
    else:
        dc = jnp.zeros(dc_ref.shape, f32)
        dcs = jnp.zeros(dcs_ref.shape, f32)

    def body(k, carry):
        dc, dcs = carry
        s0 = k * block_m
        cols = pl.ds(s0, block_m)
        b_s = b_ref[cols, :]
        dyx = dot(dy_t, x_ref[cols, :], trans_b=True, interpret=interpret)  # (bm_t, bm_s)
        w = dyx * decay_block(cs_t, cs_ref[cols], t0, s0) * dt_ref[cols][None, :]
        dc = dc + dot(w.astype(mm), b_s, interpret=interpret)
        cb = dot(c_t, b_s, trans_b=True, interpret=interpret)
        return dc, dcs + jnp.sum(w * cb, axis=1)

    dc, dcs = lax.fori_loop(0, it + 1, body, (dc, dcs))
    dc_ref[...] = dc
    dcs_ref[...] = dcs


def _cols_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, block_m: int, n_blocks: int,
                 with_state: bool, interpret: bool):
    if with_state:
        sgrad_ref, dy_ref, dx_ref, db_ref, ddt_intra_ref, ddt_state_ref = refs
    else:
        sgrad_ref, (dy_ref, dx_ref, db_ref, ddt_intra_ref, ddt_state_ref) = None, refs
    is_ = pl.program_id(0)
    s0 = is_ * block_m
    cols = pl.ds(s0, block_m)
    b_s = b_ref[cols, :]  # (bm, N)
    x_s = x_ref[cols, :]  # (bm, P)
    cs_s = cs_ref[cols]
    dt_s = dt_ref[cols]
    mm = b_s.dtype

    def body(k, carry):
        dx_intra, db, ddt_intra = carry
        t0 = k * block_m
        rows = pl.ds(t0, block_m)
        c_t = c_ref[rows, :]
        dy_t = dy_ref[rows, :]
        decay_t = decay_block(cs_ref[rows], cs_s, t0, s0, transposed=True)  # (bm_s, bm_t)
        cb_t = dot(b_s, c_t, trans_b=True, interpret=interpret)  # CB^T
        dx_intra = dx_intra + dot((cb_t * decay_t).astype(mm), dy_t, interpret=interpret)
        dyx_t = dot(x_s, dy_t, trans_b=True, interpret=interpret) * decay_t  # (L (dy . x))^T
        # The same float32 products as the row kernel's M: the row and column parts of dcs
        # cancel to rounding, where x . dx_intra (through a bf16 cast) would leave ~1e-2.
        ddt_intra = ddt_intra + jnp.sum(dyx_t * cb_t, axis=1)
        db = db + dot((dyx_t * dt_s[:, None]).astype(mm), c_t, interpret=interpret)
        return dx_intra, db, ddt_intra

    # Anti-causal: only row blocks from the diagonal down.
    init = (jnp.zeros(dx_ref.shape, f32), jnp.zeros(db_ref.shape, f32), jnp.zeros_like(dt_s))
    dx_intra, db, ddt_intra = lax.fori_loop(is_, n_blocks, body, init)
    ddt_intra_ref[...] = ddt_intra
    if with_state:
        # The chunk-state path, S = sum_s to_end_s dt_s x_s^T B_s (after the loop: fewer
        # registers live in it).
        chunk = cs_ref.shape[0]
        to_end = jnp.exp(cs_ref[pl.ds(chunk - 1, 1)] - cs_s)  # (bm,)
        sgrad = sgrad_ref[...].astype(mm)  # (P, N)
        dx_state = dot(b_s, sgrad, trans_b=True, interpret=interpret) * to_end[:, None]
        db = db + dot(x_s, sgrad, interpret=interpret) * (to_end * dt_s)[:, None]
        dx_ref[...] = dt_s[:, None] * (dx_intra + dx_state)
        ddt_state_ref[...] = jnp.sum(x_s.astype(f32) * dx_state, axis=1)
    else:
        dx_ref[...] = dt_s[:, None] * dx_intra
        ddt_state_ref[...] = jnp.zeros_like(dt_s)
    db_ref[...] = db


def _specs(chunk: int, P: int, N: int, j: int, with_state: bool):
    chunk_spec = lambda d, heads: pl.BlockSpec(
        (None, chunk, None, d), lambda it, ih, ic, ib: (ib, ic, ih // heads, 0))
    vec_spec = pl.BlockSpec((None, None, chunk), lambda it, ih, ic, ib: (ib, ih, ic))
    state_spec = pl.BlockSpec((None, None, None, P, N), lambda it, ih, ic, ib: (ib, ic, ih, 0, 0))
    # x, B, C, dt, cs, [state or its gradient], dy
    return [chunk_spec(P, 1), chunk_spec(N, j), chunk_spec(N, j), vec_spec, vec_spec,
            *([state_spec] if with_state else []), chunk_spec(P, 1)]


def chunk_scan_bwd_rows(x, B, C, dt, cs, states, dy, *, chunk: int, blocks: SSDBlockSizes,
                        interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Row-side gradients.

    Args:
      x, dy: (b, L, h, P) matmul dtype. B, C: (b, L, g, N). dt, cs: (b, h, L) float32.
      states: (b, c, h, P, N) float32, the states entering the chunks; None when all are zero.
    Returns:
      dC per head (b, L, h, N) float32; dcs row part (b, h, L) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    bm = blocks.block_m
    nb = chunk // bm
    with_state = states is not None
    kernel = functools.partial(_rows_kernel, block_m=bm, with_state=with_state,
                               interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(nb, h, L // chunk, b),
        in_specs=_specs(chunk, P, N, h // g, with_state),
        out_specs=[
            pl.BlockSpec((None, bm, None, N), lambda it, ih, ic, ib: (ib, ic * nb + it, ih, 0)),
            pl.BlockSpec((None, None, bm), lambda it, ih, ic, ib: (ib, ih, ic * nb + it)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, L, h, N), f32),
                   jax.ShapeDtypeStruct((b, h, L), f32)],
        compiler_params=compiler_params(blocks.num_warps_scan, blocks.num_stages),
        interpret=interpret,
        name="ssd_chunk_scan_bwd_rows",
    )(x, B, C, dt, cs, *([states] if with_state else []), dy)


def chunk_scan_bwd_cols(x, B, C, dt, cs, state_grads, dy, *, chunk: int, blocks: SSDBlockSizes,
                        interpret: bool):
    """Column-side gradients.

    Args:
      as `chunk_scan_bwd_rows`, with state_grads (b, c, h, P, N) float32 the gradient of each
      chunk's own state contribution S_c (= the gradient of the state leaving the chunk), or
      None when all are zero.
    Returns:
      dx (b, L, h, P) float32, dB per head (b, L, h, N) float32, and the direct dt gradient's
      intra-chunk and chunk-state parts, each (b, h, L) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    bm = blocks.block_m
    nb = chunk // bm
    with_state = state_grads is not None
    kernel = functools.partial(_cols_kernel, block_m=bm, n_blocks=nb, with_state=with_state,
                               interpret=interpret)
    row_out = lambda d: pl.BlockSpec((None, bm, None, d),
                                     lambda it, ih, ic, ib: (ib, ic * nb + it, ih, 0))
    vec_out = pl.BlockSpec((None, None, bm), lambda it, ih, ic, ib: (ib, ih, ic * nb + it))
    return pl.pallas_call(
        kernel,
        grid=(nb, h, L // chunk, b),
        in_specs=_specs(chunk, P, N, h // g, with_state),
        out_specs=[row_out(P), row_out(N), vec_out, vec_out],
        out_shape=[jax.ShapeDtypeStruct((b, L, h, P), f32),
                   jax.ShapeDtypeStruct((b, L, h, N), f32),
                   jax.ShapeDtypeStruct((b, h, L), f32),
                   jax.ShapeDtypeStruct((b, h, L), f32)],
        compiler_params=compiler_params(blocks.num_warps_scan, blocks.num_stages),
        interpret=interpret,
        name="ssd_chunk_scan_bwd_cols",
    )(x, B, C, dt, cs, *([state_grads] if with_state else []), dy)
