"""bsmamba2-separate: streaming, resampling and bad input with stand-in models, then end to end
with the tiny model file."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from bsmamba2_jax import inference, separate_cli
from bsmamba2_jax.separate_cli import Resampler, Separator

RATE = 44100


def _seed(*values) -> int:
    return zlib.crc32(repr(values).encode())


def _write(path, audio, rate=RATE, subtype="FLOAT"):
    sf.write(str(path), audio.T, rate, subtype=subtype)
    return path


def _noise(channels, seconds, rate=RATE, seed=0):
    return (0.3 * np.random.default_rng(seed).standard_normal(
        (channels, int(seconds * rate)))).astype(np.float32)


def _read(path):
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio.T, rate


def _half(batch: np.ndarray) -> np.ndarray:
    """Stand-in model: vocals = half the mixture (linear, pointwise)."""
    return 0.5 * batch


def _plus_mean(batch: np.ndarray) -> np.ndarray:
    """Stand-in model that depends on the whole segment, row by row."""
    return np.stack([0.5 * s + 0.1 * np.ascontiguousarray(s).mean(-1, keepdims=True)
                     for s in batch])


def _separator(fn=_half, segment=8820, overlap=0.0, batch_size=2) -> Separator:
    calls = []

    def counted(batch):
        calls.append(batch.shape)
        return fn(batch)

    counted.calls = calls  # the batch shapes it was called with
    return Separator(counted, RATE, segment, overlap, batch_size, "stand-in")


def _run(inputs, out, sep=None, **kw):
    kw.setdefault("progress", False)
    return separate_cli.run(inputs, out, sep or _separator(), **kw)


def _failed(results):
    return {r.path.name: r.error for r in results if r.error}


# ----------------------------------------------------------------------------- normal files


def test_stereo_44k_outputs_and_accompaniment(tmp_path):
    x = _noise(2, 1.5)
    song = _write(tmp_path / "song.wav", x)
    results = _run([song], tmp_path / "out")
    assert not _failed(results) and results[0].segments == 8  # 1.5 s in 0.2 s segments
    v, rv = _read(tmp_path / "out/song/vocals.wav")
    a, ra = _read(tmp_path / "out/song/accompaniment.wav")
    assert rv == ra == RATE and sf.info(str(tmp_path / "out/song/vocals.wav")).subtype == "FLOAT"
    np.testing.assert_allclose(v, 0.5 * x, atol=1e-7)
    np.testing.assert_allclose(a + v, x, atol=1e-6)  # accompaniment = mixture - vocals
    assert sorted(p.name for p in (tmp_path / "out/song").iterdir()) == [
        "accompaniment.wav", "vocals.wav"]  # no partial files left


@pytest.mark.parametrize("rate,channels,overlap", [(48000, 2, 0.0), (22050, 1, 0.25),
                                                   (RATE, 2, 0.5), (RATE, 1, 0.0)])
def test_streamed_file_equals_whole_array_pipeline(tmp_path, rate, channels, overlap):
    """Streaming (blocks, resampling, segments, writing) gives the numbers of the whole-array
    path: resample_poly of everything, split/overlap_add in memory, resample back, crop."""
    seed = _seed(rate, channels, overlap)
    x = _noise(channels, 3.3, rate, seed=seed)  # > one read block, not a multiple of anything
    song = _write(tmp_path / "song.wav", x, rate)
    sep = _separator(_plus_mean, segment=30000, overlap=overlap, batch_size=3)
    assert not _failed(_run([song], tmp_path / "out", sep))
    assert set(sep.fn.calls) == {(3, 2, 30000)}  # one shape for every call

    g = np.gcd(rate, RATE)
    stereo = np.repeat(x, 2, axis=0) if channels == 1 else x
    up = resample_poly(stereo, RATE // g, rate // g, axis=-1) if rate != RATE else stereo
    plan = inference.plan_segments(up.shape[-1], 30000, overlap)
    segs = inference.split_segments(up[None].astype(np.float32), plan)[0]
    vocals = inference.overlap_add(_plus_mean(segs)[None], plan)[0]
    if rate != RATE:
        vocals = resample_poly(vocals, rate // g, RATE // g, axis=-1)
    vocals = vocals[:, :x.shape[-1]]
    if channels == 1:
        vocals = vocals.mean(axis=0, keepdims=True)
    v, r = _read(tmp_path / "out/song/vocals.wav")
    a, _ = _read(tmp_path / "out/song/accompaniment.wav")
    assert r == rate and v.shape == x.shape
    np.testing.assert_allclose(v, vocals, rtol=0, atol=2e-6, err_msg=f"seed {seed}")
    np.testing.assert_allclose(a, x - vocals, rtol=0, atol=2e-6, err_msg=f"seed {seed}")


@pytest.mark.parametrize("rate_in,rate_out", [(48000, RATE), (RATE, 48000), (22050, RATE),
                                              (RATE, 22050), (8000, RATE), (RATE, RATE)])
def test_streaming_resampler_equals_resample_poly(rate_in, rate_out):
    seed = _seed(rate_in, rate_out)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 200_003)).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, x.shape[-1]), size=25, replace=False))
    r = Resampler(rate_in, rate_out)
    got = np.concatenate([r.push(b) for b in np.split(x, cuts, axis=-1)] + [r.finish()], -1)
    g = np.gcd(rate_in, rate_out)
    want = resample_poly(x, rate_out // g, rate_in // g, axis=-1) if rate_in != rate_out else x
    assert got.shape == want.shape == (2, separate_cli.resampled_length(200_003, rate_in,
                                                                          rate_out))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"seed {seed}")


def test_one_compiled_shape_for_files_of_any_length(tmp_path):
    """Short, partial and long files all call the model with the cached batch shape."""
    files = [_write(tmp_path / f"t{n}.wav", _noise(2, n / RATE, seed=n), RATE)
             for n in (800, 8820, 30_001, 100_000)]
    sep = _separator(batch_size=2)
    results = _run(files, tmp_path / "out", sep)
    assert not _failed(results)
    assert set(sep.fn.calls) == {(2, 2, 8820)}
    assert [r.segments for r in results] == [1, 1, 4, 12]


# ----------------------------------------------------------------------------- bad input


def test_short_input_is_zero_padded_not_refused(tmp_path):
    """An 800-sample file used to abort with a message naming no file; it is one padded
    segment now, and its output has its own length."""
    x = _noise(2, 800 / RATE, seed=1)
    song = _write(tmp_path / "tiny.wav", x)
    sep = _separator(_plus_mean, segment=8820)
    assert not _failed(_run([song], tmp_path / "out", sep))
    v, _ = _read(tmp_path / "out/tiny/vocals.wav")
    padded = np.pad(x, ((0, 0), (0, 8820 - 800)))
    np.testing.assert_allclose(v, _plus_mean(padded[None])[0][:, :800], atol=1e-7)


def test_nonfinite_samples_are_an_error_naming_the_file_and_the_flag(tmp_path):
    x = _noise(2, 1.0, seed=2)
    x[1, 12345] = np.nan
    x[0, 30000] = np.inf
    bad = _write(tmp_path / "nan.wav", x)
    good = _write(tmp_path / "good.wav", _noise(2, 0.5, seed=3))
    sep = _separator()
    results = _run([bad, good], tmp_path / "out", sep)
    err = _failed(results)["nan.wav"]
    assert "nan.wav: 2 non-finite samples" in err and "0.280 s" in err
    assert "--nonfinite zero" in err
    assert not (tmp_path / "out/nan").exists()  # nothing written for it
    assert (tmp_path / "out/good/vocals.wav").is_file()  # the other file still ran


def test_nonfinite_zero_replaces_them_with_a_warning(tmp_path, capsys):
    x = _noise(2, 1.0, seed=4)
    x[1, 12345] = np.nan
    bad = _write(tmp_path / "nan.wav", x)
    results = _run([bad], tmp_path / "out", nonfinite="zero")
    assert not _failed(results)
    assert "1 non-finite samples (NaN or Inf) replaced by zeros" in capsys.readouterr().err
    v, _ = _read(tmp_path / "out/nan/vocals.wav")
    a, _ = _read(tmp_path / "out/nan/accompaniment.wav")
    clean = np.where(np.isfinite(x), x, 0)
    assert np.isfinite(v).all() and np.isfinite(a).all()
    np.testing.assert_allclose(v, 0.5 * clean, atol=1e-7)
    np.testing.assert_allclose(a, 0.5 * clean, atol=1e-6)


@pytest.mark.parametrize("fmt,bits", [("wav16", 16), ("wav24", 24), ("flac", 24)])
def test_clipping_in_integer_formats_is_a_warning_with_the_peak(tmp_path, capsys, fmt, bits):
    x = 1.8 * np.clip(_noise(2, 1.0, seed=5), -1, 1)  # a loud float file, peak 1.8
    song = _write(tmp_path / "loud.wav", x)
    sep = _separator(lambda b: -0.5 * b)  # vocals peak 0.9; accompaniment = 1.5 x, peak 2.7
    assert not _failed(_run([song], tmp_path / "out", sep, fmt=fmt))
    err = capsys.readouterr().err
    ext = "flac" if fmt == "flac" else "wav"
    peak = np.abs(1.5 * x).max()
    clipped = np.count_nonzero(np.abs(1.5 * x) > 1)
    assert f"accompaniment.{ext}: peak {peak:.3f}" in err
    assert f"{clipped} samples" in err and f"clipped in the {bits}-bit output" in err
    assert "--format wav" in err and f"vocals.{ext}" not in err
    a, _ = _read(tmp_path / "out/loud/accompaniment.wav" if ext == "wav" else
                 tmp_path / "out/loud/accompaniment.flac")
    assert np.abs(a).max() <= 1.0  # clipped, not wrapped around
    # The float format keeps the values beyond full scale and says nothing.
    assert not _failed(_run([song], tmp_path / "out_float", sep, fmt="wav"))
    assert "clipped" not in capsys.readouterr().err
    a, _ = _read(tmp_path / "out_float/loud/accompaniment.wav")
    np.testing.assert_allclose(np.abs(a).max(), peak, rtol=1e-6)


def test_truncated_wav_is_an_error_naming_the_file(tmp_path):
    song = _write(tmp_path / "cut.wav", _noise(2, 1.0, seed=6))
    data = song.read_bytes()
    song.write_bytes(data[:len(data) // 2])  # the header still promises the whole second
    good = _write(tmp_path / "good.wav", _noise(2, 0.5, seed=7))
    results = _run([song, good], tmp_path / "out")
    err = _failed(results)["cut.wav"]
    assert "cut.wav: truncated: its header promises 44100 frames" in err
    assert not (tmp_path / "out/cut").exists() and (tmp_path / "out/good/vocals.wav").is_file()


def test_truncated_flac_is_an_error_naming_the_file(tmp_path):
    song = _write(tmp_path / "cut.flac", _noise(2, 2.0, seed=8), subtype="PCM_16")
    data = song.read_bytes()
    song.write_bytes(data[:len(data) // 2])
    err = _failed(_run([song], tmp_path / "out"))["cut.flac"]
    assert err.startswith(f"{song}:") and ("damaged" in err or "truncated" in err)


def test_each_input_fails_on_its_own(tmp_path, capsys):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    empty = _write(tmp_path / "empty.wav", np.zeros((2, 0), np.float32))
    many = _write(tmp_path / "surround.wav", _noise(6, 0.1))
    blocked = _write(tmp_path / "blocked.wav", _noise(2, 0.2, seed=9))
    (tmp_path / "out").mkdir()
    (tmp_path / "out/blocked").write_text("a file where the output folder would go")
    good = _write(tmp_path / "good.wav", _noise(2, 0.5, seed=10))
    inputs = [broken, tmp_path / "missing.wav", folder, empty, many, blocked, good]
    results = _run(inputs, tmp_path / "out")
    failed = _failed(results)
    assert set(failed) == {"broken.wav", "missing.wav", "folder.wav", "empty.wav",
                           "surround.wav", "blocked.wav"}
    assert "cannot read it as audio" in failed["broken.wav"]
    assert "missing.wav: no such file" in failed["missing.wav"]
    assert "is a folder, not an audio file" in failed["folder.wav"]
    assert "holds no samples" in failed["empty.wav"]
    assert "6 channels" in failed["surround.wav"]
    assert "blocked by a file" in failed["blocked.wav"]
    assert (tmp_path / "out/blocked").read_text().startswith("a file")  # untouched
    assert (tmp_path / "out/good/vocals.wav").is_file()
    err = capsys.readouterr().err
    assert all(str(p) in err for p in inputs[:-1])


def test_all_inputs_bad_never_loads_the_model(tmp_path):
    def load():
        raise AssertionError("the model was loaded although no input can be separated")

    results = separate_cli.run([tmp_path / "missing.wav"], tmp_path / "out", load,
                               progress=False)
    assert _failed(results)


def _failing_on_call(n: int):
    """Stand-in model that runs out of memory on its n-th call (vocals = half otherwise)."""
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (stand-in)")
        return 0.5 * batch

    return flaky


def test_a_failure_mid_file_leaves_no_output_and_others_run(tmp_path):
    flaky = _failing_on_call(2)
    first = _write(tmp_path / "first.wav", _noise(2, 1.0, seed=11))
    second = _write(tmp_path / "second.wav", _noise(2, 0.3, seed=12))
    results = _run([first, second], tmp_path / "out", _separator(flaky))
    assert "first.wav: RESOURCE_EXHAUSTED" in _failed(results)["first.wav"]
    assert not (tmp_path / "out/first").exists()  # no partial files, no empty folder
    assert (tmp_path / "out/second/vocals.wav").is_file()


def test_never_overwrites_an_input(tmp_path):
    folder = tmp_path / "song"
    folder.mkdir()
    inp = _write(folder / "vocals.wav", _noise(2, 0.5))
    before = inp.read_bytes()
    other = _write(tmp_path / "other.wav", _noise(2, 0.5, seed=1))
    results = _run([inp, _write(tmp_path / "song.wav", _noise(2, 0.5)), other], tmp_path)
    assert "inputs are never overwritten" in _failed(results)["song.wav"]
    assert inp.read_bytes() == before
    assert (tmp_path / "other/vocals.wav").is_file()


def test_two_inputs_of_one_name_the_second_fails(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _write(tmp_path / "a/song.wav", _noise(2, 0.3, seed=1))
    two = _write(tmp_path / "b/song.wav", _noise(2, 0.3, seed=2))
    failed = _failed(_run([one, two], tmp_path / "out"))
    assert list(failed) == ["song.wav"] and str(two) in failed["song.wav"]
    v, _ = _read(tmp_path / "out/song/vocals.wav")
    np.testing.assert_allclose(v, 0.5 * _read(one)[0], atol=1e-7)


def _never_loaded():
    raise AssertionError("the model was loaded although nothing may be written")


def test_a_second_run_into_the_same_output_is_refused_before_model_work(tmp_path, capsys):
    first, second = _noise(2, 0.5, seed=21), _noise(2, 0.5, seed=22)
    song = _write(tmp_path / "song.wav", first)
    assert not _failed(_run([song], tmp_path / "out"))
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "out/song").iterdir()}
    _write(song, second)  # the same name again, another mixture
    err = _failed(_run([song], tmp_path / "out", _never_loaded))["song.wav"]
    assert f"{tmp_path / 'out/song'} already holds a separation" in err
    assert "accompaniment.wav" in err and "--overwrite" in err and "another -o" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out/song").iterdir()} == earlier
    # --overwrite replaces it.
    assert not _failed(_run([song], tmp_path / "out", overwrite=True))
    v, _ = _read(tmp_path / "out/song/vocals.wav")
    np.testing.assert_allclose(v, 0.5 * second, atol=1e-7)
    assert sorted(p.name for p in (tmp_path / "out/song").iterdir()) == [
        "accompaniment.wav", "vocals.wav"]


def test_overwrite_replaces_only_a_complete_separation(tmp_path):
    """A failure mid-file keeps the earlier separation byte for byte; a complete one replaces
    it, also in another format (no stale vocals.flac beside the new vocals.wav), and keeps the
    folder's other files."""
    song = _write(tmp_path / "song.wav", _noise(2, 1.0, seed=23))
    assert not _failed(_run([song], tmp_path / "out", fmt="flac"))
    folder = tmp_path / "out/song"
    (folder / "notes.txt").write_text("mine")
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}
    failed = _failed(_run([song], tmp_path / "out", _separator(_failing_on_call(2)),
                          overwrite=True))
    assert "RESOURCE_EXHAUSTED" in failed["song.wav"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier  # no partial files
    assert not _failed(_run([song], tmp_path / "out", overwrite=True))
    assert sorted(p.name for p in folder.iterdir()) == ["accompaniment.wav", "notes.txt",
                                                       "vocals.wav"]


def test_help_says_how_an_existing_output_is_treated():
    text = " ".join(separate_cli.build_parser().format_help().split())
    assert "refused if that already holds a separation" in text
    assert "--overwrite replace an earlier separation in OUTPUT/<name>/" in text


def test_nothing_is_written_into_the_run_that_checkpoint_reads(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints/12/ema_params").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    song = _write(tmp_path / "song.wav", _noise(2, 0.2))
    for checkpoint, out in [(run, run), (run / "checkpoints/12", run / "checkpoints"),
                            (run / "checkpoints/12", run / "separated")]:
        code = separate_cli.main([str(song), "-o", str(out), "--checkpoint", str(checkpoint),
                                  "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"-o {out} lies inside the train.py run {run}" in err and "outside" in err
    assert not (run / "song").exists() and not (run / "separated").exists()
    assert not (run / "checkpoints/song").exists()


def test_the_model_file_is_never_an_output(tmp_path):
    (tmp_path / "vocals").mkdir()
    model = tmp_path / "vocals/vocals.wav"  # the model file, named like an output
    model.write_bytes(b"model bytes")
    song = _write(tmp_path / "vocals.wav", _noise(2, 0.2))
    err = _failed(_run([song], tmp_path, _never_loaded, model=model))["vocals.wav"]
    assert f"is the input {model}" in err and "never overwritten" in err
    assert model.read_bytes() == b"model bytes"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_named_and_leaves_no_partial_output(tmp_path, capsys):
    """The partial vocals file sits on a full device (/dev/full: every write fails with ENOSPC,
    as on a full disk); libsndfile alone reports only "System error."."""
    song = _write(tmp_path / "song.wav", _noise(2, 1.0, seed=24))
    other = _write(tmp_path / "other.wav", _noise(2, 0.3, seed=25))
    folder = tmp_path / "out/song"
    folder.mkdir(parents=True)
    (folder / ".vocals.wav.partial").symlink_to("/dev/full")
    results = _run([song, other], tmp_path / "out")
    err = _failed(results)["song.wav"]
    assert err == (f"{song}: cannot write {folder / 'vocals.wav'}: the disk is full (No space "
                   "left on device); nothing was left behind: free some space there or choose "
                   "another -o folder")
    assert list(folder.iterdir()) == []  # neither stem nor partial file
    assert (tmp_path / "out/other/vocals.wav").is_file()  # the next file still runs


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("args,flag,says", [
    (["--segment-seconds", "0"], "--segment-seconds", "positive number of seconds"),
    (["--segment-seconds", "-2"], "--segment-seconds", "positive number of seconds"),
    (["--segment-seconds", "nan"], "--segment-seconds", "positive number of seconds"),
    (["--segment-seconds", "inf"], "--segment-seconds", "positive number of seconds"),
    (["--overlap", "1"], "--overlap", "fraction in [0, 1)"),
    (["--overlap", "-0.1"], "--overlap", "fraction in [0, 1)"),
    (["--overlap", "nan"], "--overlap", "fraction in [0, 1)"),
    (["--batch-size", "0"], "--batch-size", "'auto' or a whole number >= 1"),
    (["--batch-size", "two"], "--batch-size", "'auto' or a whole number >= 1"),
    (["--format", "mp3"], "--format", "invalid choice"),
    (["--nonfinite", "keep"], "--nonfinite", "invalid choice"),
    (["--dtype", "int8"], "--dtype", "invalid choice"),
    (["--weights", "best"], "--weights", "invalid choice"),
])
def test_bad_arguments_name_the_flag_and_the_range(tmp_path, capsys, args, flag, says):
    model = tmp_path / "model.msgpack"
    model.write_bytes(b"never read: the arguments fail first")
    song = _write(tmp_path / "song.wav", _noise(2, 0.2))
    with pytest.raises(SystemExit) as e:
        separate_cli.main([str(song), "-o", str(tmp_path / "out"), "--checkpoint", str(model)]
                          + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and says in err
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_and_missing_model_are_named(tmp_path, capsys, monkeypatch):
    song = _write(tmp_path / "song.wav", _noise(2, 0.2))
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    model = tmp_path / "model.msgpack"
    model.write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        separate_cli.main([str(song), "-o", str(taken), "--checkpoint", str(model)])
    assert e.value.code == 2 and f"-o {taken} is a file" in capsys.readouterr().err
    assert taken.read_text() == "keep me"
    with pytest.raises(SystemExit) as e:
        separate_cli.main([str(song), "-o", str(tmp_path / "o"), "--checkpoint",
                           str(tmp_path / "nope.msgpack")])
    assert e.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    monkeypatch.delenv(separate_cli.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        separate_cli.main([str(song), "-o", str(tmp_path / "o")])
    assert e.value.code == 2 and "no model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from bsmamba2_jax import export
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    model, params, config = tiny_model_and_params()
    path = export.save_model(tmp_path_factory.mktemp("model") / "tiny.msgpack", params, config)
    return model, params, path


def test_segment_too_short_for_the_stft_and_wrong_weights_are_named(tmp_path, capsys,
                                                                    tiny_file):
    _, _, model_file = tiny_file
    song = _write(tmp_path / "song.wav", _noise(2, 0.2))
    base = [str(song), "-o", str(tmp_path / "out"), "--checkpoint", str(model_file)]
    assert separate_cli.main(base + ["--segment-seconds", "0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--segment-seconds=0.01 gives 441 samples" in err and "at least 1025" in err
    assert separate_cli.main(base + ["--weights", "raw", "--no-progress"]) == 2
    assert "holds the ema weights only" in capsys.readouterr().err
    assert not (tmp_path / "out/song").exists()


def test_cli_with_exported_tiny_model(tmp_path, capsys, tiny_file):
    """End to end: a 2.5 s file in 1 s segments next to two bad files; the good one equals
    `separate_vocals`, the bad ones are named in the summary, the exit status is 1."""
    model, params, model_file = tiny_file
    x = _noise(2, 2.5, seed=3)
    song = _write(tmp_path / "track.wav", x)
    nan = x.copy()
    nan[0, 5] = np.nan
    bad = _write(tmp_path / "nan.wav", nan)
    code = separate_cli.main([str(song), str(bad), str(tmp_path / "missing.wav"), "-o",
                              str(tmp_path / "out"), "--checkpoint", str(model_file),
                              "--segment-seconds", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "separated 1 of 3 files" in err and "2 failed" in err
    assert "nan.wav: 1 non-finite samples" in err and "missing.wav: no such file" in err
    assert "float32, 1 x 1 s segments per call" in err  # CPU: float32 compute, batch 1
    v, _ = _read(tmp_path / "out/track/vocals.wav")
    want = inference.separate_vocals(model, params, x, segment_seconds=1.0, batch_size=1)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(v, want, atol=1e-5)


@pytest.mark.parametrize("dtype,max_err", [("bfloat16", 2e-2), ("float16", 4e-3)])
def test_dtype_flag_sets_the_compute_dtype(tiny_file, dtype, max_err):
    """--dtype reaches the model: the output moves away from float32's by that dtype's rounding,
    and no further."""
    model, params, model_file = tiny_file
    sep = separate_cli.load_separator(model_file, dtype=dtype, segment_seconds=0.1,
                                      batch_size=1)
    assert f"{dtype}, 1 x 0.1 s segments" in sep.description
    seed = _seed(dtype)
    x = _noise(2, 0.1, seed=seed)[None]
    got = np.asarray(sep.fn(x))
    want = np.asarray(inference._apply(model, params, x))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-5 < err < max_err, f"seed {seed}: relative L2 {err:.2e}"
