"""The backward of steps 1, 2 and 4 within a chunk, on Mosaic GPU: two kernels.

Within one chunk and head, with L[t, s] = exp(cs_t - cs_s) (s <= t), CB[t, s] = C_t . B_s, H the
state entering the chunk, G = dL/dS the gradient of the chunk's own state contribution
S = sum_s w_s dt_s x_s^T B_s (w_s = exp(cs_last - cs_s)), and dy the output gradient:

  dx_s   = dt_s [ sum_{t>=s} CB[t,s] L[t,s] dy_t + w_s B_s G^T ]
  ddt_s  = x_s . [ the bracket above ]                  (split: intra part, state part)
  dB_s   = sum_{t>=s} L[t,s] dt_s (dy_t . x_s) C_t + w_s dt_s x_s G
  dC_t   = sum_{s<=t} L[t,s] dt_s (dy_t . x_s) B_s + exp(cs_t) dy_t H
  dcs_t  = sum_{s<=t} M[t,s] + exp(cs_t) dy_t . (C_t H^T)    (row part, M = CB L dt (dy.x))
           - dt_t ddt_t                                  (column part, assembled in JAX)

As in the Triton kernels (`kernels.ssd.triton.chunk_scan_bwd`), the work is split by the side of the
(t, s) triangle that a sum runs over, so that every sum stays in one CTA (no atomics):
`chunk_scan_bwd_rows` (one CTA per 64-row block t: dC, dcs row part) and `chunk_scan_bwd_cols`
(one per 64-column block s: dx, ddt, dB). A CTA serves one group and loops over its heads,
accumulating dB or dC (summed over the heads) in registers. The group's tiles are loaded once,
each head's tiles by TMA per head; every product is a wgmma with float32 accumulation, the
masked, scaled scores a register operand. The (s, t) tiles of the column kernel are built in
that orientation (no register transposes). References:
`kernels.ssd.reference.chunk_scan_bwd_rows_reference` and `chunk_scan_bwd_cols_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.ssd.mosaic import common as mc
from kernels.ssd.mosaic.chunk_scan import state_tile
from kernels.ssd.mosaic.common import ROWS, MosaicBlockSizes

f32 = jnp.float32
TILE = (ROWS, ROWS)


def _load_all(copies, bar) -> None:
    """Starts the (source, destination) copies, each on its own barrier, and waits for all."""
    for k, (src, dst) in enumerate(copies):
        mc.copy_in(src, dst, bar.at[k])
    for k in range(len(copies)):
        mc.wait(bar.at[k])


def _rows_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, heads: int, with_state: bool,
                 interpret: bool):
    """dC rows [t0, t0 + 64) of one chunk and group (summed over its heads); dcs rows per head."""
    if with_state:
        state_ref, dy_ref, dc_ref, dcs_ref, *scratch = refs
    else:
        state_ref, (dy_ref, dc_ref, dcs_ref, *scratch) = None, refs
    b_s, c_s, x_s, dy_s, dt_s, cs_s, dc_out, dcs_out, group_bar, head_bar, *state_tiles = scratch
    st32_s, st_s = state_tiles if with_state else (None, None)
    it, ig, ic, ib = (lax.axis_index(a) for a in ("t", "g", "c", "b"))
    Q = x_s.shape[0]
    N = b_s.shape[1]
    t0 = it * ROWS
    chunk_rows, block_rows = pl.ds(ic * Q, Q), pl.ds(ic * Q + t0, ROWS)
    _load_all([(b_ref.at[ib, chunk_rows, ig], b_s), (c_ref.at[ib, block_rows, ig], c_s)],
              group_bar)
    mm = x_s.dtype

    def head(jj, dc):
        ih = ig * heads + jj
        mc.before_refill()
        copies = [(x_ref.at[ib, chunk_rows, ih], x_s), (dy_ref.at[ib, block_rows, ih], dy_s),
                  (dt_ref.at[ib, ih, chunk_rows], dt_s), (cs_ref.at[ib, ih, chunk_rows], cs_s)]
        if with_state:
            copies.append((state_ref.at[ib, ic, ih], st32_s))
        _load_all(copies, head_bar)
        cs_t = mc.load(cs_s.at[pl.ds(t0, ROWS)], mc.row_layout(), interpret=interpret)
        if with_state:  # the state-to-output term exp(cs_t) C_t H^T
            state_tile(st32_s, st_s, interpret=interpret)
            out_decay = jnp.exp(cs_t)
            dc_state = mc.mma(dy_s, st_s, interpret=interpret)  # (64, N)
            dc = dc + dc_state * mc.rows_of(out_decay, dc_state.shape)
            y_off = mc.mma(c_s, st_s, transpose_b=True, interpret=interpret)  # (64, P)
            dy = mc.load(dy_s, mc.WGMMA, interpret=interpret).astype(f32)
            dcs = out_decay * jnp.sum(dy * y_off, axis=1)
        else:
            dcs = mc.zeros((ROWS,), mc.row_layout(), interpret=interpret)

        def block(k, carry):
            dc, dcs = carry
            s0 = k * ROWS
            cols = pl.ds(s0, ROWS)
            cs_k = mc.load(cs_s.at[cols], mc.col_layout(), interpret=interpret)
            dt_k = mc.load(dt_s.at[cols], mc.col_layout(), interpret=interpret)
            dyx = mc.mma(dy_s, x_s.at[cols], transpose_b=True, interpret=interpret)
            w = dyx * mc.decay(cs_t, cs_k, t0, s0, TILE, causal_rows=True,
                               interpret=interpret) * mc.cols_of(dt_k, TILE)
            dc = mc.mma(w.astype(mm), b_s.at[cols], dc, interpret=interpret)
            cb = mc.mma(c_s, b_s.at[cols], transpose_b=True, interpret=interpret)
            return dc, dcs + jnp.sum(w * cb, axis=1)

        dc, dcs = lax.fori_loop(0, it + 1, block, (dc, dcs))
        mc.store_out(dcs, dcs_out, dcs_ref.at[ib, ih, block_rows])
        return dc

    dc = lax.fori_loop(0, heads, head, mc.zeros((ROWS, N), interpret=interpret))
    mc.store_out(dc, dc_out, dc_ref.at[ib, block_rows, ig])
    mc.finish_stores()


def _cols_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, heads: int, with_state: bool,
                 interpret: bool):
    """dx, ddt per head and dB (summed over the group's heads) for columns [s0, s0 + 64)."""
    if with_state:
        sgrad_ref, dy_ref, dx_ref, db_ref, ddt_intra_ref, ddt_state_ref, *scratch = refs
    else:
        sgrad_ref, (dy_ref, dx_ref, db_ref, ddt_intra_ref, ddt_state_ref, *scratch) = None, refs
    (b_s, c_s, x_s, dy_s, dt_s, cs_s, dx_out, db_out, vec_out, group_bar, head_bar,
     *state_tiles) = scratch
    sg32_s, sg_s = state_tiles if with_state else (None, None)
    is_, ig, ic, ib = (lax.axis_index(a) for a in ("s", "g", "c", "b"))
    Q, P = dy_s.shape
    N = b_s.shape[1]
    n_blocks = Q // ROWS
    s0 = is_ * ROWS
    chunk_rows, block_rows = pl.ds(ic * Q, Q), pl.ds(ic * Q + s0, ROWS)
    _load_all([(b_ref.at[ib, block_rows, ig], b_s), (c_ref.at[ib, chunk_rows, ig], c_s)],
              group_bar)
    mm = x_s.dtype

    def head(jj, db):
        ih = ig * heads + jj
        mc.before_refill()
        copies = [(x_ref.at[ib, block_rows, ih], x_s), (dy_ref.at[ib, chunk_rows, ih], dy_s),
                  (dt_ref.at[ib, ih, chunk_rows], dt_s), (cs_ref.at[ib, ih, chunk_rows], cs_s)]
        if with_state:
            copies.append((sgrad_ref.at[ib, ic, ih], sg32_s))
        _load_all(copies, head_bar)
        cs_own = mc.load(cs_s.at[pl.ds(s0, ROWS)], mc.row_layout(), interpret=interpret)
        dt_own = mc.load(dt_s.at[pl.ds(s0, ROWS)], mc.row_layout(), interpret=interpret)

        def block(k, carry):
            dx_intra, db, ddt_intra = carry
            t0 = k * ROWS
            rows = pl.ds(t0, ROWS)
            cs_k = mc.load(cs_s.at[rows], mc.col_layout(), interpret=interpret)
            decay_t = mc.decay(cs_own, cs_k, s0, t0, TILE, causal_rows=False,
                               interpret=interpret)  # (s, t)
            cb_t = mc.mma(b_s, c_s.at[rows], transpose_b=True, interpret=interpret)  # CB^T
            dx_intra = mc.mma((cb_t * decay_t).astype(mm), dy_s.at[rows], dx_intra,
                              interpret=interpret)
            dyx_t = mc.mma(x_s, dy_s.at[rows], transpose_b=True, interpret=interpret) * decay_t
            # The same float32 products as the row kernel's M: the row and column parts of dcs
            # cancel to rounding.
            ddt_intra = ddt_intra + jnp.sum(dyx_t * cb_t, axis=1)
            db = mc.mma((dyx_t * mc.rows_of(dt_own, TILE)).astype(mm), c_s.at[rows], db,
                        interpret=interpret)
            return dx_intra, db, ddt_intra

        # Anti-causal: only row blocks from the diagonal down.
        init = (mc.zeros((ROWS, P), interpret=interpret), db,
                mc.zeros((ROWS,), mc.row_layout(), interpret=interpret))
        dx_intra, db, ddt_intra = lax.fori_loop(is_, n_blocks, block, init)
        mc.store_out(ddt_intra, vec_out.at[0], ddt_intra_ref.at[ib, ih, block_rows])
        if with_state:  # the chunk-state path S = sum_s to_end_s dt_s x_s^T B_s
            to_end = jnp.exp(cs_s[Q - 1] - cs_own)
            state_tile(sg32_s, sg_s, interpret=interpret)
            dx_state = mc.mma(b_s, sg_s, transpose_b=True, interpret=interpret)  # (64, P)
            dx_state = dx_state * mc.rows_of(to_end, dx_state.shape)
            db_state = mc.mma(x_s, sg_s, interpret=interpret)  # (64, N)
            db = db + db_state * mc.rows_of(to_end * dt_own, db_state.shape)
            x = mc.load(x_s, mc.WGMMA, interpret=interpret).astype(f32)
            dx = mc.rows_of(dt_own, dx_intra.shape) * (dx_intra + dx_state)
            ddt_state = jnp.sum(x * dx_state, axis=1)
        else:
            dx = mc.rows_of(dt_own, dx_intra.shape) * dx_intra
            ddt_state = mc.zeros((ROWS,), mc.row_layout(), interpret=interpret)
        mc.store_out(dx, dx_out, dx_ref.at[ib, block_rows, ih])
        mc.store_out(ddt_state, vec_out.at[1], ddt_state_ref.at[ib, ih, block_rows])
        return db

    db = lax.fori_loop(0, heads, head, mc.zeros((ROWS, N), interpret=interpret))
    mc.store_out(db, db_out, db_ref.at[ib, block_rows, ig])
    mc.finish_stores()


def _state_tiles(with_state: bool, P: int, N: int, mm) -> list:
    """The float32 (P, N) state (or state gradient) tile and its matmul-dtype copy."""
    return [mc.tile((P, N), f32), mc.tile((P, N), mm)] if with_state else []


def _call(body, name, axis, out_type, scratch, args, *, chunk, L, g, b):
    kernel = plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch,
        grid=(chunk // ROWS, g, L // chunk, b), grid_names=(axis, "g", "c", "b"),
        compiler_params=mc.compiler_params(), kernel_name=name,
        interpret=mc.kernel_interpret(body.keywords["interpret"]))
    return kernel(*args)


def chunk_scan_bwd_rows(x, B, C, dt, cs, states, dy, *, chunk: int, blocks: MosaicBlockSizes,
                        interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Row-side gradients.

    Args:
      x, dy: (b, L, h, P) matmul dtype. B, C: (b, L, g, N). dt, cs: (b, h, L) float32.
      states: (b, c, h, P, N) float32, the states entering the chunks; None when all are zero.
    Returns:
      dC (b, L, g, N) float32; dcs row part (b, h, L) float32.
    """
    del blocks
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    mm = x.dtype
    with_state = states is not None
    scratch = [mc.tile((chunk, N), mm), mc.tile((ROWS, N), mm), mc.tile((chunk, P), mm),
               mc.tile((ROWS, P), mm), mc.vector((chunk,)), mc.vector((chunk,)),
               mc.tile((ROWS, N), f32), mc.vector((ROWS,)),
               plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=5),
               *_state_tiles(with_state, P, N, mm)]
    body = functools.partial(_rows_kernel, heads=h // g, with_state=with_state,
                             interpret=interpret)
    out_type = [jax.ShapeDtypeStruct((b, L, g, N), f32), jax.ShapeDtypeStruct((b, h, L), f32)]
    args = (x, B, C, dt, cs, *([states] if with_state else []), dy)
    return _call(body, "ssd_chunk_scan_bwd_rows", "t", out_type, scratch, args, chunk=chunk,
                 L=L, g=g, b=b)


def chunk_scan_bwd_cols(x, B, C, dt, cs, state_grads, dy, *, chunk: int,
                        blocks: MosaicBlockSizes, interpret: bool):
    """Column-side gradients.

    Args:
      as `chunk_scan_bwd_rows`, with state_grads (b, c, h, P, N) float32 the gradient of each
      chunk's own state contribution S_c, or None when all are zero.
    Returns:
      dx (b, L, h, P) float32, dB (b, L, g, N) float32, and the direct dt gradient's
      intra-chunk and chunk-state parts, each (b, h, L) float32.
    """
    del blocks
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    mm = x.dtype
    with_state = state_grads is not None
    scratch = [mc.tile((ROWS, N), mm), mc.tile((chunk, N), mm), mc.tile((ROWS, P), mm),
               mc.tile((chunk, P), mm), mc.vector((chunk,)), mc.vector((chunk,)),
               mc.tile((ROWS, P), f32), mc.tile((ROWS, N), f32), mc.vector((2, ROWS)),
               plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=5),
               *_state_tiles(with_state, P, N, mm)]
    body = functools.partial(_cols_kernel, heads=h // g, with_state=with_state,
                             interpret=interpret)
    vec = jax.ShapeDtypeStruct((b, h, L), f32)
    out_type = [jax.ShapeDtypeStruct((b, L, h, P), f32), jax.ShapeDtypeStruct((b, L, g, N), f32),
                vec, vec]
    args = (x, B, C, dt, cs, *([state_grads] if with_state else []), dy)
    return _call(body, "ssd_chunk_scan_bwd_cols", "s", out_type, scratch, args, chunk=chunk,
                 L=L, g=g, b=b)
