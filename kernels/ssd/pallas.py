"""Chunked SSD on Pallas kernels, forward and backward joined by one custom_vjp; two backends.

    ssd_pallas(x, dt, A, B, C, chunk_size, initial_states, backend="triton" | "mosaic")

Same four steps as `kernels.ssd.xla` (read its docstring for the algebra), arranged as kernels
with the same signatures in both backends (`kernels/ssd/triton/`, `kernels/ssd/mosaic/`, one
algorithm step a file, each step's plain-jnp reference in `kernels.ssd.reference`):

  forward   chunk_state   S_c = sum_s exp(cs_last - cs_s) dt_s x_s^T B_s       (decay fused)
            state passing H_{c+1} = exp(cs_last,c) H_c + S_c                   (lax.scan, c steps)
            chunk_scan    y_t = exp(cs_t) C_t H_c^T + sum_{s<=t} (C_t.B_s) e^{cs_t-cs_s} dt_s x_s
  backward  recompute H_c (as in the forward), then
            chunk_state   Y_c = sum_t exp(cs_t) dy_t^T C_t       (what the outputs send to H_c)
            reverse scan  G_c = dL/dH_{c+1}; dL/dH_c = Y_c + exp(cs_last,c) G_c; G_c = dL/dS_c
            bwd_rows      dC, the row part of dcs               (grid over row blocks)
            bwd_cols      dx, dB, the direct dt gradient        (grid over column blocks)

When batch x heads gives enough programs (the block sizes' `fused_passing_min_programs`), the
chunk states and the passing are one kernel each way (`state_passing`): one program owns a
(head, sequence)'s chunk loop and the S_c and Y_c never reach memory. With one chunk and no
initial state nothing is passed, and the kernels read no state at all; an unused final state (a
symbolic-zero cotangent) is not sent back either. The within-chunk cumulative sum cs of dt*A is
computed in JAX outside the custom_vjp, so JAX differentiates it (the reverse cumsum that turns
dcs into dA and the rest of ddt). Padding is also outside: the sequence goes to a multiple of the
kernel chunk with dt = 0 (decay 1, no input: exact), p and n to the backend's granule with zeros
(exact: padded state rows/columns stay zero); any chunking computes the same function.

The backends (`BACKENDS`):
  "triton"  Pallas' Triton backend (`jax.experimental.pallas.triton`): power-of-two blocks
            >= 16, float32 dots in 3xTF32; any CUDA GPU from sm_80. Deprecated by JAX 0.11.
  "mosaic"  Pallas' Mosaic GPU backend (`plgpu.kernel`), written for sm_90 (H100/H200): TMA
            copies into swizzled shared memory, wgmma, a warp-specialised producer/consumer
            pipeline in the fused passing; tiles of 64 rows, so P, N and the chunk are padded to
            multiples of 64 (the chunk at most 256). Its products take 16-bit operands: float32
            x, B, C are rounded to bfloat16 for them (accumulation in float32).

Where the kernels run is decided per platform when the computation is lowered
(`kernels.ssd.pallas_platform`): compiled kernels for CUDA; on every other platform the Triton
kernels run in the Pallas interpreter and the Mosaic kernels in JAX's GPU interpreter (with its
race, out-of-bounds and uninitialised-memory checks on). So a model lowered or exported for a GPU
from a CPU host carries the compiled kernels; `interpret=` forces either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from kernels.ssd import reference
from kernels.ssd.pallas_platform import on_lowering_platform

__all__ = ["BACKENDS", "Backend", "get_backend", "ssd_pallas", "ssd_pallas_reference"]

f32 = jnp.float32

# The plain-jnp whole-SSD oracle that these kernels reproduce (the paper's Listing 1).
ssd_pallas_reference = reference.ssd_minimal


@dataclasses.dataclass(frozen=True)
class Backend:
    """One Pallas backend's kernels (same signatures in both) and its tiling rules."""

    name: str
    chunk_state: Callable
    chunk_scan: Callable
    state_passing_fwd: Callable
    state_passing_bwd: Callable
    chunk_scan_bwd_rows: Callable
    chunk_scan_bwd_cols: Callable
    kernel_dims: Callable[[int, int, int, int], tuple[int, int, int]]
    block_sizes: type  # .default(P, N, Q, itemsize) and .check(P, N, Q)
    matmul_dtype: Callable[[Any], Any]  # the inputs' dtype -> the kernels' operand dtype
    programs_per_state: Callable[[Any, int], int]  # (blocks, P) -> programs per (head, seq)


