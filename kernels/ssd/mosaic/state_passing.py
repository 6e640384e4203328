"""Step 3 of the chunked SSD on Mosaic GPU, fused with step 2: the states entering each chunk.

    forward   H_0 = init;  H_{c+1} = exp(cs_last,c) H_c + sum_s exp(cs_last,c - cs_s) dt_s x_s^T B_s
    backward  G = dL/dH_C;  for c descending: dL/dS_c = G,  d decay_c = <G, H_c>,
              G = sum_t exp(cs_t) dy_t^T C_t + exp(cs_last,c) G;   dL/dH_0 = G

One CTA per (head, sequence) owns the chunk loop, so the running state stays in registers (a
(P, N) float32 wgmma accumulator) and the per-chunk S_c never reach memory: only the state
entering each chunk is written (the chunk scan reads it). Warp-specialised: a producer
warpgroup streams each chunk's tiles into `stages` shared-memory buffers by TMA while the
consumer warpgroup computes on the previous ones; per buffer, one barrier per tile says it has
landed and one says the consumer released it (`common.wait_free` / `common.release`). This
trades parallelism (b*h CTAs instead of b*c*h) for bytes: `kernels.ssd.pallas` uses it when
there are enough CTAs. References: `kernels.ssd.reference.state_passing_fwd_reference` and
`state_passing_bwd_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.ssd.mosaic import common as mc
from kernels.ssd.mosaic.chunk_state import weighted_product
from kernels.ssd.mosaic.common import MosaicBlockSizes

f32 = jnp.float32
CONSUMER, PRODUCER = 0, 1


def _produce(n_chunks: int, stages: int, reverse: bool, sources, buffers, loaded, free):
    """The producer warpgroup: chunk k's tiles into buffer k % stages, once it is free.

    sources: functions chunk -> global ref view, one per tile; buffers: the (stages, ...)
    shared tiles; loaded: one barrier array per tile."""
    @pl.loop(0, n_chunks)
    def _(k):
        ic = n_chunks - 1 - k if reverse else k
        slot = lax.rem(k, stages)

        @pl.when(k >= stages)
        def _():
            mc.wait_free(free.at[slot])

        for source, buffer, bar in zip(sources, buffers, loaded, strict=True):
            mc.copy_in(source(ic), buffer.at[slot], bar.at[slot])

    # Observe the last releases too: every barrier phase is consumed before the CTA exits.
    for k in range(max(n_chunks - stages, 0), n_chunks):
        mc.wait_free(free.at[k % stages])


def _fwd_kernel(x_ref, b_ref, dt_ref, cs_ref, *refs, heads_per_group: int, stages: int,
                with_init: bool, interpret: bool):
    if with_init:
        init_ref, states_ref, final_ref, *scratch = refs
    else:
        init_ref, (states_ref, final_ref, *scratch) = None, refs
    x_s, b_s, dt_s, cs_s, uw_s, out_s, init_s, loaded, free, init_bar = scratch
    ih, ib, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    Q, P = uw_s.shape
    N = b_s.shape[-1]
    n_chunks = x_ref.shape[1] // Q
    ig = ih // heads_per_group
    rows = lambda ic: pl.ds(ic * Q, Q)

    @pl.when(wg == PRODUCER)
    def _():
        sources = (lambda ic: x_ref.at[ib, rows(ic), ih], lambda ic: b_ref.at[ib, rows(ic), ig],
                   lambda ic: dt_ref.at[ib, ih, rows(ic)], lambda ic: cs_ref.at[ib, ih, rows(ic)])
        _produce(n_chunks, stages, False, sources, (x_s, b_s, dt_s, cs_s), loaded, free)

    @pl.when(wg == CONSUMER)
    def _():
        if with_init:
            mc.copy_in(init_ref.at[ib, ih], init_s, init_bar.at[0])
            mc.wait(init_bar.at[0])
            state0 = mc.load(init_s, mc.WGMMA, interpret=interpret)
        else:
            state0 = mc.zeros((P, N), interpret=interpret)

        def chunk(ic, state):
            slot = lax.rem(ic, stages)
            for bar in loaded:
                mc.wait(bar.at[slot])
            mc.store_out(state, out_s, states_ref.at[ib, ic, ih])
            cs, dt = cs_s.at[slot], dt_s.at[slot]
            decayed = state * jnp.exp(cs[Q - 1])
            state = weighted_product(x_s.at[slot], b_s.at[slot], uw_s, cs, dt, decayed,
                                     to_end=True, interpret=interpret)
            mc.release(free.at[slot])
            return state

        final = lax.fori_loop(0, n_chunks, chunk, state0)
        mc.store_out(final, out_s, final_ref.at[ib, ih])
        mc.finish_stores()


def _pipeline_scratch(stages: int, chunk: int, tiles, P: int, N: int, mm):
    """Buffers (stages, ...) for each streamed tile, the scaled-operand tile, a float32 (P, N)
    output tile, a float32 (P, N) tile for the initial value, and the barriers."""
    buffers = [mc.tile((stages, *shape), dtype) if len(shape) == 2 else
               mc.vector((stages, *shape)) for shape, dtype in tiles]
    return [*buffers, mc.tile((chunk, P), mm), mc.tile((P, N), f32), mc.tile((P, N), f32),
            [plgpu.Barrier(num_barriers=stages) for _ in tiles],
            plgpu.Barrier(num_arrivals=1, num_barriers=stages), plgpu.Barrier(num_barriers=1)]


def state_passing_fwd(x, B, dt, cs, init, *, chunk: int, blocks: MosaicBlockSizes,
                      interpret: bool) -> tuple[jax.Array, jax.Array]:
    """States entering each chunk and the final state.

    Args:
      x: (b, L, h, P). B: (b, L, g, N) in x's dtype. dt, cs: (b, h, L) float32.
      init: (b, h, P, N) float32 or None (zeros).
    Returns:
      states (b, c, h, P, N) float32, final (b, h, P, N) float32.
    """
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    c = L // chunk
    mm = x.dtype
    stages = blocks.stages
    tiles = [((chunk, P), mm), ((chunk, N), mm), ((chunk,), f32), ((chunk,), f32)]
    with_init = init is not None
    kernel = plgpu.kernel(
        functools.partial(_fwd_kernel, heads_per_group=h // g, stages=stages,
                          with_init=with_init, interpret=interpret),
        out_type=[jax.ShapeDtypeStruct((b, c, h, P, N), f32),
                  jax.ShapeDtypeStruct((b, h, P, N), f32)],
        scratch_types=_pipeline_scratch(stages, chunk, tiles, P, N, mm),
        grid=(h, b), grid_names=("h", "b"), num_threads=2, thread_name="wg",
        compiler_params=mc.compiler_params(), interpret=mc.kernel_interpret(interpret),
        kernel_name="ssd_state_passing")
    return kernel(x, B, dt, cs, *([init] if with_init else []))


def _bwd_kernel(dy_ref, c_ref, cs_ref, states_ref, *refs, heads_per_group: int, stages: int,
                with_final: bool, interpret: bool):
    if with_final:
        dfinal_ref, sgrads_ref, ddecay_ref, dinit_ref, *scratch = refs
    else:
        dfinal_ref, (sgrads_ref, ddecay_ref, dinit_ref, *scratch) = None, refs
    dy_s, c_s, cs_s, st_s, uw_s, out_s, init_s, loaded, free, init_bar, ddecay_s = scratch
    ih, ib, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    Q, P = uw_s.shape
    N = c_s.shape[-1]
    n_chunks = dy_ref.shape[1] // Q
    ig = ih // heads_per_group
    rows = lambda ic: pl.ds(ic * Q, Q)

    @pl.when(wg == PRODUCER)
    def _():
        sources = (lambda ic: dy_ref.at[ib, rows(ic), ih], lambda ic: c_ref.at[ib, rows(ic), ig],
                   lambda ic: cs_ref.at[ib, ih, rows(ic)], lambda ic: states_ref.at[ib, ic, ih])
        _produce(n_chunks, stages, True, sources, (dy_s, c_s, cs_s, st_s), loaded, free)

    @pl.when(wg == CONSUMER)
    def _():
        if with_final:
            mc.copy_in(dfinal_ref.at[ib, ih], init_s, init_bar.at[0])
            mc.wait(init_bar.at[0])
            grad0 = mc.load(init_s, mc.WGMMA, interpret=interpret)
        else:
            grad0 = mc.zeros((P, N), interpret=interpret)

        def chunk(k, grad):
            ic = n_chunks - 1 - k
            slot = lax.rem(k, stages)
            for bar in loaded:
                mc.wait(bar.at[slot])
            mc.store_out(grad, out_s, sgrads_ref.at[ib, ic, ih])
            # d decay_c per state row (summed over the rows in JAX).
            state = mc.load(st_s.at[slot], mc.WGMMA, interpret=interpret)
            mc.store_out(jnp.sum(grad * state, axis=1), ddecay_s, ddecay_ref.at[ib, ih, ic])
            cs = cs_s.at[slot]
            decayed = grad * jnp.exp(cs[Q - 1])
            grad = weighted_product(dy_s.at[slot], c_s.at[slot], uw_s, cs, None, decayed,
                                    to_end=False, interpret=interpret)
            mc.release(free.at[slot])
            return grad

        d_init = lax.fori_loop(0, n_chunks, chunk, grad0)
        mc.store_out(d_init, out_s, dinit_ref.at[ib, ih])
        mc.finish_stores()


def state_passing_bwd(dy, C, cs, states, d_final, *, chunk: int, blocks: MosaicBlockSizes,
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
    c = L // chunk
    mm = dy.dtype
    stages = blocks.stages
    tiles = [((chunk, P), mm), ((chunk, N), mm), ((chunk,), f32), ((P, N), f32)]
    with_final = d_final is not None
    kernel = plgpu.kernel(
        functools.partial(_bwd_kernel, heads_per_group=h // g, stages=stages,
                          with_final=with_final, interpret=interpret),
        out_type=[jax.ShapeDtypeStruct((b, c, h, P, N), f32),
                  jax.ShapeDtypeStruct((b, h, c, P), f32),
                  jax.ShapeDtypeStruct((b, h, P, N), f32)],
        scratch_types=[*_pipeline_scratch(stages, chunk, tiles, P, N, mm), mc.vector((P,))],
        grid=(h, b), grid_names=("h", "b"), num_threads=2, thread_name="wg",
        compiler_params=mc.compiler_params(), interpret=mc.kernel_interpret(interpret),
        kernel_name="ssd_state_passing_bwd")
    s_grads, d_decay, d_init = kernel(dy, C, cs, states, *([d_final] if with_final else []))
    return s_grads, d_decay.sum(axis=-1), d_init
