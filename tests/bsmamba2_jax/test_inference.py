"""Segment-wise separation: exact overlap-add with stand-in models, and the tiny BSMamba2."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bsmamba2_jax.inference import (
    fade_window,
    overlap_add,
    plan_segments,
    separate,
    separate_with,
    split_segments,
)
from bsmamba2_jax.model import BSMamba2
from configs.bsmamba2 import get_config


def _audio(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("length,segment,overlap", [
    (1000, 300, 0.0), (1000, 300, 0.25), (1001, 256, 0.5), (300, 300, 0.5), (2999, 100, 0.9),
])
def test_plan_covers_the_track(length, segment, overlap):
    plan = plan_segments(length, segment, overlap)
    assert plan.padded_length >= length  # every sample is in some segment
    assert (plan.count - 1) * plan.hop < length  # no segment lies wholly in the padding
    if overlap == 0 and length > segment:
        assert plan.hop == segment


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_and_pointwise_models_are_reproduced_exactly(overlap, batch_size):
    audio = _audio((2, 2, 5003))
    plan = plan_segments(audio.shape[-1], 1000, overlap)
    calls = []

    def identity(x):
        calls.append(x.shape)
        return x

    out = separate_with(identity, audio, plan, batch_size)
    np.testing.assert_allclose(out, audio, rtol=1e-6, atol=1e-6)
    assert set(calls) == {(batch_size, 2, plan.segment)}  # one shape: one compilation
    # A pointwise model commutes with segmentation for any overlap.
    out = separate_with(lambda x: np.tanh(3 * x), audio, plan, batch_size)
    np.testing.assert_allclose(out, np.tanh(3 * audio), rtol=1e-5, atol=1e-6)


def test_no_overlap_is_concatenation_of_zero_padded_segments():
    audio = _audio((1, 2, 2500), seed=1)
    plan = plan_segments(2500, 1000, 0.0)
    segs = split_segments(audio, plan)
    assert segs.shape == (1, 3, 2, 1000)
    np.testing.assert_array_equal(segs[0, 2, :, :500], audio[0, :, 2000:])
    np.testing.assert_array_equal(segs[0, 2, :, 500:], 0)  # the last one is zero-padded
    # A model that depends on the whole segment (adds its mean): each segment sees only itself.
    out = overlap_add(segs + segs.mean(axis=-1, keepdims=True), plan)
    for i in range(3):
        want = segs[0, i] + segs[0, i].mean(axis=-1, keepdims=True)
        np.testing.assert_allclose(out[0, :, i * 1000:(i + 1) * 1000], want[:, :min(
            1000, 2500 - i * 1000)], rtol=1e-6)


def test_fade_window():
    w = fade_window(100, 60)
    assert np.all(w > 0) and np.all(w <= 1)
    np.testing.assert_array_equal(w[40:60], 1)
    np.testing.assert_allclose(w[:40] + w[60:], 1.0, rtol=1e-6)  # fades are complementary
    np.testing.assert_array_equal(fade_window(100, 100), 1)


@pytest.fixture(scope="module")
def tiny():
    model = BSMamba2(**get_config("tiny").model)
    params = jax.jit(model.init)(jax.random.key(0), _audio((1, 2, 4410)) * 0.1)
    return model, params


def test_separate_tiny_model_on_track_not_a_multiple_of_the_segment(tiny):
    model, params = tiny
    track = 0.1 * _audio((2, 3 * 4410 + 777), seed=2)  # 3.18 segments of 0.1 s
    out = separate(model, params, track, segment_seconds=0.1, batch_size=2)
    assert out.shape == track.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # Non-overlapping protocol: the first segment is the model applied to the first 0.1 s.
    first = np.asarray(jax.jit(model.apply)(params, track[None, :, :4410]))[0]
    np.testing.assert_allclose(out[:, :4410], first, rtol=1e-5, atol=1e-5 * np.abs(first).max())
    batched = separate(model, params, np.stack([track, track[::-1]]), segment_seconds=0.1,
                       batch_size=3)
    assert batched.shape == (2,) + track.shape
    np.testing.assert_allclose(batched[0], out, rtol=1e-5, atol=1e-5 * np.abs(out).max())


def test_separate_with_overlap_matches_model_on_short_signal(tiny):
    model, params = tiny
    track = 0.1 * _audio((1, 2, 3001), seed=3)  # shorter than one segment
    out = separate(model, params, track, segment_seconds=0.1, overlap=0.5)
    want = np.asarray(jax.jit(model.apply)(params, track))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("audio", [np.zeros((1, 5000), np.float32),
                                   np.zeros((2, 1, 5000), np.float32),
                                   np.zeros((2, 5000), np.int16)])
def test_separate_rejects_bad_audio(tiny, audio):
    model, params = tiny
    with pytest.raises(ValueError, match="samples|floating"):
        separate(model, params, audio, segment_seconds=0.1)