def _triton() -> Backend:
    from kernels.ssd.triton import chunk_scan, chunk_scan_bwd, chunk_state, state_passing
    from kernels.ssd.triton.common import SSDBlockSizes, kernel_dims

    return Backend("triton", chunk_state.chunk_state, chunk_scan.chunk_scan,
                   state_passing.state_passing_fwd, state_passing.state_passing_bwd,
                   chunk_scan_bwd.chunk_scan_bwd_rows, chunk_scan_bwd.chunk_scan_bwd_cols,
                   kernel_dims, SSDBlockSizes, lambda dtype: dtype,
                   lambda blocks, P: P // blocks.block_p)


def _mosaic() -> Backend:
    from kernels.ssd.mosaic import chunk_scan, chunk_scan_bwd, chunk_state, state_passing
    from kernels.ssd.mosaic.common import MosaicBlockSizes, kernel_dims

    return Backend("mosaic", chunk_state.chunk_state, chunk_scan.chunk_scan,
                   state_passing.state_passing_fwd, state_passing.state_passing_bwd,
                   chunk_scan_bwd.chunk_scan_bwd_rows, chunk_scan_bwd.chunk_scan_bwd_cols,
                   kernel_dims, MosaicBlockSizes,
                   lambda dtype: jnp.bfloat16 if jnp.dtype(dtype) == f32 else dtype,
                   lambda blocks, P: 1)


BACKENDS = ("triton", "mosaic")


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend's kernels (imported when first asked for); ValueError for an unknown name."""
    if name == "triton":
        return _triton()
    if name == "mosaic":
        return _mosaic()
    raise ValueError(f"Unknown Pallas backend {name!r}; choose one of {BACKENDS}")


def kernel_dims(seqlen: int, headdim: int, dstate: int, chunk_size: int,
                backend: str = "triton") -> tuple[int, int, int]:
    """(Q, P, N): the kernel chunk and the padded head and state dims of a backend."""
    return get_backend(backend).kernel_dims(seqlen, headdim, dstate, chunk_size)


class _Config(NamedTuple):
    backend: Backend
    chunk: int
    blocks: Any
    interpret: bool | None  # None: decided per lowering platform (`kernels.ssd.pallas_platform`)
    zero_init: bool  # no initial state was given
    fused_passing: bool  # chunk states and passing in one kernel (`state_passing`)


def ssd_pallas(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
               chunk_size: int, initial_states: jax.Array | None = None, *,
               backend: str = "triton", block_sizes: Any = None,
               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD on Pallas kernels; differentiable in x, dt, A, B, C and initial_states.

    Args:
      x: (b, l, h, p) float32, bfloat16 or float16. dt: (b, l, h), already biased/softplus'd
        (used in float32). A: (h,). B, C: (b, l, g, n), h % g == 0.
      chunk_size: chunk length; rounded up to the backend's kernel chunk (`kernel_dims`).
      initial_states: (b, h, p, n) or None (zeros).
      backend: "triton" or "mosaic" (see the module docstring).
      block_sizes: the backend's block sizes (`SSDBlockSizes` / `MosaicBlockSizes`); default
        `.default(P, N, Q, itemsize)`.
      interpret: True runs the kernels in an interpreter, False compiles them (CUDA only); None
        (default) decides per platform at lowering: compiled for CUDA, interpreted elsewhere.
    Returns:
      y (b, l, h, p) float32 without the D skip, final state (b, h, p, n) float32.
    """
    kernels = get_backend(backend)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"nheads={h} must be a multiple of ngroups={g}")
    chunk, P, N = kernels.kernel_dims(l, p, n, chunk_size)
    mm = jnp.result_type(x.dtype, B.dtype, C.dtype)
    if mm not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"x, B, C must be float32, bfloat16 or float16, got {mm}; cast them")
    mm = kernels.matmul_dtype(mm)
    blocks = block_sizes or kernels.block_sizes.default(P, N, chunk, jnp.dtype(mm).itemsize)
    blocks.check(P, N, chunk)
    c = -(-l // chunk)
    L = c * chunk

    def pad(t, last):
        widths = [(0, 0), (0, L - l)] + [(0, 0)] * (t.ndim - 3) + [(0, last - t.shape[-1])]
        return jnp.pad(t.astype(mm), widths)

    xp, Bp, Cp = pad(x, P), pad(B, N), pad(C, N)
    dtp = jnp.pad(dt.astype(f32), [(0, 0), (0, L - l), (0, 0)]).transpose(0, 2, 1)  # (b, h, L)
    dA = (dtp * A.astype(f32)[None, :, None]).reshape(b, h, c, chunk)
    cs = jnp.cumsum(dA, axis=-1).reshape(b, h, L)
    if initial_states is None:
        init = jnp.zeros((b, h, P, N), f32)
    else:
        init = jnp.pad(initial_states.astype(f32), [(0, 0), (0, 0), (0, P - p), (0, N - n)])
    fused = b * h * kernels.programs_per_state(blocks, P) >= blocks.fused_passing_min_programs
    interpret = None if interpret is None else bool(interpret)
    cfg = _Config(kernels, chunk, blocks, interpret, initial_states is None, fused)
    y, final = _ssd_core(cfg, xp, dtp, cs, Bp, Cp, init)
    return y[:, :l, :, :p], final[:, :, :p, :n]


# --- state passing (JAX, c sequential steps) -----------------------------------------------------

def _chunk_decay(cs: jax.Array, chunk: int) -> jax.Array:
    """exp(cs at each chunk's last step): (b, h, L) -> (b, h, c)."""
    return jnp.exp(cs[:, :, chunk - 1::chunk])


def _pass_states(chunk_states: jax.Array, decay: jax.Array, init: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """States entering each chunk (b, c, h, P, N) and the final state (b, h, P, N).

    chunk_states (b, c, h, P, N); decay (b, h, c); init (b, h, P, N)."""
    def step(state, inputs):
        decay_c, new_c = inputs
        return decay_c[..., None, None] * state + new_c, state

    final, entering = jax.lax.scan(
        step, init, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(chunk_states, 1, 0)))
    return jnp.moveaxis(entering, 0, 1), final


def _pass_state_grads(out_grads: jax.Array, states: jax.Array, decay: jax.Array,
                      final_grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reverse of `_pass_states`.

    Args:
      out_grads: (b, c, h, P, N) what chunk c's outputs send to its entering state.
      states: (b, c, h, P, N) entering states. decay: (b, h, c). final_grad: (b, h, P, N).
    Returns:
      gradients of each chunk's own contribution S_c (b, c, h, P, N), of each chunk's decay
      (b, h, c), and of the initial state (b, h, P, N).
    """
    def step(grad, inputs):
        decay_c, out_c, state_c = inputs
        d_decay = jnp.sum(grad * state_c, axis=(-2, -1))
        return out_c + decay_c[..., None, None] * grad, (grad, d_decay)

    init_grad, (s_grads, d_decay) = jax.lax.scan(
        step, final_grad,
        (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(out_grads, 1, 0), jnp.moveaxis(states, 1, 0)),
        reverse=True)
    return jnp.moveaxis(s_grads, 0, 1), jnp.moveaxis(d_decay, 0, 2), init_grad


# --- custom_vjp core on padded operands ----------------------------------------------------------

def _fused(cfg: _Config, interpret: bool) -> bool:
    """Whether the fused passing kernels run. Not in JAX's GPU interpreter: it runs their two
    warpgroups as concurrent XLA:CPU computations inside a host callback, which deadlocked on a
    2-core host inside a whole forward and backward (the kernels run, and are tested, on their
    own); there the per-chunk kernels and a lax.scan compute the same states."""
    return cfg.fused_passing and not (interpret and cfg.backend.name == "mosaic")


def _on_platform(cfg: _Config, fn, *args) -> list[jax.Array]:
    """fn(cfg, *args, interpret=...) with cfg.interpret, or decided per lowering platform."""
    if cfg.interpret is None:
        return on_lowering_platform(functools.partial(fn, cfg), *args)
    return list(fn(cfg, *args, interpret=cfg.interpret))


def _states(cfg: _Config, x, dt, cs, B, init, interpret: bool):
    """States entering each chunk (b, c, h, P, N) and the final state (b, h, P, N); init None
    when zero."""
    kw = dict(chunk=cfg.chunk, blocks=cfg.blocks, interpret=interpret)
    if _fused(cfg, interpret):
        return cfg.backend.state_passing_fwd(x, B, dt, cs, init, **kw)
    chunk_states = cfg.backend.chunk_state(x, B, dt, cs, to_end=True, **kw)
    if init is None:
        init = jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[3]), f32)
    return _pass_states(chunk_states, _chunk_decay(cs, cfg.chunk), init)


def _forward(cfg: _Config, x, dt, cs, B, C, *init, interpret: bool):
    """y (b, L, h, P) f32 and the final state (b, h, P, N) f32; init given unless cfg.zero_init."""
    init = init[0] if init else None
    kw = dict(chunk=cfg.chunk, blocks=cfg.blocks, interpret=interpret)
    if init is None and x.shape[1] == cfg.chunk:
        # One chunk and no initial state: nothing enters the chunk, the kernel reads no state
        # (the BSMamba2 band axis: a zero state per sequence would be 4x the bytes of x).
        final = cfg.backend.chunk_state(x, B, dt, cs, to_end=True, **kw)[:, 0]
        states = None
    else:
        states, final = _states(cfg, x, dt, cs, B, init, interpret)
    return cfg.backend.chunk_scan(x, B, C, dt, cs, states, **kw), final


def _backward(cfg: _Config, x, dt, cs, B, C, dy, *rest, zero_final: bool,
              interpret: bool):
    """Gradients (dx, ddt, dcs, dB, dC[, d_init]) of the padded operands.

    rest: (init unless cfg.zero_init) + (d_final unless zero_final: the final state was unused).
    d_init is returned only when an initial state was given."""
    rest = list(rest)
    init = None if cfg.zero_init else rest.pop(0)
    d_final = None if zero_final else rest.pop(0)
    b, L, h, P = x.shape
    N = B.shape[3]
    chunk = cfg.chunk
    c = L // chunk
    kw = dict(chunk=chunk, blocks=cfg.blocks, interpret=interpret)
    decay = _chunk_decay(cs, chunk)
    d_init = None
    if c == 1:
        # No passing between chunks: skip the zero states and state gradients altogether.
        states = None if init is None else init[:, None]
        s_grads = None if d_final is None else d_final[:, None]
        if states is None or s_grads is None:
            d_decay = jnp.zeros((b, h, 1), f32)
        else:
            d_decay = jnp.sum(init * d_final, axis=(-2, -1))[..., None]
        if init is not None:
            d_init = cfg.backend.chunk_state(dy, C, dt, cs, to_end=False, **kw)[:, 0]
            if d_final is not None:
                d_init = d_init + decay[..., 0, None, None] * d_final
    else:
        states, _ = _states(cfg, x, dt, cs, B, init, interpret)
        if _fused(cfg, interpret):
            s_grads, d_decay, d_init = cfg.backend.state_passing_bwd(dy, C, cs, states, d_final,
                                                                     **kw)
        else:
            out_grads = cfg.backend.chunk_state(dy, C, dt, cs, to_end=False, **kw)
            if d_final is None:
                d_final = jnp.zeros((b, h, P, N), f32)
            s_grads, d_decay, d_init = _pass_state_grads(out_grads, states, decay, d_final)
    dc, dcs_rows = cfg.backend.chunk_scan_bwd_rows(x, B, C, dt, cs, states, dy, **kw)
    dx, db, ddt_intra, ddt_state = cfg.backend.chunk_scan_bwd_cols(x, B, C, dt, cs, s_grads, dy,
                                                                   **kw)

    ddt = ddt_intra + ddt_state
    # cs_s enters every term through exp(... - cs_s) dt_s: its column part is -dt_s ddt_s.
    dcs = (dcs_rows - dt * ddt).reshape(b, h, c, chunk)
    # cs_last enters S_c through exp(cs_last - cs_s) and the passing through exp(cs_last).
    last = jnp.sum((dt * ddt_state).reshape(b, h, c, chunk), axis=-1) + decay * d_decay
    dcs = dcs.at[..., chunk - 1].add(last).reshape(b, h, L)
    grads = [dx.astype(x.dtype), ddt, dcs, db.astype(B.dtype), dc.astype(C.dtype)]
    return grads if init is None else [*grads, d_init]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(cfg: _Config, x, dt, cs, B, C, init):
    """Padded operands: x (b, L, h, P); dt, cs (b, h, L) f32; B, C (b, L, g, N) in the matmul
    dtype; init (b, h, P, N) f32 (zeros, never read, when cfg.zero_init). Returns y
    (b, L, h, P) f32 and the final state (b, h, P, N) f32."""
    return _core_fwd(cfg, x, dt, cs, B, C, init)[0]


def _core_fwd(cfg: _Config, x, dt, cs, B, C, init):
    y, final = _on_platform(cfg, _forward, x, dt, cs, B, C,
                            *([] if cfg.zero_init else [init]))
    # Residuals are the inputs only: the states are recomputed in the backward (they are as
    # large as x in bf16, per layer).
    return (y, final), (x, dt, cs, B, C, init)


def _core_fwd_rule(cfg: _Config, *primals):
    return _core_fwd(cfg, *(primal.value for primal in primals))


def _core_bwd(cfg: _Config, residuals, cotangents):
    x, dt, cs, B, C, init = residuals
    dy, d_final = cotangents
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(x.shape, x.dtype)
    dy = dy.astype(x.dtype)  # matmul operand dtype, like the forward
    zero_final = isinstance(d_final, SymbolicZero)  # the final state was not used
    rest = ([] if cfg.zero_init else [init]) + ([] if zero_final else [d_final.astype(f32)])
    grads = _on_platform(cfg, functools.partial(_backward, zero_final=zero_final),
                         x, dt, cs, B, C, dy, *rest)
    d_init = jnp.zeros_like(init) if cfg.zero_init else grads[5]
    return (*grads[:5], d_init)


# symbolic_zeros: the backward learns which outputs were unused (a dropped final state).
_ssd_core.defvjp(_core_fwd_rule, _core_bwd, symbolic_zeros=True)
