"""Data: track lists and checks, source activity detection, the Grain pipeline, validation."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import data
from bsmamba2_jax.data import activity as activity_lib
from bsmamba2_jax.data import synthetic
from configs import bsmamba2


def _config(root="", **data_overrides):
    config = bsmamba2.get_config("tiny")
    config.data.root = str(root)
    for k, v in data_overrides.items():
        setattr(config.data, k, v)
    return config


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _read_all(path):
    return sf.read(str(path), dtype="float32", always_2d=True)[0].T


@pytest.fixture
def small_root(tmp_path):
    """A throw-away root to break: 2 train-folder tracks (1 valid), 1 test track, 0.5 s."""
    return synthetic.generate_dataset(tmp_path / "small", tracks=2, valid_tracks=1,
                                      test_tracks=1, seconds=0.5, seed=1)


# ----------------------------------------------------------------------------- tracks, splits


def test_list_tracks_and_splits(synthetic_root):
    split = {s: data.list_tracks(synthetic_root, s) for s in data.SPLITS}
    names = synthetic.track_names(4, 1, 2)
    assert [t.name for t in split["train"]] == names["train"]
    assert [t.name for t in split["valid"]] == names["valid"]
    assert [t.name for t in split["test"]] == names["test"]
    for s, tracks in split.items():
        for t in tracks:
            assert t.subset == ("test" if s == "test" else "train")
            assert t.num_samples == 6 * 44100
            assert set(t.paths) == {"mixture", *data.STEMS}
            assert all(p.is_file() and p.parent.name == t.name for p in t.paths.values())
    data.check_split_disjoint(synthetic_root, split["train"])  # the training split is clean
    with pytest.raises(ValueError, match="Synthetic - Valid 000"):
        data.check_split_disjoint(synthetic_root, split["train"] + split["valid"])
    with pytest.raises(ValueError, match="Synthetic - Test 001"):
        data.check_split_disjoint(synthetic_root, ["Synthetic - Test 001"])


def test_error_root_not_found(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.list_tracks(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="does not exist"):
        data.prepare_dataset_root(_config(tmp_path / "nowhere"), tmp_path / "work")
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no test/ folder"):
        data.list_tracks(tmp_path / "half", "train")
    with pytest.raises(ValueError, match="Unknown split"):
        data.list_tracks(tmp_path / "half", "validation")


def test_error_missing_stem(small_root):
    os.remove(small_root / "train" / "Synthetic - Train 000" / "bass.wav")
    with pytest.raises(ValueError, match=r"'Synthetic - Train 000'.*missing its 'bass' stem.*"
                                         r"bass\.wav not found"):
        data.list_tracks(small_root, "train")


def test_error_sample_rate_and_channels(small_root):
    track = small_root / "train" / "Synthetic - Train 000"
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (22050, 2)).astype(np.float32)
    sf.write(track / "drums.wav", audio, 22050)
    with pytest.raises(ValueError, match=r"drums\.wav: sample rate 22050 Hz, expected 44100"):
        data.list_tracks(small_root, "train")
    sf.write(track / "drums.wav", audio[:, :1], 44100)
    with pytest.raises(ValueError, match=r"drums\.wav: 1 channel\(s\), expected 2"):
        data.list_tracks(small_root, "valid")  # the train folder is checked whatever the split
    sf.write(track / "drums.wav", audio[:100], 44100)
    with pytest.raises(ValueError, match="differ in length"):
        data.list_tracks(small_root, "train")
    (track / "drums.wav").write_bytes(b"not a wav file")
    with pytest.raises(ValueError, match=r"drums\.wav: cannot read as audio"):
        data.list_tracks(small_root, "train")


def test_error_fewer_tracks_than_the_split_needs(small_root):
    # Without the synthetic setup file the root is taken as MUSDB18-HQ: the 14 validation songs
    # of musdb's list are missing.
    os.remove(small_root / synthetic.SETUP_FILE)
    with pytest.raises(ValueError, match=r"lacks 14 of the 14 validation tracks"):
        data.list_tracks(small_root, "train")
    with pytest.raises(ValueError, match=r"split 'test' .* has 1 track\(s\), needs at least 50"):
        data.list_tracks(small_root, "test")
    # A setup file naming every train-folder track as validation leaves training empty.
    setup = synthetic.musdb_setup(["Synthetic - Train 000", "Synthetic - Valid 000"])
    (small_root / synthetic.SETUP_FILE).write_text(json.dumps(setup))
    with pytest.raises(ValueError, match=r"split 'train' .* has 0 track\(s\), needs at least 1"):
        data.list_tracks(small_root, "train")
    setup = synthetic.musdb_setup(["Synthetic - Valid 000", "Synthetic - Valid 001"])
    (small_root / synthetic.SETUP_FILE).write_text(json.dumps(setup))
    with pytest.raises(ValueError, match=r"lacks 1 of the 2 validation tracks.*Valid 001"):
        data.list_tracks(small_root, "valid")


def test_a_root_without_setup_file_gets_musdbs_standard_split(tmp_path):
    """A MUSDB18-HQ-like root (no musdb_setup.yaml): musdb's 14 validation songs form "valid"."""
    import musdb
    import yaml

    with open(pathlib.Path(musdb.__path__[0]) / "configs" / "mus.yaml") as f:
        valid = yaml.safe_load(f)["validation_tracks"]
    rng = np.random.default_rng(0)
    names = {"train": valid + ["A - Train Song"], "test": ["B - Test Song"]}
    for subset, tracks in names.items():
        for name in tracks:
            (tmp_path / subset / name).mkdir(parents=True)
            for stem in ("mixture", *data.STEMS):
                sf.write(tmp_path / subset / name / f"{stem}.wav",
                         rng.uniform(-0.1, 0.1, (441, 2)).astype(np.float32), 44100)
    assert [t.name for t in data.list_tracks(tmp_path, "valid")] == sorted(valid)
    with pytest.raises(ValueError, match=r"split 'train' .* has 1 track\(s\), needs at least 86"):
        data.list_tracks(tmp_path, "train")


