"""Mamba2 mixer, norms and bidirectional block against a float64 NumPy transcription."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.mamba2 import (
    BiMamba2Block,
    DirectionalMamba2,
    GatedRMSNorm,
    Mamba2,
    Mamba2Config,
    RMSNorm,
)

CFG = Mamba2Config(d_model=16, expand=2, d_state=8, headdim=8, ngroups=2, d_conv=4,
                   chunk_size=8, ssd_impl="xla")


def _silu(v):
    return v / (1.0 + np.exp(-v))


def mixer_reference(p: dict, u: np.ndarray, cfg: Mamba2Config) -> np.ndarray:
    """mamba_ssm Mamba2 forward in float64, step by step. u (b, l, d) -> (b, l, d)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    b, l, d = u.shape
    e = cfg.expand * d
    h, hp, g, n = e // cfg.headdim, cfg.headdim, cfg.ngroups, cfg.d_state
    zxbcdt = u @ p["in_proj"]["kernel"]
    z, xbc, dt = zxbcdt[..., :e], zxbcdt[..., e:2 * e + 2 * g * n], zxbcdt[..., -h:]
    w, k = p["conv_weight"], cfg.d_conv
    conv = np.zeros_like(xbc) + p["conv_bias"]
    for t in range(l):  # causal: step t sees t-k+1 .. t
        for i in range(k):
            s = t - (k - 1) + i
            if s >= 0:
                conv[:, t] += w[i] * xbc[:, s]
    xbc = _silu(conv)
    x = xbc[..., :e].reshape(b, l, h, hp)
    B = xbc[..., e:e + g * n].reshape(b, l, g, n)
    C = xbc[..., e + g * n:].reshape(b, l, g, n)
    dt = np.logaddexp(0.0, dt + p["dt_bias"])  # softplus
    A = -np.exp(p["A_log"])
    y = np.zeros((b, l, h, hp))
    state = np.zeros((b, h, hp, n))
    for t in range(l):
        for hi in range(h):
            gi = hi // (h // g)
            state[:, hi] = (np.exp(dt[:, t, hi] * A[hi])[:, None, None] * state[:, hi]
                            + dt[:, t, hi, None, None] * x[:, t, hi, :, None]
                            * B[:, t, gi, None, :])
            y[:, t, hi] = np.einsum("bpn,bn->bp", state[:, hi], C[:, t, gi])
    y = y + p["D"][:, None] * x
    y = y.reshape(b, l, e) * _silu(z)
    yg = y.reshape(b, l, g, e // g)
    yg = yg / np.sqrt(np.mean(yg ** 2, axis=-1, keepdims=True) + 1e-5)
    y = yg.reshape(b, l, e) * p["norm"]["weight"]
    return y @ p["out_proj"]["kernel"]


def _perturb_params(params, rng):
    """Replace norm weights / D (initialised to ones) by random values so the test sees them."""
    def f(path, a):
        name = jax.tree_util.keystr(path)
        if "weight" in name and "conv" not in name or name.endswith("['D']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
        return a
    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("impl", ["xla", "scan"])
def test_mixer_matches_float64_reference(impl):
    rng = np.random.default_rng(0)
    cfg = dataclasses.replace(CFG, ssd_impl=impl)
    u = rng.standard_normal((2, 21, cfg.d_model)).astype(np.float32)
    mixer = Mamba2(cfg)
    params = _perturb_params(mixer.init(jax.random.key(1), u)["params"], rng)
    got = np.asarray(mixer.apply({"params": params}, u))
    want = mixer_reference(params, u.astype(np.float64), cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_mixer_init_follows_mamba_ssm():
    mixer = Mamba2(dataclasses.replace(CFG, expand=8, headdim=2))
    params = mixer.init(jax.random.key(0), jnp.ones((1, 4, 16)))["params"]
    h = 8 * 16 // 2
    A = np.exp(np.asarray(params["A_log"]))
    dt = np.log1p(np.exp(np.asarray(params["dt_bias"])))
    assert params["A_log"].shape == params["dt_bias"].shape == params["D"].shape == (h,)
    assert np.all((A >= 1) & (A <= 16)) and A.std() > 1  # U(1, 16), not constant
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001))
    np.testing.assert_array_equal(np.asarray(params["D"]), 1.0)
    bound = 1 / np.sqrt(16)
    k = np.asarray(params["in_proj"]["kernel"])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound  # torch Linear init


def test_rms_norms():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 12)).astype(np.float32) * 3
    z = rng.standard_normal((3, 12)).astype(np.float32)
    norm = RMSNorm()
    p = norm.init(jax.random.key(0), x)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(norm.apply(p, x)), want, rtol=1e-5)
    gated = GatedRMSNorm(group_size=4)
    p = gated.init(jax.random.key(0), x, z)
    y = (x * _silu(z.astype(np.float64))).reshape(3, 3, 4)
    want = (y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + 1e-5)).reshape(3, 12)
    np.testing.assert_allclose(np.asarray(gated.apply(p, x, z)), want, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_direction_is_causal_or_anticausal(reverse):
    rng = np.random.default_rng(3)
    l, t0 = 19, 9
    u = rng.standard_normal((2, l, CFG.d_model)).astype(np.float32)
    mod = DirectionalMamba2(CFG, reverse=reverse)
    params = mod.init(jax.random.key(4), u)
    u2 = u.copy()
    u2[:, t0] += rng.standard_normal((2, CFG.d_model)).astype(np.float32)
    y, y2 = np.asarray(mod.apply(params, u)), np.asarray(mod.apply(params, u2))
    unchanged = slice(t0 + 1, l) if reverse else slice(0, t0)
    changed = slice(0, t0) if reverse else slice(t0 + 1, l)
    np.testing.assert_array_equal(y[:, unchanged], y2[:, unchanged])
    assert np.all(np.abs(y[:, changed] - y2[:, changed]).max(axis=-1) > 0)


def test_block_sees_both_directions_and_keeps_residual():
    rng = np.random.default_rng(5)
    u = rng.standard_normal((2, 15, CFG.d_model)).astype(np.float32)
    block = BiMamba2Block(CFG)
    params = block.init(jax.random.key(6), u)
    y = np.asarray(block.apply(params, u))
    assert y.shape == u.shape and np.all(np.isfinite(y))
    u2 = u.copy()
    u2[:, 7] += 1.0
    diff = np.abs(np.asarray(block.apply(params, u2)) - y).max(axis=(0, 2))
    assert np.all(diff > 0)  # every step sees step 7: past through one direction, future the other
    # With the merge layer zeroed the block is the identity (the residual).
    zero = jax.tree_util.tree_map(jnp.zeros_like, params["params"]["merge"])
    p0 = {"params": {**params["params"], "merge": zero}}
    np.testing.assert_array_equal(np.asarray(block.apply(p0, u)), u)


def test_bf16_mixer_is_finite_and_close_to_float32():
    rng = np.random.default_rng(7)
    u = rng.standard_normal((2, 40, CFG.d_model)).astype(np.float32)
    f32 = Mamba2(CFG)
    bf16 = Mamba2(dataclasses.replace(CFG, dtype=jnp.bfloat16))
    params = f32.init(jax.random.key(8), u)
    y32 = np.asarray(f32.apply(params, u))
    y16 = bf16.apply(params, u)
    assert y16.dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    y16 = np.asarray(y16.astype(jnp.float32))
    assert np.all(np.isfinite(y16))
    assert np.linalg.norm(y16 - y32) / np.linalg.norm(y32) < 5e-2
