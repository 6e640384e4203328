"""Segment-wise separation: exact overlap-add with stand-in models, the streamed path against the
in-memory reference, the batch-size choice, and the tiny BSMamba2."""

from __future__ import annotations

import threading
import zlib

import numpy as np
import pytest

from bsmamba2_jax.inference import (
    CompiledForward,
    OverlapAdd,
    _apply,
    choose_batch_size,
    compile_forward,
    fade_window,
    overlap_add,
    plan_segments,
    separate_stream,
    separate_vocals,
    separate_with,
    split_segments,
)
from tests.bsmamba2_jax.tiny_model import tiny_model_and_params


def _seed(*values) -> int:
    return zlib.crc32(repr(values).encode())


def _audio(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _segment_model(x: np.ndarray) -> np.ndarray:
    """Stand-in that depends on the whole segment (its mean), row by row, so padding and segment
    boundaries change the result; computed per row so it is independent of the batch layout."""
    out = np.empty_like(x)
    for i, seg in enumerate(x):
        seg = np.ascontiguousarray(seg)
        out[i] = np.tanh(seg + seg.mean(axis=-1, keepdims=True))
    return out


def _reference(fn, audio: np.ndarray, plan) -> np.ndarray:
    """The obviously-right path: all segments in memory, fn on each alone, overlap_add."""
    segs = split_segments(audio[None], plan)[0]  # (count, c, seg)
    out = np.stack([fn(np.ascontiguousarray(s)[None])[0] for s in segs])
    return overlap_add(out[None], plan)[0]


@pytest.mark.parametrize("length,segment,overlap", [
    (1000, 300, 0.0), (1000, 300, 0.25), (1001, 256, 0.5), (300, 300, 0.5), (2999, 100, 0.9),
    (37, 300, 0.0), (299, 300, 0.5),
])
def test_plan_covers_the_track(length, segment, overlap):
    plan = plan_segments(length, segment, overlap)
    assert plan.padded_length >= length  # every sample is in some segment
    assert (plan.count - 1) * plan.hop < length  # no segment lies wholly in the padding
    assert plan.segment == segment  # one segment shape for every track: one compilation
    if overlap == 0 and length > segment:
        assert plan.hop == segment


def test_short_track_is_one_zero_padded_segment():
    """The authors' separator zero-pads a track shorter than a segment to a full segment."""
    plan = plan_segments(700, 1000, 0.5)
    assert (plan.segment, plan.count, plan.padded_length) == (1000, 1, 1000)
    audio = _audio((1, 2, 700), seed=4)
    segs = split_segments(audio, plan)
    assert segs.shape == (1, 1, 2, 1000)
    np.testing.assert_array_equal(segs[0, 0, :, :700], audio[0])
    np.testing.assert_array_equal(segs[0, 0, :, 700:], 0)


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


@pytest.mark.parametrize("length,segment,overlap,batch_size,blocks", [
    (5003, 1000, 0.0, 3, 7), (5003, 1000, 0.5, 2, 1), (300, 1000, 0.3, 4, 3),
    (2999, 100, 0.9, 5, 11), (1000, 1000, 0.0, 1, 2), (1001, 1000, 0.25, 2, 40),
    (7919, 613, 0.37, 4, 5),
])
def test_stream_equals_in_memory_reference_bit_for_bit(length, segment, overlap, batch_size,
                                                       blocks):
    """Random block sizes in, any plan: the streamed output is the reference's, exactly."""
    seed = _seed(length, segment, overlap, batch_size, blocks)
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((2, length)).astype(np.float32)
    plan = plan_segments(length, segment, overlap)
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(blocks, length - 1), replace=False))
    shapes, out = set(), []

    def fn(x):
        shapes.add(x.shape)
        return _segment_model(x)

    separate_stream(fn, np.split(audio, cuts, axis=-1), plan, batch_size, out.append)
    got = np.concatenate(out, axis=-1)
    assert shapes == {(batch_size, 2, segment)}, f"seed {seed}"
    np.testing.assert_array_equal(got, _reference(_segment_model, audio, plan),
                                  err_msg=f"seed {seed}")


def test_overlap_add_streams_in_one_segment_of_memory():
    plan = plan_segments(10_000, 1000, 0.5)
    ola = OverlapAdd(plan, channels=2)
    sizes = [ola.add(np.ones((2, 1000), np.float32)).shape[-1] for _ in range(plan.count)]
    assert sizes[:-1] == [plan.hop] * (plan.count - 1) and sum(sizes) == plan.length
    assert ola._out.shape == (2, 1000)
    with pytest.raises(ValueError, match="already added"):
        ola.add(np.ones((2, 1000), np.float32))


class _Boom(Exception):
    pass


def _threads():
    return {t.name for t in threading.enumerate() if t.name.startswith("separate-")}


