"""The BSMamba2 model: parameter count, shapes, SSD impl agreement, precision, gradients, input
checks."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bsmamba2_jax.mamba2 import BiMamba2Block, Mamba2Config
from bsmamba2_jax.model import (
    BSMamba2,
    count_params,
    fold_spectrum,
    recompute_in_backward,
    resolve_remat,
    sequence_groups,
    sequence_pass,
    unfold_mask,
)
from bsmamba2_jax.norms import l2_rms_norm
from configs.bsmamba2 import get_config

SR = 44100


def tiny_model(**overrides) -> BSMamba2:
    cfg = get_config("tiny").model
    cfg.update(overrides)
    return BSMamba2(**cfg)


def random_audio(seconds: float, batch: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((batch, 2, int(round(seconds * SR))))).astype(np.float32)


def test_paper_config_parameter_count():
    model = BSMamba2(**get_config().model)
    audio = jax.ShapeDtypeStruct((1, 2, SR), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), audio)  # shapes only, no allocation
    assert count_params(shapes) == 48_098_188
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))


def test_paper_config_output_shape_traced():
    model = BSMamba2(**get_config().model)
    audio = jax.ShapeDtypeStruct((2, 2, int(2.5 * SR)), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), audio)
    out = jax.eval_shape(model.apply, params, audio)
    assert out.shape == audio.shape and out.dtype == jnp.float32


@pytest.fixture(scope="module")
def tiny():
    """(model, params) of the tiny config, initialised once for the module."""
    model = tiny_model()
    return model, jax.jit(model.init)(jax.random.key(0), random_audio(0.2, seed=11))


@pytest.fixture(scope="module")
def xla_output(tiny):
    """(audio, output of the default "xla" impl) on a short stereo batch."""
    model, params = tiny
    audio = random_audio(0.7, batch=2, seed=3)
    return audio, np.asarray(jax.jit(model.apply)(params, audio))


@pytest.mark.parametrize("seconds", [1.0, 8.0, 8.37, 16.0])
def test_output_shape_equals_input_shape(tiny, seconds):
    model, params = tiny
    audio = jax.ShapeDtypeStruct((2, 2, int(round(seconds * SR))), jnp.float32)
    out = jax.eval_shape(model.apply, params, audio)  # the shapes XLA would compute
    assert out.shape == audio.shape and out.dtype == jnp.float32


def test_output_of_odd_length_is_finite(tiny):
    model, params = tiny
    audio = random_audio(8.37, seed=8)
    out = np.asarray(jax.jit(model.apply)(params, audio))
    assert out.shape == audio.shape and np.all(np.isfinite(out))
    assert np.linalg.norm(out) > 0


@pytest.mark.parametrize("impl", ["scan", "pallas"])
def test_ssd_impls_agree_in_the_model(tiny, xla_output, impl):
    _, params = tiny
    audio, want = xla_output
    got = np.asarray(jax.jit(tiny_model(ssd_impl=impl).apply)(params, audio))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_bf16_compute_is_finite_and_close_to_float32(tiny, xla_output):
    _, params = tiny
    audio, want = xla_output  # float32 compute
    got = jax.jit(tiny_model(dtype="bfloat16").apply)(params, audio)
    assert got.dtype == jnp.float32  # masks, iSTFT and output stay float32
    got = np.asarray(got)
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2


def _grads(model, params, audio):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, audio) ** 2)))(params)


def test_gradients_are_finite(tiny):
    model, params = tiny
    leaves = jax.tree_util.tree_leaves(_grads(model, params, random_audio(0.3, seed=5)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert all(float(jnp.abs(x).max()) > 0 for x in leaves)  # every parameter is used


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["layer", "block"])
def test_remat_gives_the_same_gradients(tiny, remat):
    model, params = tiny
    audio = random_audio(0.3, seed=5)
    g = jax.tree_util.tree_leaves(_grads(model, params, audio))
    gr = jax.tree_util.tree_leaves(_grads(tiny_model(remat=remat), params, audio))
    for a, b in zip(g, gr, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(a).max()) + 1e-12)


def test_fold_order_is_freq_channel_complex_and_inverts():
    rng = np.random.default_rng(6)
    spec = (rng.standard_normal((2, 2, 5, 3)) + 1j * rng.standard_normal((2, 2, 5, 3)))
    spec = jnp.asarray(spec.astype(np.complex64))
    x = np.asarray(fold_spectrum(spec))  # (b, t, 4f)
    assert x.shape == (2, 3, 20)
    f, s, t = 3, 1, 2  # feature 4f + 2s + r of frame t is channel s, bin f, real/imag r
    assert x[1, t, 4 * f + 2 * s] == np.real(spec[1, s, f, t])
    assert x[1, t, 4 * f + 2 * s + 1] == np.imag(spec[1, s, f, t])
    np.testing.assert_array_equal(np.asarray(unfold_mask(jnp.asarray(x))), np.asarray(spec))


@pytest.mark.parametrize("audio,match", [
    (np.zeros((1, 1, 4000), np.float32), r"\(batch, 2, samples\)"),  # mono
    (np.zeros((2, 4000), np.float32), r"\(batch, 2, samples\)"),  # missing batch axis
    (np.zeros((1, 2, 4000), np.int16), "floating"),  # integer PCM
    (np.zeros((1, 2, 500), np.float32), "samples"),  # shorter than the STFT padding
])
def test_bad_input_is_a_value_error(tiny, audio, match):
    model, params = tiny
    with pytest.raises(ValueError, match=match):
        model.apply(params, audio)


def test_band_widths_must_cover_every_bin():
    model = tiny_model(band_widths=(16, 32, 64))
    with pytest.raises(ValueError, match="band_widths"):
        jax.eval_shape(model.init, jax.random.key(0), random_audio(0.1))


@pytest.mark.slow
def test_paper_config_runs_on_2_5_seconds():
    model = BSMamba2(**get_config().model)
    audio = random_audio(2.5, seed=7)
    params = jax.jit(model.init)(jax.random.key(0), audio)
    out = np.asarray(jax.jit(model.apply)(params, audio))
    assert out.shape == audio.shape and np.all(np.isfinite(out))


# ------------------------------------------------------------------ remat and sequence groups

SMALL_MIXER = Mamba2Config(d_model=16, expand=2, d_state=8, headdim=8, ngroups=1, d_conv=4,
                           chunk_size=8)


def test_remat_modes():
    assert [resolve_remat(r) for r in (False, True, "none", "layer", "block")] == [
        "none", "layer", "none", "layer", "block"]
    with pytest.raises(ValueError, match="none.*layer.*block"):
        resolve_remat("blocks")
    with pytest.raises(ValueError, match="model.remat"):
        BSMamba2(**{**get_config("tiny").model.to_dict(), "remat": 1}).init(
            jax.random.key(0), random_audio(0.1))


@pytest.mark.parametrize("n,length,group_tokens", [(62, 801, 16384), (801, 62, 16384),
                                                   (7, 13, 30), (5, 100, 50), (3, 4, 0)])
def test_sequence_groups_bound_the_tokens_and_cover_every_sequence(n, length, group_tokens):
    groups, per = sequence_groups(n, length, group_tokens)
    assert groups * per >= n > (groups - 1) * per  # every sequence, no empty group
    if group_tokens:
        assert per * length <= group_tokens or per == 1
    else:
        assert groups == 1


class _Pass(nn.Module):
    """`sequence_pass` of one bidirectional block, as DualPathLayer runs it."""

    group_tokens: int
    remat: bool

    @nn.compact
    def __call__(self, x):
        block = BiMamba2Block(SMALL_MIXER, name="block")
        return sequence_pass(block, x, self.group_tokens, self.remat and not self.is_initializing())


@pytest.mark.parametrize("group_tokens,remat", [(30, False), (30, True), (0, True)])
def test_grouped_and_recomputed_pass_equals_the_plain_block(group_tokens, remat):
    seed = zlib.crc32(repr((group_tokens, remat)).encode())
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((7, 13, 16)), jnp.float32)  # 7 sequences: 4 groups of 2
    plain = _Pass(0, False)
    params = plain.init(jax.random.key(seed % 1000), x)
    ours = _Pass(group_tokens, remat)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params), "grouping must not change the parameters"

    def loss(mod):
        return lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x)))

    want = jax.jit(jax.value_and_grad(loss(plain), argnums=(0, 1)))(params, x)
    got = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)),
                               np.asarray(plain.apply(params, x)), rtol=1e-5, atol=1e-5,
                               err_msg=f"seed {seed}")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(w).max()), err_msg=f"seed {seed}")


class _Wide(nn.Module):
    """x + W2 g(W1 x): a layer whose backward keeps intermediates 4x wider than its input;
    with `dropout`, dropout on the wide intermediate whenever a "dropout" rng is given."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4 * x.shape[-1])(x))
        h = nn.Dropout(self.dropout, deterministic=not self.has_rng("dropout"))(h)
        return x + nn.Dense(x.shape[-1])(jnp.sin(h) * h)