def test_read_crop(synthetic_root):
    path = synthetic_root / "test" / "Synthetic - Test 000" / "drums.wav"
    whole = _read_all(path)
    np.testing.assert_array_equal(data.read_crop(path, 1234, 5000), whole[:, 1234:6234])
    with pytest.raises(ValueError, match=r"asked for samples \[264000, 265000\)"):
        data.read_crop(path, 264000, 1000)


# ----------------------------------------------------------------------------- activity


def _activity_reference(audio, window, step, chunks=10, quantile=0.15, floor=1e-3, frac=0.5):
    """Loop-by-loop source-activity detector (docs/DESIGN.md#data), float64: start samples of
    the kept windows."""
    keep = []
    for start in range(0, audio.shape[1] - window + 1, step):
        ok = True
        for channel in audio:
            seg = channel[start:start + window].astype(np.float64)
            rms = np.array([np.sqrt(np.mean(c ** 2)) for c in np.split(seg, chunks)])
            threshold = max(np.percentile(rms, 100 * quantile), floor)
            ok &= np.mean(rms > threshold) > frac
        if ok:
            keep.append(start)
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activity_matches_a_loop_reference(seed):
    rng = np.random.default_rng(seed)
    window, step = 2000, 1000
    audio = rng.standard_normal((2, 23000)).astype(np.float32) * rng.uniform(1e-4, 0.3)
    # Random silent and quiet stretches, some on one channel only, some chunk-sized.
    for _ in range(8):
        a = int(rng.integers(0, 22000))
        b = a + int(rng.integers(100, 4000))
        ch = slice(None) if rng.random() < 0.5 else slice(int(rng.integers(2)), None, 2)
        audio[ch, a:b] *= rng.choice([0.0, 1e-4, 0.5])
    params = data.ActivityParams(window=window, step=step)
    got = data.active_window_starts(audio, params)
    assert got.tolist() == _activity_reference(audio, window, step)
    assert 0 < len(got) < 22  # the stretches make both outcomes occur


