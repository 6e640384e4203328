"""Steps 1 and 4 of the chunked SSD on Mosaic GPU: every output of a chunk.

    y_t = exp(cs_t) C_t H^T  +  sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s

H is the state entering the chunk (none: one chunk and no initial state). One CTA per (64-row
block of the chunk, head, chunk, sequence), one warpgroup. TMA brings the block's C rows, the
chunk's B and x tiles, dt, cs and the float32 state into shared memory; the state is cast to the
matmul dtype once (a second tile) and wgmma forms C_t H^T (H read transposed). The intra-chunk
part walks the column blocks up to the diagonal (causal: the upper triangle is never computed):
C_t B_s^T on wgmma, the decay and dt applied in registers, then the scores (a register operand)
times x_s on wgmma into the same float32 accumulator. Reference:
`kernels.ssd.reference.chunk_scan_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.ssd.mosaic import common as mc
from kernels.ssd.mosaic.common import ROWS, MosaicBlockSizes

f32 = jnp.float32


def state_tile(state_f32_s, state_s, *, interpret: bool) -> None:
    """The float32 state tile (shared memory) -> its matmul-dtype copy for wgmma."""
    h = mc.load(state_f32_s, mc.WGMMA, interpret=interpret)
    mc.to_smem(h.astype(state_s.dtype), state_s)


def intra_chunk(c_t_s, b_s, x_s, dt_s, cs_s, cs_t, t0, n_blocks, acc, *, interpret: bool):
    """acc + sum over column blocks k < n_blocks of scores(t, s) x_s, for the rows t0.. of the
    (ROWS, N) tile c_t_s; cs_t (ROWS,) in the row layout. Returns (ROWS, P) float32."""
    shape = (ROWS, ROWS)

    def block(k, acc):
        s0 = k * ROWS
        cols = pl.ds(s0, ROWS)
        cb = mc.mma(c_t_s, b_s.at[cols], transpose_b=True, interpret=interpret)
        cs_s_k = mc.load(cs_s.at[cols], mc.col_layout(), interpret=interpret)
        dt_k = mc.load(dt_s.at[cols], mc.col_layout(), interpret=interpret)
        w = mc.decay(cs_t, cs_s_k, t0, s0, shape, causal_rows=True, interpret=interpret)
        scores = (cb * w * mc.cols_of(dt_k, shape)).astype(x_s.dtype)
        return mc.mma(scores, x_s.at[cols], acc, interpret=interpret)

    return lax.fori_loop(0, n_blocks, block, acc)


def _kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, heads_per_group: int, with_state: bool,
            interpret: bool):
    if with_state:
        state_ref, y_ref, x_s, b_s, c_s, dt_s, cs_s, st32_s, st_s, y_s, bar = refs
    else:
        state_ref, (y_ref, x_s, b_s, c_s, dt_s, cs_s, y_s, bar) = None, refs
    it, ih, ic, ib = (lax.axis_index(a) for a in ("t", "h", "c", "b"))
    Q, P = x_s.shape
    ig = ih // heads_per_group
    chunk_rows = pl.ds(ic * Q, Q)
    t0 = it * ROWS
    mc.copy_in(x_ref.at[ib, chunk_rows, ih], x_s, bar.at[0])
    mc.copy_in(b_ref.at[ib, chunk_rows, ig], b_s, bar.at[1])
    mc.copy_in(c_ref.at[ib, pl.ds(ic * Q + t0, ROWS), ig], c_s, bar.at[2])
    mc.copy_in(dt_ref.at[ib, ih, chunk_rows], dt_s, bar.at[3])
    mc.copy_in(cs_ref.at[ib, ih, chunk_rows], cs_s, bar.at[4])
    if with_state:
        mc.copy_in(state_ref.at[ib, ic, ih], st32_s, bar.at[5])
    for k in range(6 if with_state else 5):
        mc.wait(bar.at[k])
    cs_t = mc.load(cs_s.at[pl.ds(t0, ROWS)], mc.row_layout(), interpret=interpret)
    if with_state:  # state -> output: exp(cs_t) C_t H^T
        state_tile(st32_s, st_s, interpret=interpret)
        y_off = mc.mma(c_s, st_s, transpose_b=True, interpret=interpret)
        acc = y_off * mc.rows_of(jnp.exp(cs_t), y_off.shape)
    else:
        acc = mc.zeros((ROWS, P), interpret=interpret)
    acc = intra_chunk(c_s, b_s, x_s, dt_s, cs_s, cs_t, t0, it + 1, acc, interpret=interpret)
    mc.store_out(acc, y_s, y_ref.at[ib, pl.ds(ic * Q + t0, ROWS), ih])
    mc.finish_stores()


def chunk_scan(x: jax.Array, B: jax.Array, C: jax.Array, dt: jax.Array, cs: jax.Array,
               states: jax.Array | None, *, chunk: int, blocks: MosaicBlockSizes,
               interpret: bool) -> jax.Array:
    """Outputs of every chunk given the states entering them.

    Args:
      x: (b, L, h, P). B, C: (b, L, g, N) in x's dtype. dt, cs: (b, h, L) float32.
      states: (b, c, h, P, N) float32, the state entering each chunk; None when all are zero.
    Returns:
      y (b, L, h, P) float32.
    """
    del blocks
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    c = L // chunk
    mm = x.dtype
    with_state = states is not None
    scratch = [mc.tile((chunk, P), mm), mc.tile((chunk, N), mm), mc.tile((ROWS, N), mm),
               mc.vector((chunk,)), mc.vector((chunk,))]
    if with_state:
        scratch += [mc.tile((P, N), f32), mc.tile((P, N), mm)]
    scratch += [mc.tile((ROWS, P), f32), plgpu.Barrier(num_barriers=6 if with_state else 5)]
    kernel = plgpu.kernel(
        functools.partial(_kernel, heads_per_group=h // g, with_state=with_state,
                          interpret=interpret),
        out_type=jax.ShapeDtypeStruct((b, L, h, P), f32),
        scratch_types=scratch,
        grid=(chunk // ROWS, h, c, b), grid_names=("t", "h", "c", "b"),
        compiler_params=mc.compiler_params(), interpret=mc.kernel_interpret(interpret),
        kernel_name="ssd_chunk_scan")
    return kernel(x, B, C, dt, cs, *([states] if with_state else []))
