"""Chunk states fused with the inter-chunk state passing (Pallas, Triton backend).

One program per (p-block, head, batch) walks the chunks in order and keeps the running state in
registers, so the per-chunk states S_c never go to memory: only the state entering each chunk is
written (the chunk scan needs it). The reverse kernel walks the chunks backwards for the backward
pass. This trades parallelism (b*h*P/bp programs instead of b*c*h*P/bp) for bytes, so
`kernels.ssd.pallas` uses it only when there are enough programs to fill the GPU.

  forward   H_0 = init;  H_{c+1} = exp(cs_last,c) H_c + sum_s exp(cs_last,c - cs_s) dt_s x_s^T B_s
  backward  G = dL/dH_C;  for c descending: dL/dS_c = G,  d decay_c = <G, H_c>,
            G = sum_t exp(cs_t) dy_t^T C_t + exp(cs_last,c) G;   dL/dH_0 = G

Layouts as in `kernels.ssd.triton.common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.ssd.triton.common import SSDBlockSizes, compiler_params, dot

f32 = jnp.float32


def _weighted_sum(u_ref, v_ref, weight, base, chunk: int, block_m: int, shape, interpret):
    """sum over the chunk's rows of (u * weight(rows))^T V, block_m rows at a time."""
    def body(k, acc):
        rows = pl.ds(base + k * block_m, block_m)
        u = u_ref[rows, :]
        uw = (u.astype(f32) * weight(rows)[:, None]).astype(u.dtype)
        return acc + dot(uw, v_ref[rows, :], trans_a=True, interpret=interpret)

    return lax.fori_loop(0, chunk // block_m, body, jnp.zeros(shape, f32))


def _passing_fwd_kernel(x_ref, b_ref, dt_ref, cs_ref, *refs, chunk: int, n_chunks: int,
                        block_m: int, with_init: bool, interpret: bool):
    init_ref, states_ref, final_ref = refs if with_init else (None, *refs)
    shape = final_ref.shape  # (bp, N)

    def step(ic, state):
        base = ic * chunk
        last = cs_ref[pl.ds(base + chunk - 1, 1)]  # (1,)
        weight = lambda rows: jnp.exp(last - cs_ref[rows]) * dt_ref[rows]
        new = _weighted_sum(x_ref, b_ref, weight, base, chunk, block_m, shape, interpret)
        states_ref[ic, :, :] = state
        return jnp.exp(last)[:, None] * state + new

    state0 = init_ref[...] if with_init else jnp.zeros(shape, f32)
    final_ref[...] = lax.fori_loop(0, n_chunks, step, state0)


def state_passing_fwd(x, B, dt, cs, init, *, chunk: int, blocks: SSDBlockSizes,
                      interpret: bool) -> tuple[jax.Array, jax.Array]:
    """States entering each chunk and the final state.

    Args:
      x: (b, L, h, P). B: (b, L, g, N). dt, cs: (b, h, L) float32. init: (b, h, P, N) float32
        or None (zeros).
    Returns:
      states (b, c, h, P, N) float32, final (b, h, P, N) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    j = h // g
    c = L // chunk
    bp = blocks.block_p
    state_spec = pl.BlockSpec((None, None, bp, N), lambda ip, ih, ib: (ib, ih, ip, 0))
    in_specs = [
        pl.BlockSpec((None, L, None, bp), lambda ip, ih, ib: (ib, 0, ih, ip)),
        pl.BlockSpec((None, L, None, N), lambda ip, ih, ib: (ib, 0, ih // j, 0)),
        pl.BlockSpec((None, None, L), lambda ip, ih, ib: (ib, ih, 0)),
        pl.BlockSpec((None, None, L), lambda ip, ih, ib: (ib, ih, 0)),
    ]
    operands = [x, B, dt, cs]
    if init is not None:
        in_specs.append(state_spec)
        operands.append(init)
    kernel = functools.partial(_passing_fwd_kernel, chunk=chunk, n_chunks=c,
                               block_m=blocks.block_m, with_init=init is not None,
                               interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(P // bp, h, b),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, c, None, bp, N), lambda ip, ih, ib: (ib, 0, ih, ip, 0)),
                   state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, c, h, P, N), f32),
                   jax.ShapeDtypeStruct((b, h, P, N), f32)],
        compiler_params=compiler_params(blocks.num_warps_state, blocks.num_stages),
        interpret=interpret,
        name="ssd_state_passing",
    )(*operands)


def _passing_bwd_kernel(dy_ref, c_ref, cs_ref, states_ref, *refs, chunk: int, n_chunks: int,
                        block_m: int, with_final: bool, interpret: bool):
    dfinal_ref, sgrads_ref, ddecay_ref, dinit_ref = refs if with_final else (None, *refs)
    shape = dinit_ref.shape  # (bp, N)

    def step(k, grad):
        ic = n_chunks - 1 - k
        base = ic * chunk
        last = cs_ref[pl.ds(base + chunk - 1, 1)]  # (1,)
        sgrads_ref[ic, :, :] = grad
        # Partial over this program's p-block; summed over p-blocks in JAX.
        d_decay = jnp.sum(grad * states_ref[ic, :, :])
        ddecay_ref[pl.ds(ic, 1)] = jnp.full((1,), d_decay, f32)
        weight = lambda rows: jnp.exp(cs_ref[rows])
        out = _weighted_sum(dy_ref, c_ref, weight, base, chunk, block_m, shape, interpret)
        return out + jnp.exp(last)[:, None] * grad

    grad0 = dfinal_ref[...] if with_final else jnp.zeros(shape, f32)
    dinit_ref[...] = lax.fori_loop(0, n_chunks, step, grad0)


def state_passing_bwd(dy, C, cs, states, d_final, *, chunk: int, blocks: SSDBlockSizes,
                      interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reverse state passing.

    Args:
      dy: (b, L, h, P) output gradient (matmul dtype). C: (b, L, g, N). cs: (b, h, L) float32.
      states: (b, c, h, P, N) float32 entering states. d_final: (b, h, P, N) float32 or None.
    Returns:
      gradients of each chunk's own contribution S_c (b, c, h, P, N), of each chunk's decay
      exp(cs_last) (b, h, c), and of the initial state (b, h, P, N); all float32.
    """
    b, L, h, P = dy.shape
    g, N = C.shape[2], C.shape[3]
    j = h // g
    c = L // chunk
    bp = blocks.block_p
    state_spec = pl.BlockSpec((None, None, bp, N), lambda ip, ih, ib: (ib, ih, ip, 0))
    states_spec = pl.BlockSpec((None, c, None, bp, N), lambda ip, ih, ib: (ib, 0, ih, ip, 0))
    in_specs = [
        pl.BlockSpec((None, L, None, bp), lambda ip, ih, ib: (ib, 0, ih, ip)),
        pl.BlockSpec((None, L, None, N), lambda ip, ih, ib: (ib, 0, ih // j, 0)),
        pl.BlockSpec((None, None, L), lambda ip, ih, ib: (ib, ih, 0)),
        states_spec,
    ]
    operands = [dy, C, cs, states]
    if d_final is not None:
        in_specs.append(state_spec)
        operands.append(d_final)
    kernel = functools.partial(_passing_bwd_kernel, chunk=chunk, n_chunks=c,
                               block_m=blocks.block_m, with_final=d_final is not None,
                               interpret=interpret)
    s_grads, d_decay, d_init = pl.pallas_call(
        kernel,
        grid=(P // bp, h, b),
        in_specs=in_specs,
        out_specs=[states_spec,
                   pl.BlockSpec((None, None, None, c), lambda ip, ih, ib: (ib, ih, ip, 0)),
                   state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, c, h, P, N), f32),
                   jax.ShapeDtypeStruct((b, h, P // bp, c), f32),
                   jax.ShapeDtypeStruct((b, h, P, N), f32)],
        compiler_params=compiler_params(blocks.num_warps_state, blocks.num_stages),
        interpret=interpret,
        name="ssd_state_passing_bwd",
    )(*operands)
    return s_grads, d_decay.sum(axis=2), d_init