class _WideStack(nn.Module):
    """8 `_Wide` layers, each run plainly, through `recompute_in_backward`, or as a
    `sequence_pass` of 4 groups with remat."""

    mode: str
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        for i in range(8):
            layer = _Wide(self.dropout, name=f"layer{i}")
            if self.mode == "plain" or self.is_initializing():
                x = layer(x)
            elif self.mode == "layer":
                x = recompute_in_backward(layer, x)
            else:
                x = sequence_pass(layer, x, group_tokens=x.shape[0] * x.shape[1] // 4,
                                  remat=True)
        return x


def _grad_temp_bytes(loss, params, *args) -> int:
    """Temporaries of XLA's compiled memory analysis of jit(grad(loss))(params, *args)."""
    compiled = jax.jit(jax.grad(loss)).lower(params, *args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dropout", [False, True])
def test_recomputation_lowers_the_compiled_memory_of_the_gradient(dropout):
    """On XLA:CPU, jax.checkpoint (nn.remat) alone left this unchanged: its recomputation was
    merged back into the forward pass. Each layer's intermediates must now be gone, also when
    the step passes a dropout rng (the train step always does)."""
    x = jax.ShapeDtypeStruct((64, 128, 64), jnp.float32)
    rngs = {"dropout": jax.random.key(1)} if dropout else None
    temp = {}
    for mode in ("plain", "layer", "groups"):
        model = _WideStack(mode, dropout=0.25 if dropout else 0.0)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        temp[mode] = _grad_temp_bytes(
            lambda p, x, m=model: jnp.sum(m.apply(p, x, rngs=rngs) ** 2), params, x)
    # plain: ~8 layers x 3 wide (4 MiB x 4) intermediates; layer: the 8 inputs + one layer's.
    assert temp["layer"] < 0.4 * temp["plain"], temp
    assert temp["groups"] < temp["layer"], temp


@pytest.mark.parametrize("mode", ["layer", "groups"])
def test_recomputation_replays_the_dropout_masks_of_its_forward(mode):
    """With dropout on, the recomputed backward must use the forward's masks: the gradient
    agrees with central differences of the same (deterministic given the key) forward along a
    random direction; other masks in the backward would be off by O(1)."""
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(zlib.crc32(mode.encode()))
        x = jnp.asarray(rng.standard_normal((6, 10, 8)))
        model = _WideStack(mode, dropout=0.5)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(3), x))
        rngs = {"dropout": jax.random.key(4)}
        w = jnp.asarray(rng.standard_normal(x.shape))

        def f(p):
            return jnp.sum(model.apply(p, x, rngs=rngs) * w)

        grad = jax.grad(f)(params)
        direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
        eps = 1e-6
        shifted = [jax.tree.map(lambda a, v, s=s: a + s * eps * v, params, direction)
                   for s in (1, -1)]
        numeric = (f(shifted[0]) - f(shifted[1])) / (2 * eps)
        analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad),
                                                       jax.tree.leaves(direction), strict=True))
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)
        without_dropout = jnp.sum(_WideStack("plain").apply(params, x) * w)
        assert f(params) != without_dropout  # the masks are in use
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.slow
def test_recomputed_layers_add_only_their_inputs_to_the_train_steps_memory():
    """Compiled temporaries of the gradient as the train step takes it (train=True with a
    dropout rng): each extra layer adds its whole activations without remat, next to nothing
    with "layer" or "block". (With a dropout rng, remat used to fall back to nn.checkpoint,
    which XLA:CPU undid: every mode added the same ~28 MiB per layer here.)"""
    audio = jax.ShapeDtypeStruct((2, 2, SR), jnp.float32)
    per_layer = {}
    for remat in ("none", "layer", "block"):
        temp = []
        for depth in (1, 3):
            model = tiny_model(depth=depth, remat=remat)
            params = jax.eval_shape(model.init, jax.random.key(0), audio)

            def loss(p, a, m=model):
                return jnp.sum(m.apply(p, a, train=True, rngs={"dropout": jax.random.key(1)})**2)

            temp.append(_grad_temp_bytes(loss, params, audio))
        per_layer[remat] = (temp[1] - temp[0]) / 2
    assert per_layer["layer"] < 0.1 * per_layer["none"], per_layer
    assert per_layer["block"] < 0.1 * per_layer["none"], per_layer


