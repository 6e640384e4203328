"""Step 3 of the chunked SSD on Mosaic GPU, fused with step 2: the states entering each chunk.

    forward   H_0 = init;  H_{c+1} = exp(cs_last,c) H_c + sum_s exp(cs_last,c - cs_s) dt_s x_s^T B_s
    backward  G = dL/dH_C;  for c descending: dL/dS_c = G,  d decay_c = <G, H_c>,
              G = sum_t exp(cs_t) dy_t^T C_t + exp(cs_last,c) G;   dL/dH_0 = G

One CTA per (head, sequence) owns the chunk loop, so the running state stays in registers (a
(P, N) float32 wgmma accumulator) and the per-chunk S_c never reach memory: only the state
entering each chunk is written (the chunk scan reads it). Warp-specialised: a producer
warpgroup streams each chunk's 64-row slices of x and B (dy and C backward) by TMA into `stages`
shared-memory buffers while the consumer warpgroup folds the previous ones into the state; the
chunk's cs and dt (and, backward, the state H_c entering it) come per chunk in their own
buffers. Per buffer, one barrier per tile says it has landed and one says the consumer released
it (`common.wait_free` / `common.release`). Slices keep the buffers small (a 256-step chunk of
bf16 x and B double-buffered would take 196 KiB of the 227). This trades parallelism (b*h CTAs
instead of b*c*h) for bytes: `kernels.ssd.pallas` uses it when there are enough CTAs.
References: `kernels.ssd.reference.state_passing_fwd_reference` and
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
from kernels.ssd.mosaic.common import ROWS, MosaicBlockSizes

f32 = jnp.float32
CONSUMER, PRODUCER = 0, 1
CHUNK_STAGES = 2  # buffers of the per-chunk tiles


def refill(k, stages: int, free, copies) -> None:
    """Loads step k's tiles into buffer k % stages: once the consumer has released it (from the
    (stages + 1)-th step on), then the copies."""
    @pl.when(k >= stages)
    def _():
        mc.wait_free(free.at[lax.rem(k, stages)])

    copies()


def consume(landed, release_barrier, compute):
    """The consumer's use of a buffer: wait until its tiles have landed (the `landed` barriers),
    compute() reads them, then the buffer is released. (A test drops the waits, to check that
    the race detector sees the reads race with the copies.)"""
    for barrier in landed:
        mc.wait(barrier)
    out = compute()
    mc.release(release_barrier)
    return out


def _produce(n_chunks: int, n_slices: int, stages: int, chunk_free, slice_free, chunk_copies,
             slice_copies) -> None:
    """The producer warpgroup: per slice step k, into buffer k % stages (once released), the
    slice's tiles; before a chunk's first slice, the chunk's tiles into buffer
    chunk % CHUNK_STAGES. Then it observes the last releases of both streams (every barrier
    phase is consumed before the CTA exits)."""
    @pl.loop(0, n_chunks * n_slices)
    def _(k):
        ic = k // n_slices

        @pl.when(lax.rem(k, n_slices) == 0)
        def _():
            refill(ic, CHUNK_STAGES, chunk_free,
                   lambda: chunk_copies(ic, lax.rem(ic, CHUNK_STAGES)))

        refill(k, stages, slice_free, lambda: slice_copies(k, lax.rem(k, stages)))

    for free, n, n_stages in ((chunk_free, n_chunks, CHUNK_STAGES),
                              (slice_free, n_chunks * n_slices, stages)):
        for k in range(max(n - n_stages, 0), n):
            mc.wait_free(free.at[k % n_stages])


def _copies(pairs, slot, bars):
    """Starts (global view, (stages, ...) buffer) copies into `slot`, one barrier array each."""
    for (src, buf), bar in zip(pairs, bars, strict=True):
        mc.copy_in(src, buf.at[slot], bar.at[slot])


def _fwd_kernel(x_ref, b_ref, dt_ref, cs_ref, *refs, heads_per_group: int, stages: int,
                with_init: bool, interpret: bool):
    if with_init:
        init_ref, states_ref, final_ref, *scratch = refs
    else:
        init_ref, (states_ref, final_ref, *scratch) = None, refs
    (x_s, b_s, dt_s, cs_s, uw_s, out_s, slice_bars, slice_free, chunk_bars, chunk_free,
     init_bar) = scratch
    ih, ib, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    Q = dt_s.shape[1]
    P, N = out_s.shape
    n_chunks = x_ref.shape[1] // Q
    n_slices = Q // ROWS
    ig = ih // heads_per_group

    @pl.when(wg == PRODUCER)
    def _():
        def slice_copies(k, slot):
            rows = pl.ds(k * ROWS, ROWS)  # slice k of the sequence = chunk k // n_slices
            _copies([(x_ref.at[ib, rows, ih], x_s), (b_ref.at[ib, rows, ig], b_s)], slot,
                    slice_bars)

        def chunk_copies(ic, slot):
            rows = pl.ds(ic * Q, Q)
            _copies([(dt_ref.at[ib, ih, rows], dt_s), (cs_ref.at[ib, ih, rows], cs_s)], slot,
                    chunk_bars)

        _produce(n_chunks, n_slices, stages, chunk_free, slice_free, chunk_copies, slice_copies)

    @pl.when(wg == CONSUMER)
    def _():
        if with_init:
            mc.copy_in(init_ref.at[ib, ih], out_s, init_bar.at[0])
            mc.wait(init_bar.at[0])
            state0 = mc.load(out_s, mc.WGMMA, interpret=interpret)
        else:
            state0 = mc.zeros((P, N), interpret=interpret)

        def chunk(ic, state):
            cslot = lax.rem(ic, CHUNK_STAGES)
            for bar in chunk_bars:
                mc.wait(bar.at[cslot])
            mc.store_out(state, out_s, states_ref.at[ib, ic, ih])
            cs, dt = cs_s.at[cslot], dt_s.at[cslot]
            last = cs[Q - 1]
            acc = state * jnp.exp(last)
            for r in range(n_slices):
                k = ic * n_slices + r
                slot = lax.rem(k, stages)
                rows = pl.ds(r * ROWS, ROWS)
                acc = consume([bar.at[slot] for bar in slice_bars], slice_free.at[slot],
                              functools.partial(
                    weighted_product, x_s.at[slot], b_s.at[slot], uw_s, cs.at[rows],
                    dt.at[rows], last, acc, to_end=True, interpret=interpret))
            mc.release(chunk_free.at[cslot])
            return acc

        final = lax.fori_loop(0, n_chunks, chunk, state0)
        mc.store_out(final, out_s, final_ref.at[ib, ih])
        mc.finish_stores()


def _scratch(stages: int, chunk: int, slice_tiles, chunk_tiles, P: int, N: int, mm):
    """(stages, ...) buffers of the streamed slice tiles and (CHUNK_STAGES, ...) ones of the
    per-chunk tiles, the scaled-operand tile, a float32 (P, N) tile for the initial value and
    the outputs, and the barriers (landed and released, per stream; the initial value's)."""
    def buffers(tiles, n):
        return [mc.tile((n, *shape), dtype) if len(shape) == 2 else mc.vector((n, *shape))
                for shape, dtype in tiles]

    return [*buffers(slice_tiles, stages), *buffers(chunk_tiles, CHUNK_STAGES),
            mc.tile((ROWS, P), mm), mc.tile((P, N), f32),
            [plgpu.Barrier(num_barriers=stages) for _ in slice_tiles],
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            [plgpu.Barrier(num_barriers=CHUNK_STAGES) for _ in chunk_tiles],
            plgpu.Barrier(num_arrivals=1, num_barriers=CHUNK_STAGES),
            plgpu.Barrier(num_barriers=1)]


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
    with_init = init is not None
    scratch = _scratch(blocks.stages, chunk, [((ROWS, P), mm), ((ROWS, N), mm)],
                       [((chunk,), f32), ((chunk,), f32)], P, N, mm)
    # Reorder to the kernel's unpacking: x, B, dt, cs, uw, out, bars...
    x_s, b_s, dt_s, cs_s, uw_s, out_s, *bars = scratch
    kernel = plgpu.kernel(
        functools.partial(_fwd_kernel, heads_per_group=h // g, stages=blocks.stages,
                          with_init=with_init, interpret=interpret),
        out_type=[jax.ShapeDtypeStruct((b, c, h, P, N), f32),
                  jax.ShapeDtypeStruct((b, h, P, N), f32)],
        scratch_types=[x_s, b_s, dt_s, cs_s, uw_s, out_s, *bars],
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
    (dy_s, c_s, cs_s, st_s, uw_s, out_s, slice_bars, slice_free, chunk_bars, chunk_free,
     init_bar, ddecay_s) = scratch
    ih, ib, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    Q = cs_s.shape[1]
    P, N = out_s.shape
    n_chunks = dy_ref.shape[1] // Q
    n_slices = Q // ROWS
    ig = ih // heads_per_group

    @pl.when(wg == PRODUCER)
    def _():
        def slice_copies(k, slot):  # walks the sequence backwards, slice by slice
            rows = pl.ds((n_chunks * n_slices - 1 - k) * ROWS, ROWS)
            _copies([(dy_ref.at[ib, rows, ih], dy_s), (c_ref.at[ib, rows, ig], c_s)], slot,
                    slice_bars)

        def chunk_copies(k, slot):
            ic = n_chunks - 1 - k
            _copies([(cs_ref.at[ib, ih, pl.ds(ic * Q, Q)], cs_s),
                     (states_ref.at[ib, ic, ih], st_s)], slot, chunk_bars)

        _produce(n_chunks, n_slices, stages, chunk_free, slice_free, chunk_copies, slice_copies)

    @pl.when(wg == CONSUMER)
    def _():
        if with_final:
            mc.copy_in(dfinal_ref.at[ib, ih], out_s, init_bar.at[0])
            mc.wait(init_bar.at[0])
            grad0 = mc.load(out_s, mc.WGMMA, interpret=interpret)
        else:
            grad0 = mc.zeros((P, N), interpret=interpret)

        def chunk(k, grad):
            ic = n_chunks - 1 - k
            cslot = lax.rem(k, CHUNK_STAGES)
            for bar in chunk_bars:
                mc.wait(bar.at[cslot])
            mc.store_out(grad, out_s, sgrads_ref.at[ib, ic, ih])
            # d decay_c per state row (summed over the rows in JAX).
            state = mc.load(st_s.at[cslot], mc.WGMMA, interpret=interpret)
            mc.store_out(jnp.sum(grad * state, axis=1), ddecay_s, ddecay_ref.at[ib, ih, ic])
            cs = cs_s.at[cslot]
            acc = grad * jnp.exp(cs[Q - 1])
            for r in reversed(range(n_slices)):
                j = k * n_slices + (n_slices - 1 - r)
                slot = lax.rem(j, stages)
                acc = consume([bar.at[slot] for bar in slice_bars], slice_free.at[slot],
                              functools.partial(
                    weighted_product, dy_s.at[slot], c_s.at[slot], uw_s,
                    cs.at[pl.ds(r * ROWS, ROWS)], None, None, acc, to_end=False,
                    interpret=interpret))
            mc.release(chunk_free.at[cslot])
            return acc

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
    with_final = d_final is not None
    scratch = _scratch(blocks.stages, chunk, [((ROWS, P), mm), ((ROWS, N), mm)],
                       [((chunk,), f32), ((P, N), f32)], P, N, mm)
    kernel = plgpu.kernel(
        functools.partial(_bwd_kernel, heads_per_group=h // g, stages=blocks.stages,
                          with_final=with_final, interpret=interpret),
        out_type=[jax.ShapeDtypeStruct((b, c, h, P, N), f32),
                  jax.ShapeDtypeStruct((b, h, c, P), f32),
                  jax.ShapeDtypeStruct((b, h, P, N), f32)],
        scratch_types=[*scratch, mc.vector((P,))],
        grid=(h, b), grid_names=("h", "b"), num_threads=2, thread_name="wg",
        compiler_params=mc.compiler_params(), interpret=mc.kernel_interpret(interpret),
        kernel_name="ssd_state_passing_bwd")
    s_grads, d_decay, d_init = kernel(dy, C, cs, states, *([d_final] if with_final else []))
    return s_grads, d_decay.sum(axis=-1), d_init