def _chunk_energy_cumulative(audio, params):
    """The former definition: chunk energies as differences of one running float64 sum.
    Returns (energies (c, w, k), the running sum's total (c,)) ."""
    starts = np.arange(0, audio.shape[1] - params.window + 1, params.step)
    bounds = np.round(np.arange(params.chunks + 1) * params.window / params.chunks).astype(int)
    energy = np.concatenate([np.zeros((audio.shape[0], 1)),
                             np.cumsum(np.square(audio, dtype=np.float64), axis=-1)], axis=-1)
    edges = starts[:, None] + bounds[None, :]
    return energy[:, edges[:, 1:]] - energy[:, edges[:, :-1]], energy[:, -1], np.diff(bounds)


def _active_from_rms(rms, params):
    threshold = np.maximum(np.quantile(rms, params.quantile, axis=-1, keepdims=True),
                           params.rms_floor)
    keep = np.all(np.mean(rms > threshold, axis=-1) > params.min_fraction, axis=0)
    return (np.flatnonzero(keep) * params.step).tolist()


@pytest.mark.parametrize("window,step,chunks", [(2000, 1000, 10), (2003, 777, 7),
                                                (441, 441, 10), (1000, 30, 10)])
def test_chunk_sums_equal_the_cumulative_definition_on_finite_data(window, step, chunks):
    """Per-chunk sums give the running-sum definition's chunk energies (up to that definition's
    rounding, which grows with the running total) and the same windows, on awkward window /
    step / chunk sizes; they match a chunk-by-chunk exact sum to float64 rounding."""
    rng = np.random.default_rng(window + step + chunks)
    audio = (rng.standard_normal((2, 11_111)) * rng.uniform(1e-4, 0.3)).astype(np.float32)
    for _ in range(6):  # silent and quiet stretches, so that both outcomes occur
        a = int(rng.integers(0, 10_000))
        audio[:, a:a + int(rng.integers(100, 3000))] *= rng.choice([0.0, 1e-4])
    params = data.ActivityParams(window=window, step=step, chunks=chunks)
    got = activity_lib.chunk_rms(audio, params)
    old, total, sizes = _chunk_energy_cumulative(audio, params)
    assert got.shape == old.shape and got.shape[1] > 1
    np.testing.assert_allclose(got**2 * sizes, old, rtol=0,
                               atol=1e-14 * total.max())  # the running sum's rounding
    old_rms = np.sqrt(np.maximum(old, 0.0) / sizes)
    assert data.active_window_starts(audio, params).tolist() == _active_from_rms(old_rms, params)
    bounds = np.round(np.arange(chunks + 1) * window / chunks).astype(int)
    exact = [[[math.fsum(np.square(ch[s + a:s + b], dtype=np.float64))
               for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
              for s in range(0, audio.shape[1] - window + 1, step)] for ch in audio]
    np.testing.assert_allclose(got**2 * sizes, exact, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_nonfinite_sample_drops_only_the_windows_that_hold_it(bad):
    """A running sum carried one NaN into every later window (96% of a 4-minute stem's); now
    only the windows containing the sample are lost."""
    rng = np.random.default_rng(7)
    audio = (0.1 * rng.standard_normal((2, 30_000))).astype(np.float32)
    params = data.ActivityParams(window=2000, step=1000)
    clean = data.active_window_starts(audio, params).tolist()
    assert len(clean) == 29  # loud noise: every window active
    at = 5_432
    audio[1, at] = bad
    got = data.active_window_starts(audio, params).tolist()
    assert got == [s for s in clean if not s <= at < s + params.window]
    assert len(got) == 27


def _poison(path, channel, sample, value):
    """Rewrites a float32 wav with one sample replaced by `value`."""
    audio = _read_all(path)
    audio[channel, sample] = value
    sf.write(str(path), audio.T, 44100, subtype="FLOAT")


def test_nan_in_a_training_stem_is_an_error_naming_the_file_and_time(small_root, tmp_path):
    path = small_root / "train" / "Synthetic - Train 000" / "drums.wav"
    _poison(path, 0, 12_348, np.nan)
    config = _config(small_root, segment_seconds=0.1)
    with pytest.raises(ValueError, match=rf"{path}: 1 non-finite sample\(s\) \(NaN or Inf\), "
                                         r"the first at 0\.280 s \(sample 12348\)"):
        data.make_train_dataset(config, small_root, seed=0, cache_dir=tmp_path)


def test_nan_in_the_validation_track_names_the_file_not_the_segment_length(small_root, tmp_path):
    path = small_root / "train" / "Synthetic - Valid 000" / "vocals.wav"
    _poison(path, 1, 441, np.inf)
    config = _config(small_root, segment_seconds=0.1)
    with pytest.raises(ValueError, match=rf"{path}: 1 non-finite .* at 0\.010 s") as e:
        data.make_validation_set(config, small_root, seed=0, cache_dir=tmp_path)
    assert "segment_seconds" not in str(e.value)


def test_a_track_truncated_in_all_five_files_is_an_error_naming_a_file(small_root):
    """Cut the same way, the five files still agree in length; only their headers tell."""
    folder = small_root / "train" / "Synthetic - Train 000"
    for name in ("mixture", *data.STEMS):
        wav = folder / f"{name}.wav"
        wav.write_bytes(wav.read_bytes()[:-4000])  # 500 frames of float32 stereo
    with pytest.raises(ValueError, match=r"Synthetic - Train 000/mixture\.wav: truncated: its "
                                         r"header promises 22050 frames \(0\.50 s\) but the "
                                         r"file holds 21550"):
        data.list_tracks(small_root, "train")


def test_activity_finds_the_silent_vocal_stretches(synthetic_root):
    """Windows inside a vocal phrase are active, windows inside a silent stretch are not."""
    params = activity_lib.params_from_config(_config().data)
    index = data.activity_index(synthetic_root, "train", params)
    names = synthetic.track_names(4, 1, 2)["train"]
    checked = {"silent": 0, "sung": 0}
    for i, name in enumerate(names):
        track = synthetic.synthesize_track(0, "train", i, 6.0)
        starts = set(index["vocals"][name])
        for start in range(0, 6 * 44100 - params.window + 1, params.step):
            stop = start + params.window
            inside = any(a <= start and stop <= b for a, b in track.vocal_phrases)
            overlaps = any(a < stop and start < b for a, b in track.vocal_phrases)
            if inside:
                assert start in starts, (name, start)
                checked["sung"] += 1
            elif not overlaps:
                assert start not in starts, (name, start)
                checked["silent"] += 1
        # The accompaniment plays throughout: every window of it is active.
        for stem in ("drums", "bass", "other"):
            assert len(index[stem][name]) == 1 + (6 * 44100 - params.window) // params.step
    assert checked["silent"] > 0 and checked["sung"] > 0


def test_activity_index_is_cached_and_invalidated(small_root, tmp_path, monkeypatch):
    params = data.ActivityParams(window=4410, step=2205)
    cache = tmp_path / "cache"
    first = data.activity_index(small_root, "train", params, cache_dir=cache)
    assert len(list(cache.glob("activity-train-*.json"))) == 1

    def no_reading(path):
        raise AssertionError(f"read {path} although the index is cached")

    monkeypatch.setattr(activity_lib, "_read_all", no_reading)
    assert data.activity_index(small_root, "train", params, cache_dir=cache) == first
    # A changed file (size/mtime) or other parameters: recomputed, not served stale.
    path = small_root / "train" / "Synthetic - Train 000" / "vocals.wav"
    os.utime(path, ns=(0, 0))
    with pytest.raises(AssertionError, match="although the index is cached"):
        data.activity_index(small_root, "train", params, cache_dir=cache)
    with pytest.raises(AssertionError, match="although the index is cached"):
        data.activity_index(small_root, "train", data.ActivityParams(window=4410, step=4410),
                            cache_dir=cache)


# ----------------------------------------------------------------------------- training pipeline


def test_batches_match_the_wav_contents(synthetic_root, tmp_path):
    config = _config(synthetic_root)
    ds = data.make_train_dataset(config, synthetic_root, seed=3, cache_dir=tmp_path,
                                 with_metadata=True)
    batches = _take(iter(ds), 12)
    tracks = data.list_tracks(synthetic_root, "train")
    params = activity_lib.params_from_config(config.data)
    index = data.activity_index(synthetic_root, "train", params, cache_dir=tmp_path)
    wavs = {(t.name, s): _read_all(t.paths[s]) for t in tracks for s in data.STEMS}
    n = params.window
    silent = 0
    for batch in batches:
        assert batch["mixture"].shape == batch["vocals"].shape == (4, 2, n)
        assert batch["mixture"].dtype == batch["vocals"].dtype == np.float32
        for b in range(4):
            mixture = np.zeros((2, n), np.float32)
            for i, stem in enumerate(data.STEMS):
                track = tracks[batch["track"][b, i]].name
                start = int(batch["start"][b, i])
                assert start in index[stem][track]  # an active window of that stem
                gain = batch["gain"][b, i]
                assert 0.5 <= gain <= 1.5
                crop = wavs[track, stem][:, start:start + n] * gain
                if batch["silent"][b, i]:
                    crop = np.zeros_like(crop)
                    silent += 1
                mixture = mixture + crop
                if stem == "vocals":
                    np.testing.assert_array_equal(batch["vocals"][b], crop)
            np.testing.assert_array_equal(batch["mixture"][b], mixture)
    # Independent choices: different tracks and starts per stem, and silence ~10% of the time.
    assert 0 < silent < 0.3 * 12 * 4 * 4
    starts = np.concatenate([b["start"] for b in batches])
    assert len({tuple(r) for r in starts}) == len(starts)
    assert np.any(starts[:, 0] != starts[:, 1])


def test_pipeline_is_deterministic_for_a_seed(synthetic_root, tmp_path):
    config = _config(synthetic_root)
    make = lambda seed: iter(data.make_train_dataset(config, synthetic_root, seed=seed,
                                                     cache_dir=tmp_path))
    first = _take(make(11), 3)
    _assert_batches_equal(first, _take(make(11), 3))
    other = _take(make(12), 3)
    assert not np.array_equal(first[0]["mixture"], other[0]["mixture"])
    assert not np.array_equal(first[0]["mixture"], first[1]["mixture"])


def test_get_state_set_state_resumes_exactly(synthetic_root, tmp_path):
    config = _config(synthetic_root, examples_per_epoch=6)  # batches cross epoch boundaries
    ds = data.make_train_dataset(config, synthetic_root, seed=5, cache_dir=tmp_path)
    it = iter(ds)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    expected = _take(it, 3)
    resumed = iter(data.make_train_dataset(config, synthetic_root, seed=5, cache_dir=tmp_path))
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)


def test_sharding_splits_the_global_batch(synthetic_root, tmp_path):
    config = _config(synthetic_root)
    whole = _take(iter(data.make_train_dataset(config, synthetic_root, seed=2,
                                               cache_dir=tmp_path)), 3)
    shards = [_take(iter(data.make_train_dataset(config, synthetic_root, seed=2, shard_index=i,
                                                 shard_count=2, cache_dir=tmp_path)), 3)
              for i in range(2)]
    for k in range(3):
        a, b = shards[0][k]["mixture"], shards[1][k]["mixture"]
        assert a.shape == b.shape == (2, 2, 44100)
        assert not np.array_equal(a, b)
        # Shard i holds the global examples i, i + 2, ...: together exactly the global batch.
        for key in ("mixture", "vocals"):
            np.testing.assert_array_equal(whole[k][key][0::2], shards[0][k][key])
            np.testing.assert_array_equal(whole[k][key][1::2], shards[1][k][key])
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        data.make_train_dataset(config, synthetic_root, seed=2, shard_count=3)
    with pytest.raises(ValueError, match="shard_index=2"):
        data.make_train_dataset(config, synthetic_root, seed=2, shard_index=2, shard_count=2)


def test_worker_processes_give_the_same_stream(synthetic_root, tmp_path):
    config = _config(synthetic_root)
    inline = _take(iter(data.make_train_dataset(config, synthetic_root, seed=4,
                                                cache_dir=tmp_path)), 5)
    config.data.num_workers = 2
    it = iter(data.make_train_dataset(config, synthetic_root, seed=4, cache_dir=tmp_path))
    try:
        _assert_batches_equal(_take(it, 2), inline[:2])
        state = it.get_state()
        _assert_batches_equal(_take(it, 3), inline[2:])
    finally:
        it.close()
    resumed = iter(data.make_train_dataset(config, synthetic_root, seed=4, cache_dir=tmp_path))
    try:
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 3), inline[2:])
    finally:
        resumed.close()


