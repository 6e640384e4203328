"""The validation windows shown in TensorBoard: chosen once per run, written as audio and mel
spectrograms, read back from the event file."""

from __future__ import annotations

import io
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import excerpts, plots
from bsmamba2_jax.data import make_validation_set
from bsmamba2_jax.data.musdb import SAMPLE_RATE, read_crop
from bsmamba2_jax.train.sharding import make_mesh
from bsmamba2_jax.train.validate import choose_examples, validate
from bsmamba2_jax.train.writers import MetricWriter
from tests.bsmamba2_jax.train_helpers import tiny_config


def read_events(folder) -> list:
    """Every tensorboard Event in the TFRecord files of `folder` (length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + n]))
            at += 12 + n + 4
    return events


@pytest.fixture(scope="module")
def val_set(synthetic_root, tmp_path_factory):
    config = tiny_config()
    config.data.validation_windows = 24
    config.data.segment_seconds = 2.0
    return make_validation_set(config, synthetic_root, seed=5,
                               cache_dir=tmp_path_factory.mktemp("cache"))


def test_examples_are_seeded_and_start_on_a_vocal_onset_after_a_silence(val_set):
    examples = choose_examples(val_set, 3, seed=1, seconds=1.5)
    assert examples == choose_examples(val_set, 3, seed=1, seconds=1.5)  # once per run
    assert len({e.index for e in examples}) == 3
    others = [choose_examples(val_set, 3, seed=s, seconds=1.5) for s in (2, 3, 4)]
    assert any([e.index for e in o] != [e.index for e in examples] for o in others)
    length = int(1.5 * SAMPLE_RATE)
    for e in examples:
        assert e.length == length and 0 <= e.start <= val_set.length - length
        track, start = val_set.tracks[val_set.windows[e.index, 0]], val_set.windows[e.index, 1]
        vocals = read_crop(track.paths["vocals"], int(start), val_set.length)
        # Some onset of the window after >= 0.375 s without vocals lies in the clip, 3/8 in
        # (or as near as the window's edges allow).
        onsets = [o for o in excerpts.onsets(vocals, SAMPLE_RATE) if o.silence >= length / 4]
        assert any(e.start <= o.at < e.start + length and
                   e.start == excerpts.clip_around(o.at, length, val_set.length)
                   for o in onsets), e
        assert "vocals come in at" in e.about and track.name in e.about
    # More examples than windows with an onset: the rest are filled from the others.
    assert len(choose_examples(val_set, 24, seed=1, scan=24)) == 24


def test_audio_and_mel_summaries_read_back_from_the_event_file(val_set, tmp_path):
    """Two validations: the estimate and its image at both steps, the mixture and reference once;
    44.1 kHz mono 16-bit WAV of the clip's samples; the image is the reference, estimate and
    residual spectrograms."""
    gain = 0.6

    @jax.jit
    def eval_step(params, batch):  # a stand-in model: a scaled mixture
        est = params * batch["mixture"]
        return est, jnp.mean(jnp.abs(est - batch["vocals"]), axis=(1, 2))

    examples = choose_examples(val_set, 2, seed=0, seconds=1.0)
    writer = MetricWriter(tmp_path, tensorboard=True)
    for step, g in ((10, gain), (20, 2 * gain)):
        metrics, kept = validate(eval_step, jnp.float32(g), val_set, make_mesh(), 5,
                                 keep=[e.index for e in examples])
        assert sorted(kept) == sorted(e.index for e in examples)
        assert metrics["windows"] == len(val_set)
        writer.write(step, metrics, prefix="val/")
        writer.write_examples(step, examples, kept)
    writer.close()

    values = [(ev.step, v) for ev in read_events(tmp_path / "tensorboard")
              for v in ev.summary.value]
    audio = {(step, v.tag): v.audio for step, v in values if v.HasField("audio")}
    images = {(step, v.tag): v.image for step, v in values if v.HasField("image")}
    assert {step for step, tag in audio if tag.endswith("/estimate")} == {10, 20}
    assert sorted(tag for step, tag in audio if not tag.endswith("/estimate")) == [
        "examples/0/mixture", "examples/0/reference", "examples/1/mixture",
        "examples/1/reference"]
    assert all(step == 10 for step, tag in audio if not tag.endswith("/estimate"))
    assert {step for step, v in values if v.tag == "val/usdr"} == {10, 20}  # scalars as before
    for k, e in enumerate(examples):
        window = val_set.read([e.index])
        clip = {name: x[0, :, e.start:e.start + e.length] for name, x in window.items()}
        for step, g in ((10, gain), (20, 2 * gain)):
            a = audio[(step, f"examples/{k}/estimate")]
            assert (a.sample_rate, a.num_channels, a.length_frames) == (SAMPLE_RATE, 1,
                                                                        e.length)
            assert a.content_type == "audio/wav"
            pcm, rate = sf.read(io.BytesIO(a.encoded_audio_string), dtype="float64")
            assert rate == SAMPLE_RATE and pcm.shape == (e.length,)
            want = np.clip(g * clip["mixture"].mean(axis=0), -1, 1)
            assert np.max(np.abs(pcm - want)) < 2 ** -14  # 16-bit rounding
            image = images[(step, f"examples/{k}/mel")]
            rgb = plt_read_png(image.encoded_image_string)
            est = g * clip["mixture"]
            expect = plots.mel_strip([clip["vocals"], est, est - clip["vocals"]], SAMPLE_RATE,
                                     **plots.PREVIEW_MEL)
            assert (image.height, image.width) == expect.shape[:2] == (3 * 96 + 6, rgb.shape[1])
            np.testing.assert_array_equal(rgb, expect)
        ref = audio[(10, f"examples/{k}/reference")]
        pcm, _ = sf.read(io.BytesIO(ref.encoded_audio_string), dtype="float64")
        assert np.max(np.abs(pcm - clip["vocals"].mean(axis=0))) < 2 ** -14
        assert np.max(np.abs(pcm)) > 1e-3  # the vocals come in within the clip


def plt_read_png(data: bytes) -> np.ndarray:
    import matplotlib.image

    return np.round(matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3] * 255
                    ).astype(np.uint8)


def test_mel_strip_shares_one_scale_and_puts_low_frequencies_at_the_bottom():
    rate = SAMPLE_RATE
    t = np.arange(rate // 2) / rate
    low = np.stack([np.sin(2 * np.pi * 200 * t)] * 2)
    quiet_high = 0.01 * np.stack([np.sin(2 * np.pi * 8000 * t)] * 2)
    strip = plots.mel_strip([low, quiet_high], rate, n_mels=64, gap=2)
    assert strip.shape[0] == 64 * 2 + 2 and strip.dtype == np.uint8
    assert np.all(strip[64:66] == 255)
    brightness = strip.astype(float).sum(axis=2)
    top, bottom = brightness[:64], brightness[66:]
    assert top[-10:].mean() > top[:10].mean()  # 200 Hz: near the bottom rows
    assert bottom[:40].mean() > bottom[-10:].mean()  # 8 kHz: higher up
    assert top.max() > bottom.max()  # 40 dB quieter on the shared scale: darker
