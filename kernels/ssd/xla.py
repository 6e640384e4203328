"""Chunked SSD in pure JAX (Dao & Gu 2024, "Transformers are SSMs", section 6 and Listing 1),
with a hand-written VJP and memory bounded independently of batch and length.

The sequence is cut into chunks of Q steps. Within a chunk the output is a masked quadratic form
(attention-like); across chunks a (h, p, n) state is carried:

  1. intra-chunk output   Y_diag[q] = sum_{s<=q} (C_q . B_s) exp(cs_q - cs_s) dt_s x_s
  2. chunk state          S_c = sum_s exp(cs_last - cs_s) dt_s x_s B_s^T
  3. state passing        H_{c+1} = exp(cs_last,c) H_c + S_c
  4. state -> output      Y_off[q] = exp(cs_q) C_q H_c

where cs is the within-chunk cumulative sum of dt*A (kept within a chunk, so its magnitude and
the float32 error of its differences stay bounded). `kernels.ssd.xla_chunk` does steps 1, 2 and
4 for one chunk and their gradients (the algebra is in its docstring); this module arranges them:

  - One step handles k sequences x one chunk; a loop over the chunks carries the state (step 3
    costs nothing extra), and an outer loop runs over groups of k sequences. Temporaries are
    O(k Q (h p + Q)), whatever b and l: the outputs, the inputs and the states entering each
    chunk are the only full-size arrays.
  - k is sized by bytes, per platform, when the computation is lowered (lax.platform_dependent):
    on the CPU one sequence per step at the model's shapes (the fastest there), on accelerators
    up to ~1 GiB of step temporaries so that the batch fills the device.
  - The backward is a custom_vjp: it stores the inputs, the output y (float32) and the states
    entering chunks 1.., and runs the chunks in reverse, carrying dL/dH (autodiff of the forward
    would keep every (Q, Q) score tensor: GiBs at the model's shapes).
  - The first chunk of a zero initial state and the state after the last chunk when its
    cotangent is zero are skipped (the forward's unused final state is removed by XLA).
  - A sequence not a multiple of Q ends with a shorter chunk (no padding copies); the last group
    of sequences is moved back to end at b, recomputing a few sequences rather than padding.

FLOPs (multiply-adds counted as 2) for b sequences of length l in c chunks of Q, h heads in g
groups, row blocks of R (the diagonal R x R blocks and the blocks left of them):
  C.B^T:          2 b c g Q^2 n
  intra output:   b c h Q (Q + R) p          (R = Q: the full 2 b c h Q^2 p)
  chunk states:   2 b c h Q p n
  state output:   2 b c h Q p n
The backward does each matmul twice more (its two gradients) and recomputes C.B^T.

Letters: b batch, l sequence, c chunk, k sequences in a step, q/s positions in a chunk, h heads
(= g groups x j heads per group), p head dim, n state dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from kernels.ssd.ordering import after
from kernels.ssd.xla_chunk import chunk_backward, chunk_forward

f32 = jnp.float32

# Rows of the intra-chunk quadratic form per block (see kernels.ssd.xla_chunk).
ROW_BLOCK = 64
# Bytes of one step's temporaries (`_step_bytes`) on the CPU: one sequence per step at the
# model's shapes, which took 10-30% less CPU time than 3-50 per step at the band-axis shape.
_CPU_STEP_BYTES = 1 << 22
# On accelerators: enough sequences per step to fill the device, with bounded temporaries.
_ACCELERATOR_STEP_BYTES = 1 << 30


def _loop(n: int, body, init, reverse: bool = False):
    """fori_loop over range(n) (reversed if asked), inlined when n == 1."""
    if n == 1:
        return body(0, init)
    if reverse:
        return jax.lax.fori_loop(0, n, lambda i, c: body(n - 1 - i, c), init)
    return jax.lax.fori_loop(0, n, body, init)


def _group_start(b: int, k: int, i):
    # The last group is moved back to end at b: it recomputes some sequences and writes the same
    # values again, so every write below is idempotent.
    return jnp.minimum(i * k, b - k)


def _chunks(l: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk: full chunks of min(chunk, l), then a shorter tail."""
    q = min(chunk, l)
    return [(t0, min(q, l - t0)) for t0 in range(0, l, q)]


