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
dcs row part) and `chunk_scan_bwd_cols` (grid over column blocks s: dx, ddt, dB). A program
serves one group and loops over its heads, accumulating dB and dC (summed over the group's heads)
in registers: per-head float32 dB, dC would be written and read back at h/g times the bytes.
Layouts as in `kernels.ssd.triton.common`; grids (tile, group, chunk, batch), the first fastest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.ssd.triton.common import SSDBlockSizes, compiler_params, decay_block, dot

f32 = jnp.float32


def _rows_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, block_m: int, heads: int,
                 with_state: bool, interpret: bool):
    """dC rows [t0, t0 + bm) of one chunk and group (summed over its heads); dcs rows per head.

    Refs: x, dy (Q, heads, P); B, C (Q, N); dt, cs (heads, Q); states (heads, P, N)."""
    state_ref, dy_ref, dc_ref, dcs_ref = refs if with_state else (None, *refs)
    it = pl.program_id(0)
    t0 = it * block_m
    rows = pl.ds(t0, block_m)
    c_t = c_ref[rows, :]  # (bm, N)
    mm = c_t.dtype

    def head(jj, dc):
        dy_t = dy_ref[rows, jj, :]  # (bm, P), matmul dtype
        cs_t = cs_ref[jj, rows]
        if with_state:  # the state-to-output term exp(cs_t) C_t H^T
            state = state_ref[jj, :, :].astype(mm)  # (P, N)
            out_decay = jnp.exp(cs_t)
            dc = dc + dot(dy_t, state, interpret=interpret) * out_decay[:, None]  # (bm, N)
            y_off = dot(c_t, state, trans_b=True, interpret=interpret)  # (bm, P)
            dcs = out_decay * jnp.sum(dy_t.astype(f32) * y_off, axis=1)
        else:
            dcs = jnp.zeros((block_m,), f32)

        def body(k, carry):
            dc, dcs = carry
            s0 = k * block_m
            cols = pl.ds(s0, block_m)
            b_s = b_ref[cols, :]
            dyx = dot(dy_t, x_ref[cols, jj, :], trans_b=True, interpret=interpret)  # (bm, bm)
            w = dyx * decay_block(cs_t, cs_ref[jj, cols], t0, s0) * dt_ref[jj, cols][None, :]
            dc = dc + dot(w.astype(mm), b_s, interpret=interpret)
            cb = dot(c_t, b_s, trans_b=True, interpret=interpret)
            return dc, dcs + jnp.sum(w * cb, axis=1)

        dc, dcs = lax.fori_loop(0, it + 1, body, (dc, dcs))
        dcs_ref[jj, :] = dcs
        return dc

    dc_ref[...] = lax.fori_loop(0, heads, head, jnp.zeros(dc_ref.shape, f32))


def _cols_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, block_m: int, n_blocks: int,
                 heads: int, with_state: bool, interpret: bool):
    """dx, ddt per head and dB (summed over the group's heads) for columns [s0, s0 + bm)."""
    if with_state:
        sgrad_ref, dy_ref, dx_ref, db_ref, ddt_intra_ref, ddt_state_ref = refs
    else:
        sgrad_ref, (dy_ref, dx_ref, db_ref, ddt_intra_ref, ddt_state_ref) = None, refs
    is_ = pl.program_id(0)
    s0 = is_ * block_m
    cols = pl.ds(s0, block_m)
    b_s = b_ref[cols, :]  # (bm, N)
    mm = b_s.dtype
    chunk = cs_ref.shape[1]

    def head(jj, db):
        x_s = x_ref[cols, jj, :]  # (bm, P)
        cs_s = cs_ref[jj, cols]
        dt_s = dt_ref[jj, cols]

        def body(k, carry):
            dx_intra, db, ddt_intra = carry
            t0 = k * block_m
            rows = pl.ds(t0, block_m)
            c_t = c_ref[rows, :]
            dy_t = dy_ref[rows, jj, :]
            decay_t = decay_block(cs_ref[jj, rows], cs_s, t0, s0, transposed=True)  # (s, t)
            cb_t = dot(b_s, c_t, trans_b=True, interpret=interpret)  # CB^T
            dx_intra = dx_intra + dot((cb_t * decay_t).astype(mm), dy_t, interpret=interpret)
            dyx_t = dot(x_s, dy_t, trans_b=True, interpret=interpret) * decay_t  # (L (dy.x))^T
            # The same float32 products as the row kernel's M: the row and column parts of dcs
            # cancel to rounding, where x . dx_intra (through a bf16 cast) would leave ~1e-2.
            ddt_intra = ddt_intra + jnp.sum(dyx_t * cb_t, axis=1)
            db = db + dot((dyx_t * dt_s[:, None]).astype(mm), c_t, interpret=interpret)
            return dx_intra, db, ddt_intra

        # Anti-causal: only row blocks from the diagonal down.
        init = (jnp.zeros((block_m, x_s.shape[1]), f32), db, jnp.zeros_like(dt_s))
        dx_intra, db, ddt_intra = lax.fori_loop(is_, n_blocks, body, init)
        ddt_intra_ref[jj, :] = ddt_intra
        if with_state:
            # The chunk-state path, S = sum_s to_end_s dt_s x_s^T B_s (after the loop: fewer
            # registers live in it).
            to_end = jnp.exp(cs_ref[jj, pl.ds(chunk - 1, 1)] - cs_s)  # (bm,)
            sgrad = sgrad_ref[jj, :, :].astype(mm)  # (P, N)
            dx_state = dot(b_s, sgrad, trans_b=True, interpret=interpret) * to_end[:, None]
            db = db + dot(x_s, sgrad, interpret=interpret) * (to_end * dt_s)[:, None]
            dx_ref[:, jj, :] = dt_s[:, None] * (dx_intra + dx_state)
            ddt_state_ref[jj, :] = jnp.sum(x_s.astype(f32) * dx_state, axis=1)
        else:
            dx_ref[:, jj, :] = dt_s[:, None] * dx_intra
            ddt_state_ref[jj, :] = jnp.zeros_like(dt_s)
        return db

    db_ref[...] = lax.fori_loop(0, heads, head, jnp.zeros(db_ref.shape, f32))


