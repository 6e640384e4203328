"""bsmamba2-separate: file handling with a stand-in model, then once with the tiny model file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import separate


def _write(path, audio, rate, subtype="FLOAT"):
    sf.write(str(path), audio.T, rate, subtype=subtype)
    return path


def _noise(channels, seconds, rate, seed=0):
    return (0.3 * np.random.default_rng(seed).standard_normal(
        (channels, int(seconds * rate)))).astype(np.float32)


def half(stereo: np.ndarray) -> np.ndarray:
    """Stand-in model: vocals = half the mixture (a linear, rate-independent map)."""
    assert stereo.ndim == 2 and stereo.shape[0] == 2
    return 0.5 * stereo


def test_stereo_44k_outputs_and_accompaniment(tmp_path):
    x = _noise(2, 1.5, 44100)
    song = _write(tmp_path / "song.wav", x, 44100)
    assert separate.run([song], tmp_path / "out", None, vocals_fn=half, progress=False) == 0
    v, rv = sf.read(tmp_path / "out" / "song" / "vocals.wav", dtype="float32", always_2d=True)
    a, ra = sf.read(tmp_path / "out" / "song" / "accompaniment.wav", dtype="float32",
                    always_2d=True)
    assert rv == ra == 44100 and sf.info(str(tmp_path / "out/song/vocals.wav")).subtype == "FLOAT"
    np.testing.assert_allclose(v.T, 0.5 * x, atol=1e-7)
    np.testing.assert_allclose(a.T + v.T, x, atol=1e-6)  # accompaniment = mixture - vocals


def test_mono_and_other_rate(tmp_path):
    """Mono 22.05 kHz in: duplicated to stereo, resampled to 44.1 kHz and back, written mono."""
    x = _noise(1, 1.0, 22050, seed=1)
    seen = {}

    def model(stereo):
        seen["shape"] = stereo.shape
        np.testing.assert_array_equal(stereo[0], stereo[1])
        return half(stereo)

    song = _write(tmp_path / "mono.flac", x, 22050, subtype="PCM_24")
    assert separate.run([song], tmp_path / "out", None, vocals_fn=model, progress=False,
                        fmt="wav16") == 0
    assert seen["shape"] == (2, 44100)
    v, rate = sf.read(tmp_path / "out" / "mono" / "vocals.wav", always_2d=True)
    info = sf.info(str(tmp_path / "out" / "mono" / "vocals.wav"))
    assert rate == 22050 and v.shape == (22050, 1) and info.subtype == "PCM_16"
    # resample up and back of a linear map: the mixture comes back up to resampling error
    x_read, _ = sf.read(str(song), dtype="float32", always_2d=True)
    err = np.abs(v[:, 0] - 0.5 * x_read[:, 0])
    assert np.median(err) < 0.02 and np.max(err[2000:-2000]) < 0.1


def test_unreadable_file_is_reported_and_others_run(tmp_path, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    good = _write(tmp_path / "good.wav", _noise(2, 0.5, 44100), 44100)
    failed = separate.run([bad, tmp_path / "missing.wav", good], tmp_path / "out", None,
                          vocals_fn=half, progress=False)
    err = capsys.readouterr().err
    assert failed == 2
    assert "broken.wav: cannot read it as audio" in err and "missing.wav: no such file" in err
    assert (tmp_path / "out" / "good" / "vocals.wav").is_file()


def test_never_overwrites_an_input(tmp_path):
    folder = tmp_path / "song"
    folder.mkdir()
    inp = _write(folder / "vocals.wav", _noise(2, 0.5, 44100), 44100)
    before = inp.read_bytes()
    with pytest.raises(ValueError, match="inputs are never overwritten"):
        separate.run([inp, _write(tmp_path / "song.wav", _noise(2, 0.5, 44100), 44100)],
                     tmp_path, None, vocals_fn=half, progress=False)
    assert inp.read_bytes() == before


def test_main_errors_without_model(tmp_path, monkeypatch):
    monkeypatch.delenv(separate.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        separate.main([str(tmp_path / "x.wav"), "-o", str(tmp_path / "o")])
    assert e.value.code == 2


def test_cli_with_exported_tiny_model(tmp_path):
    """End to end: export a random tiny model, separate a 2.5 s file in 1 s segments."""
    from bsmamba2_jax import export, inference
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    model, params, config = tiny_model_and_params()
    model_file = export.save_model(tmp_path / "tiny.msgpack", params, config)
    x = _noise(2, 2.5, 44100, seed=3)
    song = _write(tmp_path / "track.wav", x, 44100)
    code = separate.main([str(song), "-o", str(tmp_path / "out"), "--checkpoint",
                          str(model_file), "--segment-seconds", "1", "--batch-size", "2",
                          "--format", "wav", "--no-progress"])
    assert code == 0
    v, _ = sf.read(tmp_path / "out" / "track" / "vocals.wav", dtype="float32", always_2d=True)
    want = inference.separate(model, params, x, segment_seconds=1.0, batch_size=2)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(v.T, want, atol=1e-5)
