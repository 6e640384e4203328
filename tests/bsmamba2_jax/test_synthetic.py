"""The synthetic MUSDB18-HQ-shaped dataset generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax.data import musdb as musdb_lib
from bsmamba2_jax.data import synthetic
from configs import bsmamba2
from tests.conftest import SYNTHETIC_SIZES


def _read(path):
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio.T, rate


def test_layout_names_and_format(synthetic_root):
    names = synthetic.track_names(SYNTHETIC_SIZES["tracks"], SYNTHETIC_SIZES["valid_tracks"],
                                  SYNTHETIC_SIZES["test_tracks"])
    assert sorted(p.name for p in (synthetic_root / "train").iterdir()) == sorted(
        names["train"] + names["valid"])
    assert sorted(p.name for p in (synthetic_root / "test").iterdir()) == names["test"]
    samples = int(SYNTHETIC_SIZES["seconds"] * synthetic.SAMPLE_RATE)
    for folder in list((synthetic_root / "train").iterdir()) + list(
            (synthetic_root / "test").iterdir()):
        for name in ("mixture",) + synthetic.STEMS:
            info = sf.info(str(folder / f"{name}.wav"))
            assert (info.samplerate, info.channels, info.frames) == (44100, 2, samples)
            assert info.subtype == "FLOAT"
    setup = json.loads((synthetic_root / synthetic.SETUP_FILE).read_text())
    assert setup["validation_tracks"] == names["valid"]


def test_mixture_is_the_sum_of_the_stems(synthetic_root):
    for folder in (synthetic_root / "train").iterdir():
        stems = [_read(folder / f"{name}.wav")[0] for name in synthetic.STEMS]
        total = np.zeros_like(stems[0])
        for s in stems:  # same order and dtype as the generator: exact equality
            total = total + s
        np.testing.assert_array_equal(_read(folder / "mixture.wav")[0], total)
        assert np.abs(total).max() < 1.0
        assert all(np.sqrt(np.mean(s ** 2)) > 1e-3 for s in stems)  # no stem left empty


def test_files_are_a_pure_function_of_the_seed(synthetic_root):
    names = synthetic.track_names(SYNTHETIC_SIZES["tracks"], SYNTHETIC_SIZES["valid_tracks"],
                                  SYNTHETIC_SIZES["test_tracks"])
    seconds, seed = SYNTHETIC_SIZES["seconds"], SYNTHETIC_SIZES["seed"]
    for subset, index, name in (("train", 1, names["train"][1]), ("test", 0, names["test"][0])):
        track = synthetic.synthesize_track(seed, subset, index, seconds)
        for stem in synthetic.STEMS:
            np.testing.assert_array_equal(
                _read(synthetic_root / subset / name / f"{stem}.wav")[0], track.stems[stem])
    other = synthetic.synthesize_track(seed + 1, "train", 1, seconds)
    same = synthetic.synthesize_track(seed, "train", 1, seconds)
    assert not np.allclose(other.stems["vocals"], same.stems["vocals"])
    assert not np.allclose(synthetic.synthesize_track(seed, "train", 2, seconds).stems["drums"],
                           same.stems["drums"])


@pytest.mark.parametrize("seed", [0, 7])
def test_vocals_are_sparse_and_silent_between_phrases(seed):
    seconds = 20.0
    track = synthetic.synthesize_track(seed, "train", 0, seconds)
    vocals = track.stems["vocals"]
    active = np.zeros(vocals.shape[-1], bool)
    for a, b in track.vocal_phrases:
        active[a:b] = True
        assert np.sqrt(np.mean(vocals[:, a:b] ** 2)) > 0.01  # phrases are sung
    assert not np.any(vocals[:, ~active])  # exact zeros outside the phrases
    assert 0.1 < active.mean() < 0.95  # intermittent: neither empty nor continuous
    # The accompaniment plays throughout.
    for stem in ("drums", "bass", "other"):
        second = synthetic.SAMPLE_RATE
        rms = [np.sqrt(np.mean(track.stems[stem][:, i:i + second] ** 2))
               for i in range(0, vocals.shape[-1] - second + 1, second)]
        assert min(rms) > 1e-3, stem


def test_vocals_are_harmonic_with_vibrato():
    track = synthetic.synthesize_track(3, "train", 0, 12.0)
    a, b = max(track.vocal_phrases, key=lambda p: p[1] - p[0])
    x = track.stems["vocals"][0, a:b].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / synthetic.SAMPLE_RATE)
    # Sung notes: energy concentrated in the voice range, little above 10 kHz.
    voice = spectrum[(freqs > 100) & (freqs < 5000)] ** 2
    assert voice.sum() > 0.9 * (spectrum ** 2).sum()
    assert (spectrum[freqs > 10000] ** 2).sum() < 1e-3 * (spectrum ** 2).sum()


def test_pcm16_mixture_is_the_exact_sum(tmp_path):
    root = synthetic.generate_dataset(tmp_path / "pcm", tracks=2, seconds=0.5, valid_tracks=1,
                                      test_tracks=1, seed=3, subtype="PCM_16")
    folder = root / "train" / "Synthetic - Valid 000"
    assert sf.info(str(folder / "mixture.wav")).subtype == "PCM_16"
    ints = [sf.read(str(folder / f"{n}.wav"), dtype="int16")[0].astype(np.int32)
            for n in ("mixture",) + synthetic.STEMS]
    np.testing.assert_array_equal(ints[0], sum(ints[1:]))


def test_cli_and_musdb_split(tmp_path):
    out = tmp_path / "cli"
    synthetic.main([str(out), "--tracks", "3", "--seconds", "0.5", "--test-tracks", "1",
                    "--seed", "5"])
    names = synthetic.track_names(3, 1, 1)  # default: 14% of 3 tracks -> 1 validation track
    assert [t.name for t in musdb_lib.list_tracks(out, "train")] == names["train"]
    assert [t.name for t in musdb_lib.list_tracks(out, "valid")] == names["valid"]
    assert [t.name for t in musdb_lib.list_tracks(out, "test")] == names["test"]
    # musdb itself applies the split through the setup file.
    import musdb

    db = musdb.DB(root=str(out), is_wav=True, subsets="train", split="valid",
                  setup_file=synthetic.SETUP_FILE)
    assert [t.name for t in db.tracks] == names["valid"]
    with pytest.raises(ValueError, match="already exists"):
        synthetic.main([str(out), "--tracks", "3", "--seconds", "0.5"])
    assert not list(tmp_path.glob(".cli.tmp-*"))  # no temporary folder left behind


@pytest.mark.parametrize("kwargs, match", [
    ({"tracks": 1, "valid_tracks": 1}, "tracks > valid_tracks"),
    ({"tracks": 2, "test_tracks": 0}, "test_tracks >= 1"),
    ({"tracks": 2, "subtype": "PCM_24"}, "Unknown subtype"),
    ({"tracks": 2, "seconds": 0.0}, "positive"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    kwargs = {"seconds": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        synthetic.generate_dataset(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_fixture_matches_the_tiny_config(synthetic_root):
    d = bsmamba2.get_config("tiny").data
    info = json.loads((synthetic_root / synthetic.INFO_FILE).read_text())
    assert info == synthetic.generation_info(
        tracks=d.synthetic_tracks, valid_tracks=d.synthetic_valid_tracks,
        test_tracks=d.synthetic_test_tracks, seconds=d.synthetic_seconds,
        seed=d.synthetic_seed, subtype="FLOAT")