def _specs(chunk: int, P: int, N: int, heads: int, with_state: bool):
    """x, B, C, dt, cs, [state or its gradient], dy: one chunk, all heads of one group."""
    head_spec = pl.BlockSpec((None, chunk, heads, P), lambda it, ig, ic, ib: (ib, ic, ig, 0))
    group_spec = pl.BlockSpec((None, chunk, None, N), lambda it, ig, ic, ib: (ib, ic, ig, 0))
    vec_spec = pl.BlockSpec((None, heads, chunk), lambda it, ig, ic, ib: (ib, ig, ic))
    state_spec = pl.BlockSpec((None, None, heads, P, N),
                              lambda it, ig, ic, ib: (ib, ic, ig, 0, 0))
    return [head_spec, group_spec, group_spec, vec_spec, vec_spec,
            *([state_spec] if with_state else []), head_spec]


def chunk_scan_bwd_rows(x, B, C, dt, cs, states, dy, *, chunk: int, blocks: SSDBlockSizes,
                        interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Row-side gradients.

    Args:
      x, dy: (b, L, h, P) matmul dtype. B, C: (b, L, g, N). dt, cs: (b, h, L) float32.
      states: (b, c, h, P, N) float32, the states entering the chunks; None when all are zero.
    Returns:
      dC (b, L, g, N) float32; dcs row part (b, h, L) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    j = h // g
    bm = blocks.block_m
    nb = chunk // bm
    with_state = states is not None
    kernel = functools.partial(_rows_kernel, block_m=bm, heads=j, with_state=with_state,
                               interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(nb, g, L // chunk, b),
        in_specs=_specs(chunk, P, N, j, with_state),
        out_specs=[
            pl.BlockSpec((None, bm, None, N), lambda it, ig, ic, ib: (ib, ic * nb + it, ig, 0)),
            pl.BlockSpec((None, j, bm), lambda it, ig, ic, ib: (ib, ig, ic * nb + it)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, L, g, N), f32),
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
      dx (b, L, h, P) float32, dB (b, L, g, N) float32, and the direct dt gradient's
      intra-chunk and chunk-state parts, each (b, h, L) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    j = h // g
    bm = blocks.block_m
    nb = chunk // bm
    with_state = state_grads is not None
    kernel = functools.partial(_cols_kernel, block_m=bm, n_blocks=nb, heads=j,
                               with_state=with_state, interpret=interpret)
    vec_out = pl.BlockSpec((None, j, bm), lambda it, ig, ic, ib: (ib, ig, ic * nb + it))
    return pl.pallas_call(
        kernel,
        grid=(nb, g, L // chunk, b),
        in_specs=_specs(chunk, P, N, j, with_state),
        out_specs=[
            pl.BlockSpec((None, bm, j, P), lambda it, ig, ic, ib: (ib, ic * nb + it, ig, 0)),
            pl.BlockSpec((None, bm, None, N), lambda it, ig, ic, ib: (ib, ic * nb + it, ig, 0)),
            vec_out, vec_out],
        out_shape=[jax.ShapeDtypeStruct((b, L, h, P), f32),
                   jax.ShapeDtypeStruct((b, L, g, N), f32),
                   jax.ShapeDtypeStruct((b, h, L), f32),
                   jax.ShapeDtypeStruct((b, h, L), f32)],
        compiler_params=compiler_params(blocks.num_warps_scan, blocks.num_stages),
        interpret=interpret,
        name="ssd_chunk_scan_bwd_cols",
    )(x, B, C, dt, cs, *([state_grads] if with_state else []), dy)
