"""Chunked SSD in pure JAX (Listing 1 of Dao & Gu 2024, "Transformers are SSMs").

The sequence is cut into chunks of Q steps. Within a chunk the output is a masked quadratic form
(attention-like); across chunks a (h, p, n) state is carried. Four steps:

  1. intra-chunk output   Y_diag[l] = sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s
  2. chunk states         S_c = sum_s exp(cs_last - cs_s) dt_s x_s B_s^T
  3. state passing        H_c = exp(cs_last(c-1)) H_{c-1} + S_{c-1}   (sequential over chunks)
  4. state -> output      Y_off[l] = exp(cs_l) C_l H_c

where cs is the within-chunk cumulative sum of dt*A. The segment sums are differences of
within-chunk cumulative sums, and the masked-out upper triangle (s > l) is capped at 0 *before*
the exponential so that it never overflows; keeping the cumsum within a chunk bounds its
magnitude, which keeps the difference accurate in float32.

Contraction order (why it is faster than a plain transcription): C.B^T is formed once per chunk
and group (not per head), heads are laid out as (g, heads-per-group) so groups broadcast without
copies, and the only per-head (Q, Q) tensor is the decay-weighted score matrix that the
quadratic form needs anyway, built in 64-row blocks that skip the all-zero upper triangle. On
the CPU, steps 1-2 run over groups of chunks whose score tensors fit in cache.

FLOPs (multiply-adds counted as 2) for b sequences of length l (padded to c chunks of Q):
  C.B^T:          2 b c g Q^2 n
  intra output:   2 b c h Q^2 p      (+ O(b c h Q^2) for the decay mask)
  chunk states:   2 b c h Q p n
  state output:   2 b c h Q p n
  state passing:  O(b c h p n)

Letters: b batch, l sequence, c chunk, k a stack of chunks (b*c or a group of them), q/s
positions in a chunk, h heads (= g groups x j heads per group), p head dim, n state dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Rows of the intra-chunk quadratic form handled together. Row block i only needs columns up to
# its own end, so blocks skip the all-zero upper triangle: 10/16 of the work at Q = 256.
_ROW_BLOCK = 64


def _intra_chunk_rows(cb: jax.Array, dA_cs: jax.Array, xdt: jax.Array, start: int,
                      stop: int) -> jax.Array:
    """Rows [start, stop) of the intra-chunk output, from columns [0, stop).

    cb (k, g, q, q) float32; dA_cs (k, g, j, q); xdt (k, g, j, q, p) (dt-scaled x), for k chunks.
    Returns (k, g, j, stop - start, p) float32.
    """
    causal = jnp.tril(jnp.ones((stop - start, stop), bool), k=start)
    cb = cb[..., start:stop, :stop] * causal  # the causal mask, once per group, not per head
    seg = dA_cs[..., start:stop, None] - dA_cs[..., None, :stop]  # (k, g, j, rows, cols)
    # Capping the masked-out upper triangle at 0 keeps its exp from overflowing (it is then
    # multiplied by the zeroed cb). A min against a constant, not where(causal, seg, -inf):
    # XLA:CPU does not vectorise that select, which made it ~4x slower here.
    cap = jnp.where(causal, jnp.inf, 0.0)
    scores = cb[:, :, None] * jnp.exp(jnp.minimum(seg, cap))
    return jnp.einsum("kgjqs,kgjsp->kgjqp", scores.astype(xdt.dtype), xdt[..., :stop, :],
                      preferred_element_type=jnp.float32)


def _chunk_local(x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array, A: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Steps 1 and 2 for a stack of k chunks, each on its own.

    Head-major layouts (.., g, j, q, .) make every contraction a batched matmul over contiguous
    (q, .) tiles. Args: x (k, g, j, q, p); dt (k, g, j, q) float32; B, C (k, q, g, n);
    A (g, j, 1) float32. Returns the intra-chunk output y (k, g, j, q, p) float32, the chunk
    states (k, g, j, p, n) float32 and the within-chunk cumsum of dt*A (k, g, j, q).
    """
    q = x.shape[3]
    f32 = jnp.float32
    # associative_scan, not cumsum: XLA:CPU lowers cumsum to a reduce-window that made it the
    # costliest op of the forward pass here (measured ~25 ms of CPU time at l=2048).
    dA_cs = jax.lax.associative_scan(jnp.add, dt * A, axis=-1)  # (k, g, j, q)
    # dt scales inputs, not scores: a (q, p) multiply instead of a per-head (q, s) one.
    xdt = x.astype(f32) * dt[..., None]  # (k, g, j, q, p)

    # 1. Intra-chunk: scores = (C_q . B_s) exp(cs_q - cs_s) dt_s, lower-triangular in (q, s).
    cb = jnp.einsum("kqgn,ksgn->kgqs", C, B, preferred_element_type=f32)  # (k, g, q, s)
    y = jnp.concatenate([
        _intra_chunk_rows(cb, dA_cs, xdt.astype(x.dtype), start, min(start + _ROW_BLOCK, q))
        for start in range(0, q, _ROW_BLOCK)], axis=-2)  # (k, g, j, q, p)

    # 2. Chunk states: what each chunk adds to the state by its end.
    to_end = jnp.exp(dA_cs[..., -1:] - dA_cs)  # (k, g, j, q)
    xw = (xdt * to_end[..., None]).astype(x.dtype)
    chunk_states = jnp.einsum("kgjqp,kqgn->kgjpn", xw, B,
                              preferred_element_type=f32)  # (k, g, j, p, n)
    return y, chunk_states, dA_cs


