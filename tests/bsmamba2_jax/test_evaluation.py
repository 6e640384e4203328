"""Evaluation loop, reports, shift averaging, onset table, and evaluate.py end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import evaluation, metrics

REPO = Path(__file__).resolve().parents[2]


def _read(path):
    return sf.read(str(path), dtype="float32", always_2d=True)[0].T


class Leaky:
    """Stand-in separator: vocals estimate = a fixed fraction of the mixture; counts calls."""

    def __init__(self, gain=0.4):
        self.gain, self.calls = gain, 0

    def __call__(self, mixture):
        self.calls += 1
        return (self.gain * mixture).astype(np.float32)


@pytest.fixture(scope="module")
def test_tracks(synthetic_root):
    from bsmamba2_jax.data import list_tracks

    return list_tracks(synthetic_root, "test")


def test_evaluate_tracks_scores_reports_and_skip(test_tracks, tmp_path):
    sep = Leaky()
    results = evaluation.evaluate_tracks(sep, test_tracks, tmp_path, save_audio=True,
                                         progress=False)
    assert sep.calls == len(test_tracks) == len(results) == 2
    for track, r in zip(test_tracks, results, strict=True):
        mix, voc = _read(track.paths["mixture"]), _read(track.paths["vocals"])
        acc = sum(_read(track.paths[s]) for s in ("drums", "bass", "other"))
        est = 0.4 * mix
        assert r["usdr"] == pytest.approx(metrics.usdr(voc, est), abs=1e-9)
        frames = metrics.csdr_frames(np.stack([voc, acc]), np.stack([est, mix - est]))
        assert r["csdr"] == pytest.approx(float(np.nanmedian(frames[0])), abs=1e-9)
        leak = metrics.silent_leakage(voc, est, mix)[0]
        assert np.isfinite(leak) and r["leakage_db"] == pytest.approx(leak)
        np.testing.assert_array_equal(_read(tmp_path / "audio" / r["name"] / "vocals.wav"), est)
        assert json.loads((tmp_path / "tracks" / f"{r['name']}.json").read_text())["usdr"] \
            == r["usdr"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["usdr"] == pytest.approx(np.mean([r["usdr"] for r in results]))
    assert summary["csdr"] == pytest.approx(np.median([r["csdr"] for r in results]))
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [row["name"] for row in rows] == [r["name"] for r in results]
    assert (tmp_path / "onset.json").is_file() and (tmp_path / "onset.csv").is_file()
    # Re-running skips scored tracks; --force scores them again.
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, progress=False)
    assert sep.calls == 2
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, force=True, progress=False)
    assert sep.calls == 4


def test_museval_option_agrees_with_fast_csdr(test_tracks, tmp_path):
    """On the synthetic tracks, full museval's vocal SDR median equals our track cSDR."""
    pytest.importorskip("museval")
    results = evaluation.evaluate_tracks(Leaky(0.6), test_tracks[:1], tmp_path, run_museval=True,
                                         progress=False)
    r = results[0]
    full = json.loads((tmp_path / "tracks" / f"{r['name']}.museval.json").read_text())
    ours = [np.nan if v is None else v for v in r["csdr_frames"]]
    theirs = [np.nan if v is None else v for v in full["vocals"]["SDR"]]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert r["museval_sdr"] == pytest.approx(r["csdr"], abs=1e-6)
    assert set(full["vocals"]) >= {"SDR", "ISR", "SIR", "SAR"}


