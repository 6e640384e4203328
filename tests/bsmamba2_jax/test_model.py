"""The BSMamba2 model: parameter count, shapes, SSD impl agreement, precision, gradients, input
checks."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.model import BSMamba2, count_params, fold_spectrum, unfold_mask
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


def _pallas_available() -> bool:
    try:
        importlib.import_module("kernels.ssd.pallas")
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("impl", ["scan", "pallas"])
def test_ssd_impls_agree_in_the_model(tiny, xla_output, impl):
    if impl == "pallas" and not _pallas_available():
        pytest.skip("kernels.ssd.pallas is not importable yet")
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
def test_remat_gives_the_same_gradients(tiny):
    model, params = tiny
    audio = random_audio(0.3, seed=5)
    g = jax.tree_util.tree_leaves(_grads(model, params, audio))
    gr = jax.tree_util.tree_leaves(_grads(tiny_model(remat=True), params, audio))
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