def _slice_step(bs, k: int, t0: int, size: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """[bs, bs + k) x [t0, t0 + size) of each (b, l, ...) array (bs traced).

    The barrier keeps XLA from moving the step's dtype conversions in front of the slicing:
    it would otherwise convert a whole bf16 input to float32 once, outside the loop (two
    float32 copies of x at the model's shapes).
    """
    return jax.lax.optimization_barrier(tuple(
        jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(a, bs, k, 0), t0, size, 1)
        for a in arrays))


def _forward(x, dt, A, B, C, H0, *, chunk: int, row_block: int, seqs: int):
    """Steps 1-4 over all chunks and sequences.

    x (b, l, g, j, p); dt (b, l, g, j) f32; A (g, j) f32; B, C (b, l, g, n); H0 (b, g, n, j p)
    f32 or None (zeros). Returns y (b, l, g, j, p) f32, the states entering chunks 1..c-1
    (b, c - 1, g, n, j p) f32 and the final state (b, g, n, j p) f32.
    """
    b, l, g, j, p = x.shape
    n = B.shape[-1]
    spans = _chunks(l, chunk)
    q, nc = spans[0][1], len(spans)
    k = min(seqs, b)

    def one_chunk(ci, bs, H, y_buf, hs_buf, last):
        t0 = ci * q
        step = _slice_step(bs, k, t0, spans[-1][1] if last else q, x, dt, B, C)
        y, H_next = chunk_forward(*step, A, H, row_block, True)
        y_buf = jax.lax.dynamic_update_slice(y_buf, y, (bs, t0, 0, 0, 0))
        if not last:
            hs_buf = jax.lax.dynamic_update_slice(hs_buf, H_next[:, None], (bs, ci, 0, 0, 0))
        return H_next, y_buf, hs_buf

    def group(i, carry):
        y_buf, hs_buf, final_buf = carry
        bs = _group_start(b, k, i)
        H = None if H0 is None else jax.lax.dynamic_slice_in_dim(H0, bs, k, 0)
        # The first and last chunks are peeled: a zero entering state and an unused final
        # state then cost nothing.
        H, y_buf, hs_buf = one_chunk(0, bs, H, y_buf, hs_buf, nc == 1)
        if nc > 2:
            H, y_buf, hs_buf = _loop(nc - 2, lambda ci, c: one_chunk(ci + 1, bs, *c, False),
                                     (H, y_buf, hs_buf))
        if nc > 1:
            H, y_buf, hs_buf = one_chunk(nc - 1, bs, H, y_buf, hs_buf, True)
        final_buf = jax.lax.dynamic_update_slice_in_dim(final_buf, H, bs, 0)
        return y_buf, hs_buf, final_buf

    # Zero buffers made from x, not from a constant: XLA would fill them at the start of the
    # program and keep them (one per pass and layer) until this loop runs.
    init = after(x, (jnp.zeros((b, l, g, j, p), f32), jnp.zeros((b, nc - 1, g, n, j * p), f32),
                     jnp.zeros((b, g, n, j * p), f32)))
    return _loop(-(-b // k), group, init)


def _backward(x, dt, A, B, C, H0, hs, y, dy, dfinal, *, chunk: int, row_block: int, seqs: int):
    """Cotangents of `_forward` (same layouts); dfinal None stands for zeros.

    Returns dx (x.dtype), ddt, dA, dB, dC (float32) and dH0 (float32; None if H0 is None).
    """
    b, l, g, j, p = x.shape
    n = B.shape[-1]
    spans = _chunks(l, chunk)
    q, nc = spans[0][1], len(spans)
    k = min(seqs, b)

    def one_chunk(ci, bs, dH, dA, bufs, last):
        t0 = ci * q
        x_c, dt_c, B_c, C_c, y_c, dy_c = _slice_step(bs, k, t0, spans[-1][1] if last else q,
                                                      x, dt, B, C, y, dy)
        if isinstance(ci, int) and ci == 0:  # the peeled first chunk (ci is traced in loops)
            H = None if H0 is None else jax.lax.dynamic_slice_in_dim(H0, bs, k, 0)
        else:
            H = jax.lax.dynamic_slice(hs, (bs, ci - 1, 0, 0, 0), (k, 1, g, n, j * p))[:, 0]
        dx_c, ddt_c, dB_c, dC_c, dA_c, dH = chunk_backward(
            x_c, dt_c, B_c, C_c, A, H, y_c, dy_c, dH, row_block)
        bufs = tuple(jax.lax.dynamic_update_slice(buf, d, (bs, t0) + (0,) * (d.ndim - 2))
                     for buf, d in zip(bufs, (dx_c, ddt_c, dB_c, dC_c), strict=True))
        return dH, dA + dA_c, bufs

    def group(i, carry):
        bufs, dA_buf, dH0_buf = carry
        bs = _group_start(b, k, i)
        dH = None if dfinal is None else jax.lax.dynamic_slice_in_dim(dfinal, bs, k, 0)
        dA = jnp.zeros((k, g, j), f32)
        if nc > 1:
            dH, dA, bufs = one_chunk(nc - 1, bs, dH, dA, bufs, True)
        if nc > 2:
            dH, dA, bufs = _loop(nc - 2, lambda ci, c: one_chunk(ci + 1, bs, *c, False),
                                 (dH, dA, bufs), reverse=True)
        dH, dA, bufs = one_chunk(0, bs, dH, dA, bufs, nc == 1)
        # dA is summed over the batch at the end: a sequence recomputed by an overlapping
        # group overwrites its own row instead of adding to it twice.
        dA_buf = jax.lax.dynamic_update_slice_in_dim(dA_buf, dA, bs, 0)
        if H0 is not None:
            dH0_buf = jax.lax.dynamic_update_slice_in_dim(dH0_buf, dH, bs, 0)
        return bufs, dA_buf, dH0_buf

    init = after(dy, ((jnp.zeros(x.shape, x.dtype), jnp.zeros(dt.shape, f32),
                       jnp.zeros(B.shape, f32), jnp.zeros(C.shape, f32)),
                      jnp.zeros((b, g, j), f32), None if H0 is None else jnp.zeros(H0.shape, f32)))
    (dx, ddt, dB, dC), dA, dH0 = _loop(-(-b // k), group, init)
    return dx, ddt, jnp.sum(dA, axis=0), dB, dC, dH0


def _step_bytes(chunk: int, nheads: int, headdim: int, ngroups: int, row_block: int) -> int:
    """Temporaries of one backward step per sequence, in bytes (the forward needs less).

    Calibrated on XLA's memory analysis of the backward (CPU): ~24 float32 (Q, h p) arrays per
    sequence at Q = 256, h p = 1024; conservative (3x too high) at Q = 62.
    """
    return 4 * chunk * (24 * nheads * headdim + 2 * nheads * min(row_block, chunk)
                        + ngroups * chunk)


def sequences_per_step(platform: str, chunk: int, nheads: int, headdim: int, ngroups: int,
                       row_block: int = ROW_BLOCK) -> int:
    """Sequences per step of the chunk loop when lowering for `platform` ("cpu", "cuda", ...).

    chunk: Q = min(chunk_size, seqlen). The step's temporaries stay near _CPU_STEP_BYTES on the
    CPU and _ACCELERATOR_STEP_BYTES elsewhere.
    """
    budget = _CPU_STEP_BYTES if platform == "cpu" else _ACCELERATOR_STEP_BYTES
    return max(1, budget // _step_bytes(chunk, nheads, headdim, ngroups, row_block))


def _per_platform(fn, seqs_cpu: int, seqs_other: int, *args):
    """fn(*args, seqs=...) with the step size of the platform the computation is lowered for."""
    if seqs_cpu == seqs_other:
        return fn(*args, seqs=seqs_cpu)
    return jax.lax.platform_dependent(*args, cpu=functools.partial(fn, seqs=seqs_cpu),
                                      default=functools.partial(fn, seqs=seqs_other))


@functools.cache
def _ssd_fn(chunk: int, row_block: int, seqs_cpu: int, seqs_other: int):
    """The custom_vjp SSD on internal layouts (see `_forward`), for one static configuration."""
    static = dict(chunk=chunk, row_block=row_block)
    forward = functools.partial(_per_platform, functools.partial(_forward, **static), seqs_cpu,
                                seqs_other)
    backward = functools.partial(_per_platform, functools.partial(_backward, **static),
                                 seqs_cpu, seqs_other)

    @jax.custom_vjp
    def ssd(x, dt, A, B, C, H0):
        y, _, final = forward(x, dt, A, B, C, H0)
        return y, final

    def ssd_fwd(x, dt, A, B, C, H0):
        args = jax.tree.map(lambda a: a.value, (x, dt, A, B, C, H0))
        y, hs, final = forward(*args)
        return (y, final), (*args, hs, y)

    def ssd_bwd(res, cts):
        x, dt, A, B, C, H0, hs, y = res
        dy, dfinal = cts
        if isinstance(dy, SymbolicZero):
            dy = jnp.zeros(y.shape, f32)
        if isinstance(dfinal, SymbolicZero):  # the final state is unused: skip its terms
            dfinal = None
        dx, ddt, dA, dB, dC, dH0 = backward(x, dt, A, B, C, H0, hs, y, dy, dfinal)
        return dx, ddt, dA.astype(A.dtype), dB.astype(B.dtype), dC.astype(C.dtype), dH0

    ssd.defvjp(ssd_fwd, ssd_bwd, symbolic_zeros=True)
    return jax.jit(ssd)  # one compilation when called eagerly; inlined under an outer jit


def ssd_xla(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
            chunk_size: int, initial_states: jax.Array | None = None, *,
            row_block: int = ROW_BLOCK, sequences_per_step_override: int | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD, differentiable in x, dt, A, B, C and initial_states.

    Args:
      x: (b, l, h, p). dt: (b, l, h) float32, already biased/softplus'd. A: (h,).
      B, C: (b, l, g, n). chunk_size: Q, the chunk length (a chunk never exceeds l).
      initial_states: (b, h, p, n) or None (zeros).
      row_block: rows of the intra-chunk quadratic form per block (a cost knob; any value >= 1
        computes the same function).
      sequences_per_step_override: sequences per step on every platform, instead of
        `sequences_per_step` of the platform lowered for (tests; tuning).
    Returns:
      y (b, l, h, p) float32 without the D skip, final state (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    j = h // g
    q = min(chunk_size, l)
    if sequences_per_step_override is None:
        seqs = [sequences_per_step(pl, q, h, p, g, row_block) for pl in ("cpu", "cuda")]
    else:
        seqs = [sequences_per_step_override] * 2
    ssd = _ssd_fn(chunk_size, row_block, *seqs)
    # States inside are (b, g, n, j p): C H and B^T X are then plain matmuls.
    H0 = (None if initial_states is None else initial_states.astype(f32).reshape(
        b, g, j, p, n).transpose(0, 1, 4, 2, 3).reshape(b, g, n, j * p))
    y, final = ssd(x.reshape(b, l, g, j, p), dt.astype(f32).reshape(b, l, g, j),
                   A.astype(f32).reshape(g, j), B, C, H0)
    final = final.reshape(b, g, n, j, p).transpose(0, 1, 3, 4, 2).reshape(b, h, p, n)
    return y.reshape(b, l, h, p), final