def test_shift_averaging_realigns_outputs():
    """A pointwise model is shift-invariant, so any number of shifts and any overlap-add must
    give its output (this also checks the window normalisation of the overlap-add)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class Pointwise(nn.Module):
        @nn.compact
        def __call__(self, x):
            g = self.param("g", lambda _: jnp.float32(0.7))
            return jnp.tanh(g * x) + 0.1 * x**2

    rng = np.random.default_rng(0)
    x = (0.5 * rng.standard_normal((2, 10_000))).astype(np.float32)
    params = {"params": {"g": np.float32(0.7)}}
    want = np.tanh(0.7 * x) + 0.1 * x**2
    for shifts, overlap in ((1, 0.0), (3, 0.0), (2, 0.5), (1, 0.3)):
        fn = evaluation.make_separator(Pointwise(), params, segment_seconds=0.1, shifts=shifts,
                                       overlap=overlap, rate=44100, batch_size=3)
        np.testing.assert_allclose(fn(x), want, atol=1e-6, err_msg=f"{shifts=} {overlap=}")
    with pytest.raises(ValueError, match="shifts"):
        evaluation.make_separator(Pointwise(), params, shifts=0)


def test_onset_stretches_binned_by_length():
    rate = 44100
    rng = np.random.default_rng(1)
    vocals = np.zeros((2, 16 * rate))
    stretches = [(0.5, 2.0), (3.0, 6.0), (7.0, 12.5), (13.0, 13.5)]  # 1.5 s, 3 s, 5.5 s, 0.5 s
    for a, b in stretches:
        i, j = round(a * rate), round(b * rate)
        vocals[:, i:j] = 0.2 * rng.standard_normal((2, j - i))
    est = vocals + 0.05 * rng.standard_normal(vocals.shape)
    got = evaluation.onset_stretch_scores(vocals, est, rate)
    assert [g["bin"] for g in got] == ["1-2s", "2-4s", "4-8s"]  # the 0.5 s stretch has no bin
    for g, (a, b) in zip(got, stretches, strict=False):
        sl = slice(round(a * rate), round(b * rate))
        assert g["usdr"] == pytest.approx(metrics.usdr(vocals[:, sl], est[:, sl]), abs=1e-6)
    table = evaluation.onset_summary([{"name": "t", "onset": got}])
    assert table["2-4s"]["stretches"] == 1 and table["1-2s"]["usdr_mean"] == got[0]["usdr"]
    assert "1-2s" in evaluation.format_onset(table)


def test_sweep_table_and_plot(tmp_path):
    sweep = {1.0: {"usdr": 3.2, "csdr": 4.1}, 8.0: {"usdr": 5.5, "csdr": None}}
    text = evaluation.format_sweep(sweep)
    assert "1 s uSDR" in text and "3.20" in text and "5.50" in text
    png = evaluation.plot_sweep(sweep, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_py_end_to_end(synthetic_root, tmp_path):
    """evaluate.py with a random tiny model file on the synthetic test split, then a sweep that
    reuses the scored 2 s run."""
    from bsmamba2_jax import export
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    _, params, config = tiny_model_and_params()
    model_file = export.save_model(tmp_path / "tiny.msgpack", params, config)
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--config=configs/bsmamba2.py:tiny",
           f"--workdir={workdir}", f"--checkpoint={model_file}",
           f"--config.data.root={synthetic_root}", "--segment_seconds=2", "--write_audio",
           "--noprogress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| BSMamba2 |" in out.stdout and "Table III" in out.stdout
    run_dir = workdir / "eval" / "test" / "seg2_ov0_shifts1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tracks"] == 2 and np.isfinite(summary["usdr"])
    folders = sorted(p for p in (synthetic_root / "test").iterdir() if p.is_dir())
    assert len(folders) == 2
    for track in folders:
        r = json.loads((run_dir / "tracks" / f"{track.name}.json").read_text())
        est = _read(run_dir / "audio" / track.name / "vocals.wav")
        assert r["usdr"] == pytest.approx(metrics.usdr(_read(track / "vocals.wav"), est),
                                          abs=1e-9)
    scored = {p: p.stat().st_mtime_ns for p in (run_dir / "tracks").glob("*.json")}
    out = subprocess.run(cmd[:-2] + ["--sweep=2,3", "--noprogress"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in scored} == scored  # 2 s tracks were not re-scored
    sweep = json.loads((workdir / "eval" / "test" / "sweep_ov0_shifts1.json").read_text())
    assert set(sweep) == {"2", "3"} and sweep["2"]["usdr"] == pytest.approx(summary["usdr"])
    assert (workdir / "eval" / "test" / "sweep_ov0_shifts1.png").is_file()


def test_mel_filterbank_and_sine_peak():
    from bsmamba2_jax import plots

    rate, n_fft, n_mels = 44100, 2048, 64
    fb = plots.mel_filterbank(n_fft, n_mels, rate)
    assert fb.shape == (n_mels, n_fft // 2 + 1) and fb.min() >= 0 and fb.max() <= 1
    centres = plots.mel_to_hz(np.linspace(0, plots.hz_to_mel(rate / 2), n_mels + 2))[1:-1]
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    # every filter peaks at the bin nearest its centre frequency
    assert np.all(np.abs(freqs[fb.argmax(axis=1)] - centres) <= rate / n_fft)
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 3000.0 * t)[None].repeat(2, 0)
    mel = plots.mel_power(tone, rate, n_mels=n_mels)
    loudest = mel.mean(axis=1).argmax()
    assert abs(centres[loudest] - 3000.0) < np.diff(centres)[loudest] * 1.5


def test_plots_cli_writes_figure(synthetic_root, tmp_path):
    from bsmamba2_jax import plots

    track = sorted(p for p in (synthetic_root / "test").iterdir() if p.is_dir())[0]
    est = tmp_path / "est" / "vocals.wav"
    est.parent.mkdir()
    sf.write(str(est), 0.5 * _read(track / "mixture.wav").T, 44100, subtype="FLOAT")
    out = tmp_path / "fig.png"
    assert plots.main(["--track", str(track), "--estimate", str(est), "--label", "half mix",
                       "--start", "1", "--duration", "3", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.main(["--track", str(track), "--start", "999", "-o", str(out)]) == 1


def test_score_track_without_vocals():
    """A track with no vocals at all: cSDR undefined (all frames NaN), leakage over the whole
    track, and the summary leaves the undefined cSDR out instead of failing."""
    rng = np.random.default_rng(2)
    acc = (0.3 * rng.standard_normal((2, 3 * 44100))).astype(np.float32)
    vocals = np.zeros_like(acc)
    est = 0.1 * acc
    r = evaluation.score_track(acc, vocals, acc, est)
    assert r["csdr"] is None and r["csdr_accompaniment"] is None  # museval: any silent source
    assert r["silent_seconds"] == 3
    assert r["leakage_db"] == pytest.approx(20 * np.log10(0.1), abs=1e-6)
    summary = evaluation.summarize([{"name": "a", **r}, {"name": "b", **r, "csdr": 5.0}])
    assert summary["csdr"] == 5.0 and summary["stats"]["csdr"]["n"] == 1
    json.dumps(r, allow_nan=False)  # strict JSON: undefined scores are null
