"""Steps 1 and 4 of the chunked SSD on Pallas Triton: every output of a chunk.

    y_t = exp(cs_t) C_t H^T  +  sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s

One program per (row block, head, chunk, sequence), both parts fused in one accumulator; layouts
in `kernels.ssd.triton.common`. Reference: `kernels.ssd.reference.chunk_scan_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.ssd.triton.common import SSDBlockSizes, compiler_params, decay_block, dot

f32 = jnp.float32

def _chunk_scan_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, *refs, block_m: int,
                       with_state: bool, interpret: bool):
    """y rows [t0, t0 + bm) of one chunk and head: state-to-output plus intra-chunk sum."""
    state_ref, y_ref = refs if with_state else (None, *refs)
    it = pl.program_id(0)
    t0 = it * block_m
    rows = pl.ds(t0, block_m)
    c_t = c_ref[rows, :]  # (bm, N)
    cs_t = cs_ref[rows]  # (bm,)
    mm = c_t.dtype
    if with_state:  # state -> output: exp(cs_t) C_t H^T, H the state entering the chunk
        acc = dot(c_t, state_ref[...].astype(mm), trans_b=True, interpret=interpret)
        acc = acc * jnp.exp(cs_t)[:, None]  # (bm, P)
    else:
        acc = jnp.zeros(y_ref.shape, f32)

    def body(k, acc):
        s0 = k * block_m
        cols = pl.ds(s0, block_m)
        cb = dot(c_t, b_ref[cols, :], trans_b=True, interpret=interpret)  # (bm, bm)
        scores = cb * decay_block(cs_t, cs_ref[cols], t0, s0) * dt_ref[cols][None, :]
        return acc + dot(scores.astype(mm), x_ref[cols, :], interpret=interpret)

    # Causal: only column blocks up to the diagonal.
    acc = lax.fori_loop(0, it + 1, body, acc)
    y_ref[...] = acc


def chunk_scan(x: jax.Array, B: jax.Array, C: jax.Array, dt: jax.Array, cs: jax.Array,
               states: jax.Array | None, *, chunk: int, blocks: SSDBlockSizes,
               interpret: bool) -> jax.Array:
    """Outputs of every chunk given the states entering them.

    Args:
      x: (b, L, h, P). B, C: (b, L, g, N). dt, cs: (b, h, L) float32.
      states: (b, c, h, P, N) float32, the state entering each chunk; None when all are zero
        (one chunk, no initial state: the kernel then reads no state at all).
    Returns:
      y (b, L, h, P) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    j = h // g
    c = L // chunk
    bm = blocks.block_m
    nb = chunk // bm
    chunk_spec = lambda d, heads: pl.BlockSpec(
        (None, chunk, None, d), lambda it, ih, ic, ib: (ib, ic, ih // heads, 0))
    vec_spec = pl.BlockSpec((None, None, chunk), lambda it, ih, ic, ib: (ib, ih, ic))
    in_specs = [chunk_spec(P, 1), chunk_spec(N, j), chunk_spec(N, j), vec_spec, vec_spec]
    operands = [x, B, C, dt, cs]
    if states is not None:
        in_specs.append(pl.BlockSpec((None, None, None, P, N),
                                     lambda it, ih, ic, ib: (ib, ic, ih, 0, 0)))
        operands.append(states)
    kernel = functools.partial(_chunk_scan_kernel, block_m=bm, with_state=states is not None,
                               interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(nb, h, c, b),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, None, P),
                               lambda it, ih, ic, ib: (ib, ic * nb + it, ih, 0)),
        out_shape=jax.ShapeDtypeStruct((b, L, h, P), f32),
        compiler_params=compiler_params(blocks.num_warps_scan, blocks.num_stages),
        interpret=interpret,
        name="ssd_chunk_scan",
    )(*operands)
