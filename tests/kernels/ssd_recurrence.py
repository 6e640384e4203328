"""The SSD recurrence and its hand-written adjoint in float64 NumPy: what every impl is tested on.

Written from the equations (docs/DESIGN.md#ssd), independent of JAX:
    dts = softplus(dt + dt_bias)               (or dt + dt_bias without softplus)
    h_t = exp(dts_t A) h_{t-1} + dts_t x_t B_t^T
    y_t = (C_t h_t + D x_t) * silu(z_t)
Head i reads group i // (h // g) of B and C.
"""

from __future__ import annotations

import numpy as np


def _softplus(v):
    return np.logaddexp(0.0, v)


def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def random_inputs(rng: np.random.Generator, b: int, l: int, h: int, p: int, g: int, n: int,
                  *, with_d: str | None = "h", with_z: bool = True, with_bias: bool = True,
                  with_init: bool = True) -> dict[str, np.ndarray | None]:
    """Fresh float64 inputs with realistic magnitudes (dt near softplus range, A < 0)."""
    d_shape = {"h": (h,), "hp": (h, p), None: None}[with_d]
    return dict(
        x=rng.standard_normal((b, l, h, p)),
        dt=rng.uniform(-4.0, 1.0, (b, l, h)),
        A=-rng.uniform(0.5, 8.0, (h,)),
        B=rng.standard_normal((b, l, g, n)),
        C=rng.standard_normal((b, l, g, n)),
        D=rng.standard_normal(d_shape) if d_shape else None,
        z=rng.standard_normal((b, l, h, p)) if with_z else None,
        dt_bias=rng.uniform(-2.0, 0.5, (h,)) if with_bias else None,
        initial_states=rng.standard_normal((b, h, p, n)) if with_init else None,
    )


def _expand_groups(t, h):
    g = t.shape[2]
    return np.repeat(t, h // g, axis=2)


def _fold_groups(t, g):
    b, l, h, n = t.shape
    return t.reshape(b, l, g, h // g, n).sum(axis=3)


def forward(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None,
            dt_softplus=True):
    """Returns (y (b,l,h,p), final state (b,h,p,n), cache for `backward`)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    dtp = dt + (0.0 if dt_bias is None else dt_bias)
    dts = _softplus(dtp) if dt_softplus else dtp
    Bh, Ch = _expand_groups(B, h), _expand_groups(C, h)
    decay = np.exp(dts * A)  # (b, l, h)
    state = np.zeros((b, h, p, n)) if initial_states is None else initial_states.copy()
    states = np.empty((l + 1, b, h, p, n))
    states[0] = state
    y0 = np.empty((b, l, h, p))
    for t in range(l):
        state = (decay[:, t, :, None, None] * state
                 + (dts[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :])
        states[t + 1] = state
        y0[:, t] = np.einsum("bhpn,bhn->bhp", state, Ch[:, t])
    y1 = y0 + (0.0 if D is None else x * (D[:, None] if D.ndim == 1 else D))
    y = y1 if z is None else y1 * z * _sigmoid(z)
    cache = dict(dtp=dtp, dts=dts, Bh=Bh, Ch=Ch, decay=decay, states=states, y1=y1)
    return y, state, cache


def backward(gy, g_final, cache, x, dt, A, B, C, D=None, z=None, dt_bias=None,
             initial_states=None, dt_softplus=True):
    """Reverse-mode adjoint of `forward`: gradients of <gy, y> + <g_final, final state>."""
    b, l, h, p = x.shape
    g = B.shape[2]
    dts, Bh, Ch, decay, states, y1 = (cache[k] for k in ("dts", "Bh", "Ch", "decay", "states",
                                                         "y1"))
    grads = {}
    if z is not None:
        sig = _sigmoid(z)
        grads["z"] = gy * y1 * sig * (1.0 + z * (1.0 - sig))
        gy1 = gy * z * sig
    else:
        gy1 = gy
    gx = np.zeros_like(x)
    if D is not None:
        Dfull = D[:, None] if D.ndim == 1 else D
        gx += gy1 * Dfull
        gDfull = (gy1 * x).sum(axis=(0, 1))
        grads["D"] = gDfull.sum(axis=1) if D.ndim == 1 else gDfull
    gdts = np.zeros_like(dts)
    gA = np.zeros_like(A)
    gBh, gCh = np.zeros_like(Bh), np.zeros_like(Ch)
    gstate = np.zeros_like(states[0]) if g_final is None else g_final.copy()
    for t in reversed(range(l)):
        gstate += gy1[:, t, :, :, None] * Ch[:, t, :, None, :]
        gCh[:, t] = np.einsum("bhp,bhpn->bhn", gy1[:, t], states[t + 1])
        xb_grad = np.einsum("bhpn,bhn->bhp", gstate, Bh[:, t])  # d/d(dts x)
        gx[:, t] += dts[:, t, :, None] * xb_grad
        gdts[:, t] += (xb_grad * x[:, t]).sum(-1)
        gBh[:, t] = np.einsum("bhpn,bhp->bhn", gstate, dts[:, t, :, None] * x[:, t])
        g_decay = (gstate * states[t]).sum(axis=(-1, -2))  # (b, h)
        gdts[:, t] += g_decay * decay[:, t] * A
        gA += (g_decay * decay[:, t] * dts[:, t]).sum(0)
        gstate = gstate * decay[:, t, :, None, None]
    gdtp = gdts * _sigmoid(cache["dtp"]) if dt_softplus else gdts
    grads.update(x=gx, dt=gdtp, A=gA, B=_fold_groups(gBh, g), C=_fold_groups(gCh, g))
    if dt_bias is not None:
        grads["dt_bias"] = gdtp.sum(axis=(0, 1))
    if initial_states is not None:
        grads["initial_states"] = gstate
    return grads