# Bytes of (q, s) float32 scores per step on the CPU: about half the L2 cache of this class of
# machine. Accelerators take every chunk in one step (a loop would serialise them).
_CPU_STEP_SCORE_BYTES = 1 << 23


def chunks_per_step(num_chunks: int, nheads: int, q: int) -> int:
    """How many chunks steps 1-2 process at a time: all of them except on the CPU."""
    if jax.default_backend() != "cpu":
        return num_chunks
    return max(1, _CPU_STEP_SCORE_BYTES // (nheads * q * q * 4))


def ssd_xla(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
            chunk_size: int, initial_states: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD.

    Args:
      x: (b, l, h, p). dt: (b, l, h) float32, already biased/softplus'd. A: (h,).
      B, C: (b, l, g, n). chunk_size: Q, the chunk length (a chunk never exceeds l).
      initial_states: (b, h, p, n) or None (zeros).
    Returns:
      y (b, l, h, p) float32 without the D skip, final state (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    j = h // g
    f32 = jnp.float32
    # A chunk longer than the sequence only adds padding: the result is the same.
    q = min(chunk_size, l)
    c = -(-l // q)
    pad = c * q - l
    # Zero padding is exact: dt = 0 means decay exp(0) = 1 and no input, so the state and the
    # real outputs are untouched.
    if pad:
        pad_seq = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        x, dt, B, C = map(pad_seq, (x, dt, B, C))

    mm_dtype = x.dtype  # matmul operands stay in the input dtype; accumulation is float32
    # Steps 1-2 are independent per chunk: run them on all b*c chunks at once, or on the CPU in
    # groups of chunks whose (q, s) score tensors fit in cache (~15% faster at l = 2048 here).
    chunks = (x.reshape(b * c, q, g, j, p).transpose(0, 2, 3, 1, 4),  # (k, g, j, q, p)
              dt.reshape(b * c, q, g, j).transpose(0, 2, 3, 1),  # (k, g, j, q)
              B.reshape(b * c, q, g, n), C.reshape(b * c, q, g, n))  # (k, q, g, n)
    local = functools.partial(_chunk_local, A=A.astype(f32).reshape(g, j, 1))
    per_step = chunks_per_step(b * c, h, q)
    if per_step >= b * c:
        y, chunk_states, dA_cs = local(*chunks)
    else:
        steps = -(-b * c // per_step)
        pad_k = lambda t: jnp.pad(t, [(0, steps * per_step - b * c)] + [(0, 0)] * (t.ndim - 1))
        grouped = [pad_k(t).reshape(steps, per_step, *t.shape[1:]) for t in chunks]
        outs = jax.lax.map(lambda args: local(*args), grouped)
        y, chunk_states, dA_cs = (t.reshape(steps * per_step, *t.shape[2:])[:b * c]
                                  for t in outs)
    y = y.reshape(b, c, g, j, q, p)
    chunk_states = chunk_states.reshape(b, c, g, j, p, n)
    dA_cs = dA_cs.reshape(b, c, g, j, q)
    C = C.reshape(b, c, q, g, n)

    # 3. State passing: the state entering each chunk. Sequential, but only c steps.
    chunk_decay = jnp.exp(dA_cs[..., -1])  # (b, c, g, j)
    state0 = (jnp.zeros((b, g, j, p, n), f32) if initial_states is None
              else initial_states.astype(f32).reshape(b, g, j, p, n))

    def pass_state(state, inputs):
        decay_c, new_c = inputs
        return decay_c[..., None, None] * state + new_c, state

    final, entering = jax.lax.scan(
        pass_state, state0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # (b, c, g, j, p, n)

    # 4. State -> output, decayed from the chunk start to each position.
    y_off = jnp.einsum("bcqgn,bcgjpn->bcgjqp", C, entering.astype(mm_dtype),
                       preferred_element_type=f32)
    y = y + y_off * jnp.exp(dA_cs)[..., None]
    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :l]
    return y, final.reshape(b, h, p, n)
