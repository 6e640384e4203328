"""Step 2 of the chunked SSD on Pallas Triton: each chunk's own state contribution.

    S_c[p, n] = sum_s u[s, p] w_s V[s, n]      w = exp(cs_last - cs) dt   (to_end: the forward)
                                               w = exp(cs)                (the backward's
                                                  output-state gradient: u = dy, V = C)

One program per (p-block, head, chunk, sequence); layouts in `kernels.ssd.triton.common`.
Reference: `kernels.ssd.reference.chunk_state_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.ssd.triton.common import SSDBlockSizes, compiler_params, dot

f32 = jnp.float32

def _chunk_state_kernel(u_ref, v_ref, dt_ref, cs_ref, out_ref, *, to_end: bool, block_m: int,
                        interpret: bool):
    """out (bp, N) = (u * w)^T V over one chunk; u (Q, bp), V (Q, N), dt and cs (Q,).

    The chunk is consumed block_m rows at a time: small shared-memory tiles (a whole f32 chunk
    of V would not fit an A100's) that Triton can pipeline."""
    chunk = cs_ref.shape[0]
    last = cs_ref[pl.ds(chunk - 1, 1)]

    def body(k, acc):
        rows = pl.ds(k * block_m, block_m)
        cs = cs_ref[rows]
        if to_end:  # decay from each step to the chunk's end, times the step size
            w = jnp.exp(last - cs) * dt_ref[rows]
        else:  # decay from the chunk's start to each step
            w = jnp.exp(cs)
        u = u_ref[rows, :]
        uw = (u.astype(f32) * w[:, None]).astype(u.dtype)
        return acc + dot(uw, v_ref[rows, :], trans_a=True, interpret=interpret)

    acc = jnp.zeros(out_ref.shape, f32)
    out_ref[...] = lax.fori_loop(0, chunk // block_m, body, acc)


def chunk_state(u: jax.Array, v: jax.Array, dt: jax.Array, cs: jax.Array, *, chunk: int,
                to_end: bool, blocks: SSDBlockSizes, interpret: bool) -> jax.Array:
    """Per-chunk sum_s w_s u_s^T V_s.

    Args:
      u: (b, L, h, P) (x, or the output gradient). v: (b, L, g, N) (B, or C).
      dt, cs: (b, h, L) float32. to_end: w = exp(cs_last - cs) dt if True, else exp(cs).
    Returns:
      (b, c, h, P, N) float32.
    """
    b, L, h, P = u.shape
    g, N = v.shape[2], v.shape[3]
    j = h // g
    c = L // chunk
    bp = blocks.block_p
    kernel = functools.partial(_chunk_state_kernel, to_end=to_end, block_m=blocks.block_m,
                               interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(P // bp, h, c, b),
        in_specs=[
            pl.BlockSpec((None, chunk, None, bp), lambda ip, ih, ic, ib: (ib, ic, ih, ip)),
            pl.BlockSpec((None, chunk, None, N), lambda ip, ih, ic, ib: (ib, ic, ih // j, 0)),
            pl.BlockSpec((None, None, chunk), lambda ip, ih, ic, ib: (ib, ih, ic)),
            pl.BlockSpec((None, None, chunk), lambda ip, ih, ic, ib: (ib, ih, ic)),
        ],
        out_specs=pl.BlockSpec((None, None, None, bp, N),
                               lambda ip, ih, ic, ib: (ib, ic, ih, ip, 0)),
        out_shape=jax.ShapeDtypeStruct((b, c, h, P, N), f32),
        compiler_params=compiler_params(blocks.num_warps_state, blocks.num_stages),
        interpret=interpret,
        name="ssd_chunk_state" if to_end else "ssd_output_state_grad",
    )(u, v, dt, cs)