def test_training_never_draws_held_out_tracks(synthetic_root, tmp_path):
    config = _config(synthetic_root)
    batches = _take(iter(data.make_train_dataset(config, synthetic_root, seed=9,
                                                 cache_dir=tmp_path, with_metadata=True)), 10)
    tracks = data.list_tracks(synthetic_root, "train")
    used = {tracks[i].name for b in batches for i in b["track"].ravel()}
    assert used == {t.name for t in tracks}  # 160 draws reach every training track...
    assert not used & {t.name for t in data.list_tracks(synthetic_root, "valid")}  # ...only those


def test_bad_pipeline_arguments(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="seed"):
        data.make_train_dataset(_config(synthetic_root), synthetic_root, seed=-1)
    with pytest.raises(ValueError, match="gain_min"):
        data.make_train_dataset(_config(synthetic_root, gain_min=2.0), synthetic_root, seed=0)
    # Segments longer than every track: no active window to draw from.
    with pytest.raises(ValueError, match="no active 'vocals' window"):
        data.make_train_dataset(_config(synthetic_root, segment_seconds=7.0), synthetic_root,
                                seed=0, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- validation


def test_validation_windows_are_drawn_from_active_vocals(synthetic_root, tmp_path):
    config = _config(synthetic_root, validation_windows=7)
    val = data.make_validation_set(config, synthetic_root, seed=3, cache_dir=tmp_path)
    track = data.list_tracks(synthetic_root, "valid")[0]
    params = activity_lib.params_from_config(config.data)
    index = data.activity_index(synthetic_root, "valid", params, cache_dir=tmp_path)
    assert len(val) == 7 and val.length == params.window
    assert set(val.windows[:, 1]) <= set(index["vocals"][track.name])  # vocal-active only
    assert list(val.windows[:, 1]) == sorted(val.windows[:, 1])
    # The draw is a function of the seed: the same windows at every validation of a run.
    again = data.make_validation_set(config, synthetic_root, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.windows, val.windows)
    other = data.make_validation_set(config, synthetic_root, seed=4, cache_dir=tmp_path)
    assert not np.array_equal(other.windows, val.windows)  # another seed, other draws
    # Mixture = the sum of the four stems at the same samples (mixture.wav is not read).
    stems = {s: _read_all(track.paths[s]) for s in data.STEMS}
    batch = val.read([0, 6])
    assert batch["mixture"].shape == batch["vocals"].shape == (2, 2, params.window)
    for row, i in enumerate([0, 6]):
        a = int(val.windows[i, 1])
        b = a + params.window
        np.testing.assert_array_equal(batch["vocals"][row], stems["vocals"][:, a:b])
        np.testing.assert_allclose(batch["mixture"][row],
                                   sum(stems[s][:, a:b] for s in data.STEMS), atol=1e-6)
        assert np.sqrt(np.mean(batch["vocals"][row] ** 2)) > 1e-3


# ----------------------------------------------------------------------------- dataset root


def test_prepare_dataset_root_generates_once(synthetic_root, tmp_path):
    assert data.prepare_dataset_root(_config(synthetic_root), tmp_path) == synthetic_root
    config = _config(synthetic_tracks=2, synthetic_valid_tracks=1, synthetic_test_tracks=1,
                     synthetic_seconds=1.0)
    root = data.prepare_dataset_root(config, tmp_path / "work")
    assert root == tmp_path / "work" / "synthetic"
    assert [t.name for t in data.list_tracks(root, "valid")] == ["Synthetic - Valid 000"]
    mtime = (root / "train" / "Synthetic - Valid 000" / "vocals.wav").stat().st_mtime_ns
    assert data.prepare_dataset_root(config, tmp_path / "work") == root  # reused as is
    assert (root / "train" / "Synthetic - Valid 000" / "vocals.wav").stat().st_mtime_ns == mtime
    config.data.synthetic_seconds = 2.0
    with pytest.raises(ValueError, match="generated with"):
        data.prepare_dataset_root(config, tmp_path / "work")
    shutil.rmtree(root)
    (root / "train").mkdir(parents=True)  # e.g. a copy interrupted by hand
    with pytest.raises(ValueError, match="not a complete synthetic dataset"):
        data.prepare_dataset_root(config, tmp_path / "work")
