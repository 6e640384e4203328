"""Plain-jnp references: the whole SSD as in the paper's Listing 1, and each kernel step.

`ssd_minimal` is the oracle of every chunked implementation: Dao & Gu 2024, "Transformers are
SSMs", Listing 1 (mamba v2.2.2 `mamba_ssm/modules/ssd_minimal.py`, `ssd_minimal_discrete`),
written here in jnp with `dt` applied as in mamba's call of it (x * dt, A * dt). It is exact in
whatever dtype it is given (float64 under `jax.experimental.enable_x64`), materialises every
(l, l) decay matrix of a chunk pair, and JAX differentiates it: small shapes only.

The step references take and return what the Pallas kernels of both backends take and return
(`kernels.ssd.pallas` lays them out): x (b, L, h, P) and B, C (b, L, g, N) in the matmul dtype,
dt and cs (b, h, L) float32 with cs the within-chunk cumulative sum of dt*A, states
(b, c, h, P, N) float32; sums in float32 after the products of the matmul-dtype operands.

Letters: b batch, l/L sequence (padded), c chunks, q/t/s positions in a chunk, h heads, g groups,
p/P head dim, n/N state dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


# --- the whole SSD: Listing 1 ----------------------------------------------------------------

def segsum(a: jax.Array) -> jax.Array:
    """(..., q) -> (..., q, q): sum_{s < k <= t} a_k below the diagonal, -inf above (Listing 1)."""
    q = a.shape[-1]
    cum = jnp.cumsum(a, axis=-1)
    diff = cum[..., :, None] - cum[..., None, :]
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), diff, -jnp.inf)


def ssd_minimal(x, dt, A, B, C, chunk_size: int, initial_states=None):
    """The SSD by Listing 1: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t.

    Args:
      x: (b, l, h, p). dt: (b, l, h) (already biased/softplus'd). A: (h,).
      B, C: (b, l, g, n), h % g == 0 (head i reads group i // (h // g)).
      chunk_size: the chunk of the algorithm (l is padded to a multiple with dt = 0: exact).
      initial_states: (b, h, p, n) or None.
    Returns:
      y (b, l, h, p) and the final state (b, h, p, n), in the inputs' dtype.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = chunk_size
    c = -(-l // q)
    pad = lambda t: jnp.pad(t, [(0, 0), (0, c * q - l)] + [(0, 0)] * (t.ndim - 2))
    X = pad(x * dt[..., None]).reshape(b, c, q, h, p)
    Ad = jnp.moveaxis(pad(dt * A).reshape(b, c, q, h), -1, 1)  # (b, h, c, q)
    Bh = pad(jnp.repeat(B, h // g, axis=2)).reshape(b, c, q, h, n)
    Ch = pad(jnp.repeat(C, h // g, axis=2)).reshape(b, c, q, h, n)
    A_cumsum = jnp.cumsum(Ad, axis=-1)
    # 1. intra-chunk (diagonal blocks) outputs
    L = jnp.exp(segsum(Ad))
    Y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X)
    # 2. each chunk's state (right term of the low-rank factorisation)
    decay_states = jnp.exp(A_cumsum[..., -1:] - A_cumsum)
    states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_states, X)
    # 3. inter-chunk recurrence on the chunk boundaries
    if initial_states is None:
        initial_states = jnp.zeros_like(states[:, :1])
    else:
        initial_states = initial_states[:, None]
    states = jnp.concatenate([initial_states, states], axis=1)
    decay_chunk = jnp.exp(segsum(jnp.pad(A_cumsum[..., -1], [(0, 0), (0, 0), (1, 0)])))
    new_states = jnp.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output (left term of the low-rank factorisation)
    Y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, jnp.exp(A_cumsum))
    y = (Y_diag + Y_off).reshape(b, c * q, h, p)[:, :l]
    return y, final_state


# --- the kernels' steps ------------------------------------------------------------------------

def _heads(t: jax.Array, h: int) -> jax.Array:
    """(b, L, g, N) -> (b, L, h, N) float32: each group broadcast to its heads."""
    return jnp.repeat(t.astype(f32), h // t.shape[2], axis=2)


def _chunked(t: jax.Array, chunk: int) -> jax.Array:
    """(b, L, ...) -> (b, c, Q, ...)."""
    return t.reshape(t.shape[0], t.shape[1] // chunk, chunk, *t.shape[2:])


def _chunked_vec(t: jax.Array, chunk: int) -> jax.Array:
    """(b, h, L) -> (b, c, Q, h)."""
    b, h, L = t.shape
    return jnp.moveaxis(t.reshape(b, h, L // chunk, chunk), 1, -1)


def chunk_state_reference(u, v, dt, cs, *, chunk: int, to_end: bool) -> jax.Array:
    """Per chunk sum_s w_s u_s^T V_s, w = exp(cs_last - cs) dt (to_end) or exp(cs):
    (b, c, h, P, N) float32. u (b, L, h, P); v (b, L, g, N); dt, cs (b, h, L)."""
    h = u.shape[2]
    csq, dtq = _chunked_vec(cs, chunk), _chunked_vec(dt, chunk)  # (b, c, Q, h)
    w = jnp.exp(csq[:, :, -1:] - csq) * dtq if to_end else jnp.exp(csq)
    uw = (_chunked(u, chunk).astype(f32) * w[..., None]).astype(u.dtype).astype(f32)
    return jnp.einsum("bcshp,bcshn->bchpn", uw, _chunked(_heads(v, h), chunk))


def _causal_decay(cs: jax.Array, chunk: int) -> jax.Array:
    """exp(cs_t - cs_s) for s <= t within each chunk, else 0: (b, c, h, Q_t, Q_s)."""
    csq = jnp.moveaxis(_chunked_vec(cs, chunk), -1, 2)  # (b, c, h, Q)
    diff = csq[..., :, None] - csq[..., None, :]
    return jnp.exp(jnp.where(jnp.tril(jnp.ones((chunk, chunk), bool)), diff, -jnp.inf))


def chunk_scan_reference(x, B, C, dt, cs, states, *, chunk: int) -> jax.Array:
    """y_t = exp(cs_t) C_t H_c^T + sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s: (b, L, h, P)
    float32; states (b, c, h, P, N) entering each chunk, or None (zeros)."""
    b, L, h, P = x.shape
    mm = x.dtype
    Cq, Bq = _chunked(_heads(C, h), chunk), _chunked(_heads(B, h), chunk)  # (b, c, Q, h, N)
    cb = jnp.einsum("bcthn,bcshn->bchts", Cq, Bq)
    scores = cb * _causal_decay(cs, chunk) * jnp.moveaxis(_chunked_vec(dt, chunk), -1, 2)[
        ..., None, :]
    y = jnp.einsum("bchts,bcshp->bcthp", scores.astype(mm).astype(f32),
                   _chunked(x, chunk).astype(f32))
    if states is not None:
        y_off = jnp.einsum("bcthn,bchpn->bcthp", Cq, states.astype(mm).astype(f32))
        y = y + y_off * jnp.exp(_chunked_vec(cs, chunk))[..., None]
    return y.reshape(b, L, h, P)


def state_passing_fwd_reference(x, B, dt, cs, init, *, chunk: int):
    """States entering each chunk (b, c, h, P, N) and the final state (b, h, P, N), float32:
    H_0 = init (or 0), H_{c+1} = exp(cs_last,c) H_c + S_c."""
    b, L, h, P = x.shape
    S = chunk_state_reference(x, B, dt, cs, chunk=chunk, to_end=True)
    decay = jnp.exp(cs[:, :, chunk - 1::chunk])  # (b, h, c)
    state = jnp.zeros((b, h, P, B.shape[3]), f32) if init is None else init
    entering = []
    for ic in range(L // chunk):
        entering.append(state)
        state = decay[:, :, ic, None, None] * state + S[:, ic]
    return jnp.stack(entering, axis=1), state


def state_passing_bwd_reference(dy, C, cs, states, d_final, *, chunk: int):
    """Reverse of `state_passing_fwd_reference`: the gradients of each S_c (b, c, h, P, N), of
    each chunk's decay exp(cs_last) (b, h, c) and of the initial state (b, h, P, N)."""
    b, L, h, P = dy.shape
    Y = chunk_state_reference(dy, C, cs, cs, chunk=chunk, to_end=False)
    decay = jnp.exp(cs[:, :, chunk - 1::chunk])
    grad = jnp.zeros((b, h, P, C.shape[3]), f32) if d_final is None else d_final
    s_grads, d_decay = [None] * (L // chunk), [None] * (L // chunk)
    for ic in reversed(range(L // chunk)):
        s_grads[ic] = grad
        d_decay[ic] = jnp.sum(grad * states[:, ic], axis=(-2, -1))
        grad = Y[:, ic] + decay[:, :, ic, None, None] * grad
    return jnp.stack(s_grads, axis=1), jnp.stack(d_decay, axis=-1), grad


def _bwd_terms(x, B, C, dt, cs, dy, chunk: int):
    """The (b, c, h, Q_t, Q_s) float32 terms both backward references share."""
    h = x.shape[2]
    mm = x.dtype
    Cq, Bq = _chunked(_heads(C, h), chunk), _chunked(_heads(B, h), chunk)
    xq, dyq = _chunked(x, chunk).astype(f32), _chunked(dy, chunk).astype(f32)
    decay = _causal_decay(cs, chunk)
    dtq = jnp.moveaxis(_chunked_vec(dt, chunk), -1, 2)  # (b, c, h, Q)
    cb = jnp.einsum("bcthn,bcshn->bchts", Cq, Bq)
    dyx = jnp.einsum("bcthp,bcshp->bchts", dyq, xq)
    return mm, Cq, Bq, xq, dyq, decay, dtq, cb, dyx


def chunk_scan_bwd_rows_reference(x, B, C, dt, cs, states, dy, *, chunk: int):
    """dC (b, L, g, N) and the row part of dcs (b, h, L), float32 (see
    `kernels.ssd.mosaic.chunk_scan_bwd` for the formulas)."""
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    mm, Cq, Bq, xq, dyq, decay, dtq, cb, dyx = _bwd_terms(x, B, C, dt, cs, dy, chunk)
    w = dyx * decay * dtq[..., None, :]
    dc = jnp.einsum("bchts,bcshn->bcthn", w.astype(mm).astype(f32), Bq)
    dcs = jnp.sum(w * cb, axis=-1)  # (b, c, h, Q)
    if states is not None:
        out_decay = jnp.exp(jnp.moveaxis(_chunked_vec(cs, chunk), -1, 2))  # (b, c, h, Q)
        st = states.astype(mm).astype(f32)
        dc = dc + jnp.einsum("bcthp,bchpn->bcthn", dyq, st) * jnp.moveaxis(out_decay, 2, 3)[
            ..., None]
        y_off = jnp.einsum("bcthn,bchpn->bchtp", Cq, st)
        dcs = dcs + out_decay * jnp.einsum("bcthp,bchtp->bcht", dyq, y_off)
    dc = dc.reshape(b, L, g, h // g, N).sum(axis=3)
    return dc, jnp.moveaxis(dcs, 2, 1).reshape(b, h, L)


def chunk_scan_bwd_cols_reference(x, B, C, dt, cs, state_grads, dy, *, chunk: int):
    """dx (b, L, h, P), dB (b, L, g, N) and the direct dt gradient's intra and state parts
    (b, h, L), float32."""
    b, L, h, P = x.shape
    g, N = B.shape[2], B.shape[3]
    mm, Cq, Bq, xq, dyq, decay, dtq, cb, dyx = _bwd_terms(x, B, C, dt, cs, dy, chunk)
    dx_intra = jnp.einsum("bchts,bcthp->bcshp", (cb * decay).astype(mm).astype(f32), dyq)
    dyx_d = dyx * decay
    ddt_intra = jnp.sum(dyx_d * cb, axis=-2)  # (b, c, h, Q_s)
    db = jnp.einsum("bchts,bcthn->bcshn", (dyx_d * dtq[..., None, :]).astype(mm).astype(f32),
                    Cq)
    dt_s = jnp.moveaxis(dtq, 2, 3)[..., None]  # (b, c, Q, h, 1)
    if state_grads is not None:
        csq = _chunked_vec(cs, chunk)  # (b, c, Q, h)
        to_end = jnp.exp(csq[:, :, -1:] - csq)[..., None]
        sg = state_grads.astype(mm).astype(f32)
        dx_state = jnp.einsum("bcshn,bchpn->bcshp", Bq, sg) * to_end
        db = db + jnp.einsum("bcshp,bchpn->bcshn", xq, sg) * to_end * dt_s
        ddt_state = jnp.moveaxis(jnp.sum(xq * dx_state, axis=-1), 3, 2)
        dx = dt_s * (dx_intra + dx_state)
    else:
        ddt_state = jnp.zeros_like(ddt_intra)
        dx = dt_s * dx_intra
    db = db.reshape(b, L, g, h // g, N).sum(axis=3)
    vec = lambda t: jnp.moveaxis(t, 2, 1).reshape(b, h, L)
    return dx.reshape(b, L, h, P), db, vec(ddt_intra), vec(ddt_state)
