"""BS-RoFormer's transformer (`mixer="transformer"`) against a float64 NumPy transcription of the
authors' layer: rotary embedding, values, gradients, dropout, parameter counts, the tiny config."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from bsmamba2_jax.model import BSMamba2, count_params
from bsmamba2_jax.roformer import (
    TransformerBlock,
    TransformerConfig,
    apply_rotary,
    attention,
    rotary_cos_sin,
    rotary_frequencies,
)
from configs.bsmamba2 import PAPER_BAND_WIDTHS
from configs.bsroformer import get_config

SR = 44100


def seed_of(*values) -> int:
    return zlib.crc32(repr(values).encode())


def rel_err(actual, expected) -> float:
    """||a - e|| / ||e||, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# ----------------------------------------------------------------------------- rotary embedding


def test_rotary_frequencies_are_rotary_embedding_torch_defaults():
    for e in (2, 16, 48, 64):
        want = 1.0 / 10000.0 ** (np.arange(0, e, 2) / e)  # float64
        got = rotary_frequencies(e)
        assert got.shape == (e // 2,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-7)
    with pytest.raises(ValueError, match="must be even"):
        rotary_frequencies(15)


@pytest.mark.parametrize("shape", [(2, 13, 3, 10), (1, 40, 1, 48)], ids=str)
def test_rotary_is_complex_rotation_by_position_times_frequency(shape):
    b, l, h, e = shape
    seed = seed_of("rotary", shape)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    got = np.asarray(apply_rotary(jnp.asarray(x), *rotary_cos_sin(l, e)))
    # x[2i] + j x[2i+1] times exp(j * position * 10000^(-2i/e)), directly in complex128.
    z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2]
    angle = np.arange(l)[:, None] * (1.0 / 10000.0 ** (np.arange(0, e, 2) / e))  # (l, e/2)
    w = z * np.exp(1j * angle)[None, :, None, :]
    want = np.stack([w.real, w.imag], axis=-1).reshape(shape)
    assert rel_err(got, want) < 1e-6, f"seed={seed}"


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(seed_of("relative"))
    e, l = 16, 30
    q, k = rng.standard_normal((2, 1, 1, 1, e)).astype(np.float32)
    cos, sin = rotary_cos_sin(l, e)
    rq = np.asarray(apply_rotary(jnp.broadcast_to(q, (1, l, 1, e)), cos, sin))[0, :, 0]
    rk = np.asarray(apply_rotary(jnp.broadcast_to(k, (1, l, 1, e)), cos, sin))[0, :, 0]
    scores = rq @ rk.T  # (l, l): q at position i against k at position j
    for offset in (-7, 0, 5):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4 * np.abs(scores).max())
    assert np.ptp(np.diagonal(scores, 0)) < np.ptp(scores[0])  # not constant everywhere


# ----------------------------------------------------------------------------- one layer


def random_torch_weights(rng: np.random.Generator, d: int, h: int, e: int,
                         mult: int = 4) -> dict[str, np.ndarray]:
    """One transformer layer's weights in the authors' (torch) layouts, float64, non-trivial."""
    inner, hidden = h * e, mult * d
    n = rng.standard_normal
    return {
        "attn_norm": 1.0 + 0.2 * n(d),
        "to_qkv": 1.5 * n((3 * inner, d)) / np.sqrt(d),  # rows (qkv, head, feature)
        "to_gates_w": n((h, d)) / np.sqrt(d),
        "to_gates_b": 0.5 * n(h),
        "to_out": n((d, inner)) / np.sqrt(inner),
        "ff_norm": 1.0 + 0.2 * n(d),
        "ff_w1": n((hidden, d)) / np.sqrt(d),
        "ff_b1": 0.2 * n(hidden),
        "ff_w2": n((d, hidden)) / np.sqrt(hidden),
        "ff_b2": 0.2 * n(d),
    }