def test_l2_rms_norm_has_a_finite_gradient_at_zero():
    """A silent band or a padding sequence is an all-zero token: forward 0, gradient finite."""
    rng = np.random.default_rng(11)
    x = np.asarray(rng.standard_normal((3, 5)), np.float32)
    x[1] = 0.0
    gamma = jnp.asarray(1 + 0.1 * rng.standard_normal(5), jnp.float32)
    y, vjp = jax.vjp(lambda v: l2_rms_norm(v, gamma), jnp.asarray(x))
    (g,) = vjp(jnp.ones_like(y))
    assert np.all(np.asarray(y)[1] == 0) and np.all(np.isfinite(np.asarray(g)))
    want = x[0] / np.linalg.norm(x[0]) * np.sqrt(5) * np.asarray(gamma)
    np.testing.assert_allclose(np.asarray(y)[0], want, rtol=1e-6)


@pytest.mark.parametrize("remat", ["layer", "block"])
def test_roformer_groups_and_remat_keep_values_and_gradients(remat):
    """BS-RoFormer through padded groups (zero sequences) and recomputation, dropout off."""
    from configs import bsroformer

    cfg = bsroformer.get_config("tiny").model.to_dict()
    audio = random_audio(0.2, seed=zlib.crc32(remat.encode()) % 1000)
    plain = BSMamba2(**cfg)
    ours = BSMamba2(**{**cfg, "remat": remat, "group_tokens": 40})
    params = plain.init(jax.random.key(2), audio)
    want = jax.tree.leaves(_grads(plain, params, audio))
    got = jax.tree.leaves(_grads(ours, params, audio))
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(w).max()) + 1e-12)
