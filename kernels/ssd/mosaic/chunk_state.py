"""Step 2 of the chunked SSD on Mosaic GPU: each chunk's own state contribution.

    S_c[p, n] = sum_s u[s, p] w_s V[s, n]      w = exp(cs_last - cs) dt   (to_end: the forward)
                                               w = exp(cs)                (the backward's
                                                  output-state gradient: u = dy, V = C)

One CTA per (head, chunk, sequence), one warpgroup: TMA brings the chunk's u (Q, P) and V
(Q, N) tiles and dt, cs into shared memory; the weights scale u in registers (float32, then the
matmul dtype) into a second tile, and one wgmma forms (u w)^T V (P x N, K = Q, u read
transposed). Reference: `kernels.ssd.reference.chunk_state_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.ssd.mosaic import common as mc
from kernels.ssd.mosaic.common import MosaicBlockSizes

f32 = jnp.float32


def weights(cs_s, dt_s, last, layout, *, to_end: bool, interpret: bool) -> jax.Array:
    """(m,) weights of m rows of a chunk from their cs and dt (shared memory) and the chunk's
    last cs (a scalar): exp(last - cs) dt, or exp(cs)."""
    cs = mc.load(cs_s, layout, interpret=interpret)
    if not to_end:
        return jnp.exp(cs)
    return jnp.exp(last - cs) * mc.load(dt_s, layout, interpret=interpret)


def weighted_product(u_s, v_s, uw_s, cs_s, dt_s, last, acc, *, to_end: bool,
                     interpret: bool) -> jax.Array:
    """acc + (u * w)^T V for m rows of a chunk in shared memory: u (m, P), V (m, N), their cs
    and dt (m,), the chunk's last cs; uw_s an (m, P) scratch tile. Returns (P, N) float32
    (WGMMA layout)."""
    w = weights(cs_s, dt_s, last, mc.row_layout(), to_end=to_end, interpret=interpret)
    u = mc.load(u_s, mc.WGMMA, interpret=interpret).astype(f32)
    mc.to_smem((u * mc.rows_of(w, u.shape)).astype(uw_s.dtype), uw_s)
    return mc.mma(uw_s, v_s, acc, transpose_a=True, interpret=interpret)


def _kernel(u_ref, v_ref, dt_ref, cs_ref, out_ref, u_s, v_s, uw_s, dt_s, cs_s, out_s, bar, *,
            heads_per_group: int, to_end: bool, interpret: bool):
    ih, ic, ib = (lax.axis_index(a) for a in ("h", "c", "b"))
    Q = u_s.shape[0]
    rows = pl.ds(ic * Q, Q)
    mc.copy_in(u_ref.at[ib, rows, ih], u_s, bar.at[0])
    mc.copy_in(v_ref.at[ib, rows, ih // heads_per_group], v_s, bar.at[1])
    mc.copy_in(dt_ref.at[ib, ih, rows], dt_s, bar.at[2])
    mc.copy_in(cs_ref.at[ib, ih, rows], cs_s, bar.at[3])
    for k in range(4):
        mc.wait(bar.at[k])
    s = weighted_product(u_s, v_s, uw_s, cs_s, dt_s, cs_s[Q - 1], None, to_end=to_end,
                         interpret=interpret)
    mc.store_out(s, out_s, out_ref.at[ib, ic, ih])
    mc.finish_stores()


def chunk_state(u: jax.Array, v: jax.Array, dt: jax.Array, cs: jax.Array, *, chunk: int,
                to_end: bool, blocks: MosaicBlockSizes, interpret: bool) -> jax.Array:
    """Per-chunk sum_s w_s u_s^T V_s.

    Args:
      u: (b, L, h, P) (x, or the output gradient), matmul dtype. v: (b, L, g, N) (B, or C).
      dt, cs: (b, h, L) float32. to_end: w = exp(cs_last - cs) dt if True, else exp(cs).
    Returns:
      (b, c, h, P, N) float32.
    """
    del blocks
    b, L, h, P = u.shape
    g, N = v.shape[2], v.shape[3]
    c = L // chunk
    mm = u.dtype
    kernel = plgpu.kernel(
        functools.partial(_kernel, heads_per_group=h // g, to_end=to_end, interpret=interpret),
        out_type=jax.ShapeDtypeStruct((b, c, h, P, N), f32),
        scratch_types=[mc.tile((chunk, P), mm), mc.tile((chunk, N), mm), mc.tile((chunk, P), mm),
                       mc.vector((chunk,)), mc.vector((chunk,)), mc.tile((P, N), f32),
                       plgpu.Barrier(num_barriers=4)],
        grid=(h, c, b), grid_names=("h", "c", "b"),
        compiler_params=mc.compiler_params(), interpret=mc.kernel_interpret(interpret),
        kernel_name="ssd_chunk_state" if to_end else "ssd_output_state_grad")
    return kernel(u, v, dt, cs)
