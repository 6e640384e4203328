"""What every Mosaic GPU SSD kernel shares: tile sizes, shared-memory tiles, loads, products.

The kernels are written for sm_90 (H100/H200) in Pallas' Mosaic GPU dialect (`plgpu.kernel`,
"Lane" lowering semantics, one warpgroup = 128 threads per Pallas thread): tiles are copied
from global to shared memory by TMA (`copy_gmem_to_smem`, completion on a barrier), in the
128-byte swizzled layout that wgmma reads without bank conflicts; products run on wgmma with
float32 accumulators (`wgmma` needs 64-row tiles: `ROWS`); vectors along a tile's rows or columns
are loaded in the wgmma accumulator's row/column layouts so that they broadcast in registers.

On any other platform the same kernel bodies run in JAX's GPU interpreter
(`InterpretGPUParams`), which simulates shared and global memory, TMA copies, barriers and
threads, and checks for races, out-of-bounds reads and reads of uninitialised memory (the
parameters in `interpret_params`). Register layouts do not exist there, and the interpreter of
JAX 0.10 lacks a few primitives (layout casts, transposed or register wgmma operands), so the
helpers below are the one place where the interpreted and the compiled kernel differ: with
`interpret=True` a layout is dropped and a product is the float32-accumulated `jnp.dot` of the
tiles read from shared memory (reads the race detector sees like the wgmma's).

Letters: b batch, c chunk, h heads, g groups, t/s output/input positions in a chunk, P and N the
padded head and state dims, Q the kernel chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

f32 = jnp.float32

# Rows of a wgmma tile (one warpgroup's accumulator), and the granule of every padded dim.
ROWS = 64
# H100/H200 shared memory per CTA (bytes), for the block-size checks.
SMEM_BYTES = 227 * 1024

# The interpreter with every check on (the tests read the race record after each call).
_CHECKS = dict(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")


def interpret_params():
    """The GPU interpreter's parameters: races, out-of-bounds reads and uninitialised reads are
    detected (uninitialised shared memory reads as NaN, so a missing copy shows in the values)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private in 0.10

    return InterpretGPUParams(**_CHECKS)


def kernel_interpret(interpret: bool):
    """`plgpu.kernel`'s interpret argument: the checking interpreter, or None (compiled)."""
    return interpret_params() if interpret else None


def compiler_params():
    # Lane semantics: explicit register layouts (JAX 0.11 defaults to Warpgroup semantics,
    # whose layout inference JAX 0.10 lacks for these kernels).
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
    """Launch choices of the Mosaic GPU SSD kernels.

    fused_passing_min_programs: as the Triton kernels' `SSDBlockSizes`: fuse the chunk states
      with the passing (one CTA walks all chunks of a (head, sequence), the state on chip) when
      batch x heads reaches this many CTAs, else per-chunk kernels and a lax.scan.
    stages: shared-memory buffers per input tile in the fused passing's producer/consumer
      pipeline (the producer warpgroup loads chunk c + stages - 1 while chunk c is consumed).
    """

    fused_passing_min_programs: int = 264  # two CTAs per SM of an H100 (132 SMs)
    stages: int = 2

    @classmethod
    def default(cls, headdim: int, dstate: int, chunk: int, itemsize: int = 2
                ) -> MosaicBlockSizes:
        del headdim, dstate, chunk, itemsize
        return cls()

    def check(self, headdim: int, dstate: int, chunk: int) -> None:
        """ValueError unless the padded dims (P, N, Q) fit the kernels' tiles."""
        for name, dim in (("headdim", headdim), ("dstate", dstate), ("chunk", chunk)):
            if dim % ROWS or not ROWS <= dim <= 256:
                raise ValueError(f"padded {name}={dim} must be a multiple of {ROWS} in "
                                 f"[{ROWS}, 256] (a wgmma tile and a TMA box)")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2 (load one chunk while "
                             "another is used)")


def kernel_dims(seqlen: int, headdim: int, dstate: int, chunk_size: int) -> tuple[int, int, int]:
    """(Q, P, N): the kernel chunk and the padded head and state dims, multiples of 64 (a
    wgmma tile), the chunk at most 256 (a TMA box) and not longer than the sequence needs."""
    chunk = min(256, round_up(min(chunk_size, seqlen), ROWS))
    return chunk, round_up(headdim, ROWS), round_up(dstate, ROWS)


# --- shared-memory tiles --------------------------------------------------------------------