def to_flax(w: dict[str, np.ndarray]) -> dict:
    """The torch-layout weights as TransformerBlock params (Linear weights transposed)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return {
        "attn": {"norm": {"gamma": f32(w["attn_norm"])},
                 "to_qkv": {"kernel": f32(w["to_qkv"].T)},
                 "to_gates": {"kernel": f32(w["to_gates_w"].T), "bias": f32(w["to_gates_b"])},
                 "to_out": {"kernel": f32(w["to_out"].T)}},
        "ff": {"norm": {"gamma": f32(w["ff_norm"])},
               "hidden": {"kernel": f32(w["ff_w1"].T), "bias": f32(w["ff_b1"])},
               "out": {"kernel": f32(w["ff_w2"].T), "bias": f32(w["ff_b2"])}},
    }


def layer_reference(w: dict[str, np.ndarray], x: np.ndarray, heads: int) -> np.ndarray:
    """The authors' `Transformer` (depth 1, norm_output=False) in eval mode, float64 NumPy.

    Written from EuiYeonKim/BSMamba2 `bs_model.py` (Attention, FeedForward, RMSNorm),
    `attend.py` (explicit softmax attention) and rotary-embedding-torch (interleaved
    `rotate_half`). x (b, n, d) -> (b, n, d).
    """
    def rms_norm(v, gamma):  # F.normalize(v, dim=-1) * sqrt(dim) * gamma
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12) \
            * np.sqrt(v.shape[-1]) * gamma

    def rotate_half(t):  # '... (d r) -> ... d r', (x1, x2) -> (-x2, x1)
        t = t.reshape(*t.shape[:-1], -1, 2)
        return np.stack([-t[..., 1], t[..., 0]], axis=-1).reshape(*t.shape[:-2], -1)

    b, n, d = x.shape
    a = rms_norm(x, w["attn_norm"])
    qkv = (a @ w["to_qkv"].T).reshape(b, n, 3, heads, -1)  # 'b n (qkv h d)'
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (b, h, n, e)
    e = q.shape[-1]
    freqs = 1.0 / 10000.0 ** (np.arange(0, e, 2) / e)
    angles = np.repeat(np.arange(n)[:, None] * freqs, 2, axis=-1)  # '... n -> ... (n r)'
    q = q * np.cos(angles) + rotate_half(q) * np.sin(angles)
    k = k * np.cos(angles) + rotate_half(k) * np.sin(angles)
    sim = q @ k.swapaxes(-1, -2) * e ** -0.5
    attn = np.exp(sim - sim.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = attn @ v  # (b, h, n, e)
    gates = 1.0 / (1.0 + np.exp(-(a @ w["to_gates_w"].T + w["to_gates_b"])))  # (b, n, h)
    out = out * gates.transpose(0, 2, 1)[..., None]
    x = x + out.transpose(0, 2, 1, 3).reshape(b, n, -1) @ w["to_out"].T
    hid = rms_norm(x, w["ff_norm"]) @ w["ff_w1"].T + w["ff_b1"]
    hid = 0.5 * hid * (1.0 + erf(hid / np.sqrt(2.0)))  # nn.GELU(): exact erf form
    return x + hid @ w["ff_w2"].T + w["ff_b2"]


# (sequences, length, dim, heads, dim_head): heads * dim_head below, equal to and above dim.
LAYER_SHAPES = [(2, 7, 24, 3, 6), (3, 19, 16, 2, 8), (1, 33, 20, 4, 10)]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
def test_layer_matches_float64_reference(shape):
    b, l, d, h, e = shape
    seed = seed_of("layer", shape)
    rng = np.random.default_rng(seed)
    w = random_torch_weights(rng, d, h, e)
    x = rng.standard_normal((b, l, d))
    block = TransformerBlock(TransformerConfig(dim=d, heads=h, dim_head=e))
    got = jax.jit(block.apply)({"params": to_flax(w)}, jnp.asarray(x, jnp.float32))
    want = layer_reference(w, x, h)
    assert got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-5, f"seed={seed}"
    assert rel_err(got, x) > 0.1  # the layer does change its input


@pytest.mark.parametrize("shape", LAYER_SHAPES[:2], ids=str)
def test_layer_gradients_match_float64_finite_differences(shape):
    """d/dt L(x + t u, W + t V) at t=0, L = sum(G * layer): JAX's gradient (float32) against a
    central difference of the float64 reference, for the input and each weight separately."""
    b, l, d, h, e = shape
    seed = seed_of("grad", shape)
    rng = np.random.default_rng(seed)
    w = random_torch_weights(rng, d, h, e)
    x = rng.standard_normal((b, l, d))
    g_out = rng.standard_normal((b, l, d))
    block = TransformerBlock(TransformerConfig(dim=d, heads=h, dim_head=e))

    def loss(params, xs):
        return jnp.sum(block.apply({"params": params}, xs) * g_out)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(to_flax(w),
                                                             jnp.asarray(x, jnp.float32))
    eps = 1e-6
    for name in ["x", *w]:
        u = rng.standard_normal(x.shape if name == "x" else w[name].shape)
        if name == "x":
            plus = layer_reference(w, x + eps * u, h)
            minus = layer_reference(w, x - eps * u, h)
            terms = np.asarray(g_x, np.float64) * u
        else:
            plus = layer_reference({**w, name: w[name] + eps * u}, x, h)
            minus = layer_reference({**w, name: w[name] - eps * u}, x, h)
            # The same direction in the flax layout: push u through to_flax's transposes.
            u_flax = to_flax({**{k: np.zeros_like(v) for k, v in w.items()}, name: u})
            terms = np.concatenate([
                (np.asarray(g, np.float64) * np.asarray(v, np.float64)).ravel()
                for g, v in zip(jax.tree_util.tree_leaves(g_params),
                                jax.tree_util.tree_leaves(u_flax), strict=True)])
        want = np.sum((plus - minus) * g_out) / (2 * eps)
        got = terms.sum()
        assert abs(got - want) <= 1e-4 * np.abs(terms).sum(), f"{name}: seed={seed}"
        assert abs(want) > 1e-3 * np.abs(terms).sum(), f"{name}: degenerate direction"


def test_every_position_sees_every_other():
    """Full attention in both directions: the first output moves with the last input and back."""
    d, l = 16, 12
    rng = np.random.default_rng(seed_of("bidirectional"))
    block = TransformerBlock(TransformerConfig(dim=d, heads=2, dim_head=8))
    params = {"params": to_flax(random_torch_weights(rng, d, 2, 8))}
    x = rng.standard_normal((1, l, d)).astype(np.float32)
    base = np.asarray(block.apply(params, x))
    for changed, watched in ((l - 1, 0), (0, l - 1)):
        x2 = x.copy()
        x2[0, changed] += 1.0
        moved = np.asarray(block.apply(params, x2))
        assert np.abs(moved[0, watched] - base[0, watched]).max() > 1e-3


def test_bfloat16_compute_stays_close_to_float32():
    b, l, d, h, e = 4, 50, 32, 4, 8
    rng = np.random.default_rng(seed_of("bf16"))
    params = {"params": to_flax(random_torch_weights(rng, d, h, e))}
    x = rng.standard_normal((b, l, d)).astype(np.float32)
    cfg = TransformerConfig(dim=d, heads=h, dim_head=e)
    want = TransformerBlock(cfg).apply(params, x)
    got = TransformerBlock(dataclasses.replace(cfg, dtype=jnp.bfloat16)).apply(params, x)
    assert got.dtype == jnp.float32
    # bf16 matmuls: ~4e-3 per rounding; the residual stream and softmax stay float32.
    assert rel_err(got - x, want - x) < 3e-2


# ----------------------------------------------------------------------------- dropout


def test_explicit_dropout_attention_averages_to_plain_attention():
    """The training path (probabilities formed and dropped by hand) is the same attention:
    over dropout masks its mean is jax.nn.dot_product_attention's output and its variance the
    Bernoulli one, r / (1 - r) * sum_m p_lm^2 v_m^2."""
    seed = seed_of("dropout-mean")
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 9, 3, 8)).astype(np.float32) for _ in range(3))
    rate, draws = 0.25, 4000
    plain = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    keys = jax.random.split(jax.random.key(seed), draws)
    dropped = np.asarray(jax.jit(jax.vmap(lambda key: attention(
        q, k, v, dropout_rate=rate, dropout_rng=key)))(keys), np.float64)
    sim = np.einsum("blhe,bmhe->bhlm", q, k, dtype=np.float64) / np.sqrt(8)
    p = np.exp(sim - sim.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    var = rate / (1 - rate) * np.einsum("bhlm,bmhe->blhe", p ** 2, v.astype(np.float64) ** 2)
    z = (dropped.mean(0) - plain) / np.sqrt(var / draws)
    assert np.abs(z).max() < 5, f"seed={seed}"  # 432 outputs: |z| > 5 has p ~ 2e-4
    np.testing.assert_allclose(dropped.var(0), var, rtol=0.25, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, dropout_rate=0.0,
                                                       dropout_rng=keys[0])), plain)


def tiny_roformer(**overrides) -> BSMamba2:
    cfg = get_config("tiny").model
    cfg.update(overrides)
    return BSMamba2(**cfg)


def random_audio(seconds: float, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((batch, 2, int(round(seconds * SR))))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    """(model, params, audio, default output) of the tiny BS-RoFormer config."""
    model = tiny_roformer()
    audio = random_audio(0.3, batch=2, seed=seed_of("tiny"))
    params = jax.jit(model.init)(jax.random.key(0), audio)
    return model, params, audio, np.asarray(jax.jit(model.apply)(params, audio))


def test_dropout_is_off_by_default_and_on_in_training(tiny):
    model, params, audio, default = tiny
    # `default` came from model.apply(params, audio) without rngs: had it any dropout on, flax
    # would have refused to run it without a 'dropout' rng.
    assert default.shape == audio.shape and np.all(np.isfinite(default))
    train = jax.jit(lambda p, a, key: model.apply(p, a, train=True, rngs={"dropout": key}))
    first = np.asarray(train(params, audio, jax.random.key(1)))
    np.testing.assert_array_equal(first, np.asarray(train(params, audio, jax.random.key(1))))
    assert rel_err(first, default) > 1e-3
    assert rel_err(np.asarray(train(params, audio, jax.random.key(2))), first) > 1e-3
    with pytest.raises(ValueError, match="'dropout' rng"):
        model.apply(params, audio, train=True)


def test_zero_dropout_rates_make_training_the_plain_forward():
    d, l = 16, 11
    rng = np.random.default_rng(seed_of("no-dropout"))
    params = {"params": to_flax(random_torch_weights(rng, d, 2, 8))}
    x = rng.standard_normal((3, l, d)).astype(np.float32)
    cfg = TransformerConfig(dim=d, heads=2, dim_head=8, deterministic=False)
    rngs = {"dropout": jax.random.key(0)}
    want = TransformerBlock(dataclasses.replace(cfg, deterministic=True)).apply(params, x)
    np.testing.assert_array_equal(TransformerBlock(cfg).apply(params, x, rngs=rngs), want)
    for rates in ({"attn_dropout": 0.1}, {"ff_dropout": 0.1}):  # each rate alone does act
        dropped = TransformerBlock(dataclasses.replace(cfg, **rates)).apply(params, x, rngs=rngs)
        assert rel_err(dropped, want) > 1e-3, rates


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("variant, dim, count", [("", 384, 72_173_292), ("d256", 256, 36_847_468)])
def test_authors_config_parameter_count(variant, dim, count):
    """Table I's BS-RoFormer (D 384: "72.2M") and the same at dim 256. PyTorch counts 48 more:
    the two fixed 24-value rotary frequency tensors."""
    model = BSMamba2(**get_config(variant).model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2, SR),
                                                                                jnp.float32))
    assert count_params(shapes) == count
    layer = shapes["params"]["layer5"]
    assert set(layer) == {"time", "band"}
    assert layer["time"]["attn"]["to_qkv"]["kernel"].shape == (dim, 3 * 8 * 48)


def test_fixture_size_parameter_count():
    """The size of tests/data/authors_roformer: PyTorch's 1,507,332 less 2 x 8 rotary freqs."""
    model = BSMamba2(dim=32, depth=2, band_widths=PAPER_BAND_WIDTHS, mixer="transformer",
                     heads=2, dim_head=16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2, SR),
                                                                                jnp.float32))
    assert count_params(shapes) == 1_507_332 - 16


