"""What the Pallas Triton SSD kernels share: block sizes, the dot, the causal decay tile.

The kernels work on padded, chunked operands laid out by `kernels.ssd.pallas`:
  x (b, L, h, P) and B, C (b, L, g, N) in the matmul dtype; dt and cs (b, h, L) float32, cs the
  within-chunk cumulative sum of dt*A; chunk states (b, c, h, P, N) float32.
L = c*Q is the padded length, Q the chunk, P and N the padded head and state dims (powers of two,
>= 16, as Triton's block shapes and dots need). Letters: b batch, c chunk, h heads, g groups,
t/s output/input positions in a chunk.

- `chunk_state`: S[p, n] = sum_s u[s, p] w[s] V[s, n] for one (b, c, h) and one p-block, with the
  decay weight w computed in the kernel: w = exp(cs_last - cs) dt (the chunk states of the forward)
  or w = exp(cs) (the state gradient that the outputs send back in the backward).
- `chunk_scan`: one (b, c, h, row block): y_t = exp(cs_t) C_t H_c^T (state-to-output) plus
  sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s (intra-chunk), fused in one accumulator.

Every grid runs (tile, head, chunk, batch), the first fastest (Pallas-Triton folds the leading
dims into CUDA's x axis): programs launched together share a chunk's x rows and its group's B, C
in L2, instead of streaming the same tiles once per batch entry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SSDBlockSizes:
    """Tile sizes and Triton launch parameters of the SSD kernels.

    block_m: rows (and columns) of the (t, s) tiles inside a chunk; divides the padded chunk.
    block_p: head-dim slice of one chunk-state program; divides the padded head dim.
    num_warps_*, num_stages: Triton launch parameters of the state kernels (forward chunk states
      and the backward's output-state gradient) and of the scan kernels (forward output and the
      two backward kernels).
    fused_passing_min_programs: fuse the chunk states with the inter-chunk passing (one program
      walks all chunks of a (p-block, head, sequence): fewer bytes, less parallelism) when there
      are at least this many such programs; else per-chunk kernels and a lax.scan.
    """

    block_m: int = 64
    block_p: int = 64
    num_warps_state: int = 4
    num_warps_scan: int = 4
    num_stages: int = 2
    fused_passing_min_programs: int = 512  # ~4 programs per SM of an H100 (132 SMs)

    @classmethod
    def default(cls, headdim: int, dstate: int, chunk: int, itemsize: int = 2) -> SSDBlockSizes:
        """Defaults for padded (P, N, Q) and the matmul operands' itemsize: 64-row tiles, 8 warps
        once a tile's f32 accumulators pass 8K elements (more warps keep the registers per
        thread under ~128), loads double-buffered for 16-bit operands; for float32 single-
        buffered (double-buffered float32 tiles took ~209 KiB of an H100's 227 KiB of shared
        memory in the backward)."""
        block_m = min(chunk, 64)
        block_p = min(headdim, 64)
        state_elems = block_p * dstate
        scan_elems = block_m * max(headdim, dstate)
        return cls(block_m=block_m, block_p=block_p,
                   num_warps_state=8 if state_elems >= 8192 else 4,
                   num_warps_scan=8 if scan_elems >= 8192 else 4,
                   num_stages=2 if itemsize <= 2 else 1)

    def check(self, headdim: int, dstate: int, chunk: int) -> None:
        """ValueError unless the tiles fit the padded dims (P, N, Q)."""
        for name, size, dim, dim_name in (("block_m", self.block_m, chunk, "chunk"),
                                          ("block_p", self.block_p, headdim, "headdim")):
            if size < 16 or size & (size - 1) or dim % size:
                raise ValueError(f"{name}={size} must be a power of two >= 16 dividing the "
                                 f"padded {dim_name} {dim}")
        del dstate


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
        interpret: bool = False) -> jax.Array:
    """float32-accumulated 2-D product. float32 operands use 3xTF32 on the GPU (close to float32,
    still on the tensor cores); the interpreter computes plain float32."""
    precision = None
    if a.dtype == f32 and not interpret:
        precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    elif a.dtype == f32:
        precision = lax.Precision.HIGHEST
    # The Triton home of dot (`pl.dot` is deprecated from JAX 0.11).
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def decay_block(cs_t: jax.Array, cs_s: jax.Array, t0, s0, *, transposed: bool = False
                ) -> jax.Array:
    """exp(cs_t - cs_s) where global position t >= s, else 0: (bt, bs) float32, or (bs, bt) when
    transposed (built in that orientation: no in-register transpose).

    Masked before the exponential, so the upper triangle never overflows."""
    if transposed:
        shape = (cs_s.shape[0], cs_t.shape[0])
        cols = s0 + lax.broadcasted_iota(jnp.int32, shape, 0)
        rows = t0 + lax.broadcasted_iota(jnp.int32, shape, 1)
        diff = cs_t[None, :] - cs_s[:, None]
    else:
        shape = (cs_t.shape[0], cs_s.shape[0])
        rows = t0 + lax.broadcasted_iota(jnp.int32, shape, 0)
        cols = s0 + lax.broadcasted_iota(jnp.int32, shape, 1)
        diff = cs_t[:, None] - cs_s[None, :]
    return jnp.exp(jnp.where(rows >= cols, diff, -jnp.inf))


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def kernel_dims(seqlen: int, headdim: int, dstate: int, chunk_size: int) -> tuple[int, int, int]:
    """(Q, P, N): the kernel chunk and the padded head and state dims, powers of two >= 16."""
    chunk = max(16, _next_pow2(min(chunk_size, seqlen)))
    return chunk, max(16, _next_pow2(headdim)), max(16, _next_pow2(dstate))