def tile(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
    """A shared-memory tile in the swizzled layout wgmma and TMA use (the largest swizzle that
    the minor dim fills: 128 B for 64 bf16 or 32 float32 columns)."""
    dtype = jnp.dtype(dtype)
    swizzle = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def vector(shape: tuple[int, ...]) -> plgpu.SMEM:
    """A float32 vector (or stack of vectors) in shared memory, unswizzled."""
    return plgpu.SMEM(shape, f32)


def transposed(ref):
    """The (K, M) view of an (M, K) shared-memory tile: wgmma reads it transposed for free."""
    if hasattr(plgpu, "transpose_ref") and jax.__version_info__ < (0, 11):
        return plgpu.transpose_ref(ref, (1, 0))
    return ref.T


# --- registers ------------------------------------------------------------------------------

WGMMA = plgpu.Layout.WGMMA


def load(ref, layout, *, interpret: bool) -> jax.Array:
    """ref[...] in a register layout: WGMMA (a tile), ROW (one value per tile row) or COL (one
    per column) - `row_layout()` / `col_layout()`."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=layout)


def row_layout():
    return WGMMA.reduce(1)


def col_layout():
    return WGMMA.reduce(0)


def rows_of(v: jax.Array, shape) -> jax.Array:
    """A (m,) per-row vector broadcast over an (m, k) tile."""
    return lax.broadcast_in_dim(v, shape, [0])


def cols_of(v: jax.Array, shape) -> jax.Array:
    """A (k,) per-column vector broadcast over an (m, k) tile."""
    return lax.broadcast_in_dim(v, shape, [1])


def iota(shape, dim: int, *, interpret: bool) -> jax.Array:
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def zeros(shape, layout=WGMMA, *, interpret: bool) -> jax.Array:
    """float32 zeros in a register layout (a tile, or a row vector with `row_layout()`)."""
    z = jnp.zeros(shape, f32)
    return z if interpret else plgpu.layout_cast(z, layout)


def decay(cs_rows: jax.Array, cs_cols: jax.Array, row0, col0, shape, *, causal_rows: bool,
          interpret: bool) -> jax.Array:
    """exp(cs_t - cs_s) on the causal side (t >= s), else 0, for an (m, k) tile.

    causal_rows: the rows are output positions t (row vector cs_t, columns s); else the rows
    are input positions s (row vector cs_s, columns t). Masked before the exponential, so the
    other triangle never overflows."""
    r = row0 + iota(shape, 0, interpret=interpret)
    c = col0 + iota(shape, 1, interpret=interpret)
    rows, cols = rows_of(cs_rows, shape), cols_of(cs_cols, shape)
    if causal_rows:
        return jnp.exp(jnp.where(r >= c, rows - cols, -jnp.inf))
    return jnp.exp(jnp.where(c >= r, cols - rows, -jnp.inf))


# --- products -------------------------------------------------------------------------------

def mma(a, b, acc: jax.Array | None = None, *, transpose_b: bool = False,
        transpose_a: bool = False, interpret: bool) -> jax.Array:
    """acc + a @ b with float32 accumulation, on wgmma.

    a: an (m, k) shared-memory tile, or a 16-bit register array (already in WGMMA layout);
    b: a (k, n) shared-memory tile. transpose_a/b: the tile holds the operand's transpose
    (read through `transposed`, free on the tensor cores). acc: (m, n) float32 or None.
    """
    if interpret:
        av = a if isinstance(a, jax.Array) else a[...]
        bv = b[...]
        av = av.T if transpose_a else av
        bv = bv.T if transpose_b else bv
        out = jnp.dot(av, bv, preferred_element_type=f32)
        return out if acc is None else acc + out
    a_op = transposed(a) if transpose_a else a
    b_op = transposed(b) if transpose_b else b
    m, n = (a.shape[1] if transpose_a else a.shape[0]), (b.shape[0] if transpose_b
                                                         else b.shape[1])

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_op, b_op)

    init = acc if acc is not None else plgpu.layout_cast(jnp.zeros((m, n), f32), WGMMA)
    return pl.run_state(run)(plgpu.ACC.init(init))


# --- copies ---------------------------------------------------------------------------------

def copy_in(src, dst, barrier) -> None:
    """Starts a TMA copy global -> shared; `barrier` completes when it has landed."""
    plgpu.copy_gmem_to_smem(src, dst, barrier)


def before_refill() -> None:
    """Orders this thread's reads of shared tiles before the TMA writes that refill them (a
    proxy fence: the reads are generic-proxy accesses, the copies async-proxy ones)."""
    plgpu.commit_smem()


def wait(barrier) -> None:
    """Blocks until `barrier` completes (a copy has landed in shared memory)."""
    plgpu.barrier_wait(barrier)


def wait_free(barrier) -> None:
    """The producer's wait until the consumer has released a buffer (`release`) before it is
    loaded again."""
    plgpu.barrier_wait(barrier)


def release(barrier) -> None:
    """The consumer is done with a buffer: the producer may load into it again. The proxy fence
    first: the consumer's reads (generic proxy) are ordered before the next TMA write (async
    proxy) into the buffer; JAX 0.11's interpreter reports the race without it."""
    before_refill()
    plgpu.barrier_arrive(barrier)


def store_out(value: jax.Array, smem, dst) -> None:
    """value -> shared memory -> TMA to global `dst`. Waits first until earlier copies out of
    `smem` have read it (the buffer is reused), and makes the writes visible to the TMA unit."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst)


def finish_stores() -> None:
    """Waits for every outstanding copy out of shared memory (before the kernel exits)."""
    plgpu.wait_smem_to_gmem(0)


def to_smem(value: jax.Array, smem) -> None:
    """Registers -> a shared-memory tile that a following wgmma reads."""
    smem[...] = value
    plgpu.commit_smem()
