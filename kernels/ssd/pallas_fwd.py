"""Forward Pallas kernels of the chunked SSD (Triton backend): chunk states and chunk scan.

Both kernels work on padded, chunked operands laid out by `kernels.ssd.pallas`:
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
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
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


# --- chunk states --------------------------------------------------------------------------------

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


# --- chunk scan (outputs) ------------------------------------------------------------------------

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