@pytest.mark.parametrize("where", ["blocks", "fn", "sink", "short", "long"])
def test_stream_failures_propagate_and_stop_the_threads(where):
    audio = _audio((2, 20_000), seed=5)
    plan = plan_segments(20_000 if where != "long" else 19_000, 1000, 0.0)

    def blocks():
        for i, b in enumerate(np.split(audio, 20, axis=-1)):
            if where == "blocks" and i == 9:
                raise _Boom("unreadable block")
            if where == "short" and i == 15:
                return
            yield b

    calls = []

    def fn(x):
        calls.append(1)
        if where == "fn" and len(calls) == 3:
            raise _Boom("model failed")
        return x

    def sink(block):
        if where == "sink":
            raise _Boom("disk full")

    expected = (_Boom, "unreadable|model failed|disk full") if where in ("blocks", "fn", "sink") \
        else (ValueError, "ended after 15000 of 20000|more than the 19000")
    with pytest.raises(expected[0], match=expected[1]):
        separate_stream(fn, blocks(), plan, 2, sink, depth=1)
    assert not _threads()  # both worker threads have ended
    if where == "sink":
        assert len(calls) < 10  # the model stops soon after the sink fails


def test_choose_batch_size_fits_the_budget():
    compiled = []

    def compile_at(b):
        compiled.append(b)
        return CompiledForward(None, b, 50 + 100 * b)  # fixed part + per segment

    assert choose_batch_size(compile_at, budget=None, max_batch=8).batch == 1
    assert choose_batch_size(compile_at, budget=10**9, max_batch=8).batch == 8  # the cap
    compiled.clear()
    assert choose_batch_size(compile_at, budget=600, max_batch=8).batch == 4  # 600 // 150
    assert compiled == [1, 4]
    assert choose_batch_size(compile_at, budget=100, max_batch=8).batch == 1  # nothing fits
    assert choose_batch_size(compile_at, budget=10**9, max_batch=1).batch == 1

    def superlinear(b):
        compiled.append(b)
        return CompiledForward(None, b, 100 * b * b)

    compiled.clear()  # the guess (8) does not fit: halved until it does (2: 400 bytes)
    assert choose_batch_size(superlinear, budget=1000, max_batch=8).batch == 2
    assert compiled == [1, 8, 4, 2]


@pytest.fixture(scope="module")
def tiny():
    model, params, _ = tiny_model_and_params()
    return model, params


def test_compiled_forward_memory_and_output(tiny):
    model, params = tiny
    one = compile_forward(model.apply, params, 1, 2, 4410)
    two = compile_forward(model.apply, params, 2, 2, 4410)
    assert 2 * 2 * 4410 * 4 < one.call_bytes < two.call_bytes < 2 * one.call_bytes + 2**20
    x = 0.1 * _audio((2, 2, 4410), seed=6)
    want = np.asarray(_apply(model, params, x))
    np.testing.assert_allclose(np.asarray(two.fn(params, x)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_separate_tiny_model_on_track_not_a_multiple_of_the_segment(tiny):
    model, params = tiny
    track = 0.1 * _audio((2, 3 * 4410 + 777), seed=2)  # 3.18 segments of 0.1 s
    out = separate_vocals(model, params, track, segment_seconds=0.1, batch_size=2)
    assert out.shape == track.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # Non-overlapping protocol: the first segment is the model applied to the first 0.1 s.
    first = np.asarray(_apply(model, params, track[None, :, :4410]))[0]
    np.testing.assert_allclose(out[:, :4410], first, rtol=1e-5, atol=1e-5 * np.abs(first).max())
    batched = separate_vocals(model, params, np.stack([track, track[::-1]]),
                              segment_seconds=0.1, batch_size=1)
    assert batched.shape == (2,) + track.shape
    np.testing.assert_allclose(batched[0], out, rtol=1e-5, atol=1e-5 * np.abs(out).max())


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_short_track_result_is_the_zero_padded_segment_cropped(tiny, overlap):
    """A track shorter than one segment runs as one zero-padded segment (the authors' protocol),
    not at its own length: with the bidirectional time pass the two differ."""
    model, params = tiny
    track = 0.1 * _audio((1, 2, 3001), seed=3)
    out = separate_vocals(model, params, track, segment_seconds=0.1, overlap=overlap)
    padded = np.pad(track, ((0, 0), (0, 0), (0, 4410 - 3001)))
    want = np.asarray(_apply(model, params, padded))[..., :3001]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    own_length = np.asarray(_apply(model, params, track))
    assert np.abs(own_length - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("audio", [np.zeros((1, 5000), np.float32),
                                   np.zeros((2, 1, 5000), np.float32),
                                   np.zeros((2, 5000), np.int16)])
def test_separate_vocals_rejects_bad_audio(tiny, audio):
    model, params = tiny
    with pytest.raises(ValueError, match="samples|floating"):
        separate_vocals(model, params, audio, segment_seconds=0.1)