@pytest.mark.slow  # ~60 CPU-seconds, most of it compiling the gradient
def test_tiny_config_trains_forward_and_backward(tiny):
    model, params, audio, _ = tiny
    target = 0.5 * audio

    @jax.jit
    def loss_and_grad(p, key):
        def loss(p):
            est = model.apply(p, audio, train=True, rngs={"dropout": key})
            return jnp.mean(jnp.abs(est - target))
        return jax.value_and_grad(loss)(p)

    value, grads = loss_and_grad(params, jax.random.key(5))
    assert np.isfinite(float(value))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for path, g in flat:
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    assert any("attn" in jax.tree_util.keystr(p) for p, _ in flat)


def test_bad_mixer_and_attention_impl_are_named(tiny):
    _, params, audio, _ = tiny
    with pytest.raises(ValueError, match="Unknown mixer 'mamba'"):
        tiny_roformer(mixer="mamba").apply(params, audio)
    with pytest.raises(ValueError, match="Unknown attn_impl 'flash'"):
        tiny_roformer(attn_impl="flash").apply(params, audio)


def test_model_file_round_trip_keeps_the_transformer(tiny, tmp_path):
    """A BS-RoFormer model file loads back as one (what separate.py and evaluate.py use), and
    attn_impl may be overridden at load time like ssd_impl."""
    from bsmamba2_jax import export
    from bsmamba2_jax.loading import load_model

    _, params, audio, default = tiny
    path = export.save_model(tmp_path / "roformer.msgpack", params, get_config("tiny"), step=6)
    model, loaded, config = load_model(path, overrides={"attn_impl": "xla"})
    assert model.mixer == "transformer" and config["model"]["heads"] == 2
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(loaded, audio)), default)
