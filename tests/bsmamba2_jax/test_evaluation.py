"""Evaluation: per-track scores (the paper's protocol), stored results tied to their weights,
reports and plots, flag checks, and evaluate.py end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import eval_io, evaluation, metrics, plots, reports
from bsmamba2_jax.data.musdb import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[2]


def _seed(*values) -> int:
    return zlib.crc32(repr(values).encode())


def _read(path):
    return sf.read(str(path), dtype="float32", always_2d=True)[0].T


class Leaky:
    """Stand-in model: vocal estimate = a fixed fraction of the mixture; counts calls."""

    def __init__(self, gain=0.4):
        self.gain, self.calls = gain, 0

    def __call__(self, mixture):
        self.calls += 1
        return (self.gain * mixture).astype(np.float32)


def _producer(gain: float, source: str = "a.msgpack") -> dict:
    return {"model": {"key": f"leaky{gain:g}", "params_sha256": f"{gain:g}", "source": source},
            "settings": {"segment_seconds": 8.0}}


@pytest.fixture(scope="module")
def test_tracks(synthetic_root):
    from bsmamba2_jax.data import list_tracks

    return list_tracks(synthetic_root, "test")


def test_evaluate_tracks_scores_reports_and_reuse(test_tracks, tmp_path):
    sep = Leaky()
    results = evaluation.evaluate_tracks(sep, test_tracks, tmp_path, save_audio=True,
                                         producer=_producer(0.4), progress=False)
    assert sep.calls == len(test_tracks) == len(results) == 2
    for track, r in zip(test_tracks, results, strict=True):
        mix, voc = _read(track.paths["mixture"]), _read(track.paths["vocals"])
        acc = sum(_read(track.paths[s]) for s in ("drums", "bass", "other"))
        est = 0.4 * mix
        assert r["usdr"] == pytest.approx(metrics.usdr(voc, est), abs=1e-9)
        # cSDR: the vocals alone; the accompaniment alone in its own column.
        assert r["csdr"] == pytest.approx(np.nanmedian(metrics.csdr_frames([voc], [est])),
                                          abs=1e-9)
        assert r["csdr_accompaniment"] == pytest.approx(
            np.nanmedian(metrics.csdr_frames([acc], [mix - est])), abs=1e-9)
        leak = metrics.silent_leakage(voc, est, mix)[0]
        assert np.isfinite(leak) and r["leakage_db"] == pytest.approx(leak)
        np.testing.assert_array_equal(_read(tmp_path / "audio" / r["name"] / "vocals.wav"), est)
        stored = json.loads((tmp_path / "tracks" / f"{r['name']}.json").read_text())
        assert stored["usdr"] == r["usdr"]
        assert stored["producer"]["model"]["key"] == "leaky0.4"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["usdr"] == pytest.approx(np.mean([r["usdr"] for r in results]))
    assert summary["csdr"] == pytest.approx(np.median([r["csdr"] for r in results]))
    assert summary["model"]["key"] == "leaky0.4"  # the summary names what was scored
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [row["name"] for row in rows] == [r["name"] for r in results]
    assert (tmp_path / "onset.json").is_file() and (tmp_path / "onset.csv").is_file()
    # The same producer reuses the stored tracks; --force scores them again.
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, producer=_producer(0.4),
                               progress=False)
    assert sep.calls == 2
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, producer=_producer(0.4), force=True,
                               progress=False)
    assert sep.calls == 4
    # The same weights read from another path (same key) are the same producer.
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, producer=_producer(0.4, "b/7"),
                               progress=False)
    assert sep.calls == 4
    # Other settings are not.
    changed = {**_producer(0.4), "settings": {"segment_seconds": 4.0}}
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, producer=changed, progress=False)
    assert sep.calls == 6
    # Other weights in the same folder are scored again, never mixed with these results.
    other = Leaky(0.7)
    again = evaluation.evaluate_tracks(other, test_tracks, tmp_path, producer=_producer(0.7),
                                       progress=False)
    assert other.calls == 2
    assert [r["producer"]["model"]["key"] for r in again] == ["leaky0.7"] * 2
    assert again[0]["usdr"] != pytest.approx(results[0]["usdr"], abs=1e-3)


@pytest.mark.parametrize("dtype,needle,never", [
    ("float16", r"float16 compute overflowed: evaluate with --dtype=float32", "checkpoint"),
    ("float32", r"from a finite mixture in float32 compute: its weights", "float16"),
    (None, r"from a finite mixture: its weights .* another --checkpoint", "float16"),
])
def test_estimate_with_nan_is_a_named_error(test_tracks, tmp_path, dtype, needle, never):
    """A NaN estimate is blamed on float16 overflow only when the model ran in float16."""
    def broken(mixture):
        out = 0.5 * mixture
        out[0, 100] = np.nan
        return out

    with pytest.raises(ValueError, match=r"non-finite samples.*" + needle) as e:
        evaluation.evaluate_tracks(broken, test_tracks[:1], tmp_path, compute_dtype=dtype,
                                   progress=False)
    assert test_tracks[0].name in str(e.value) and never not in str(e.value)
    assert not list(tmp_path.rglob("*.json"))  # nothing stored for a broken estimate


def test_csdr_scores_the_vocals_alone_like_the_authors():
    """The authors' cSDR is museval's bss_eval on the vocals alone: seconds where only the
    accompaniment is silent still count (museval.evaluate on both sources would drop them)."""
    museval = pytest.importorskip("museval")
    seed = _seed("vocals-alone")
    rng = np.random.default_rng(seed)
    n = 5 * SAMPLE_RATE + 1234
    vocals = (0.2 * rng.standard_normal((2, n))).astype(np.float32)
    vocals[:, 4 * SAMPLE_RATE:5 * SAMPLE_RATE] = 0.0  # one vocal-silent second
    accompaniment = (0.3 * rng.standard_normal((2, n))).astype(np.float32)
    accompaniment[:, SAMPLE_RATE:3 * SAMPLE_RATE] = 0.0  # two accompaniment-silent seconds
    mixture = vocals + accompaniment
    # Estimate quality varies by second, so dropping frames moves the median.
    gain = np.repeat(rng.uniform(0.02, 0.5, size=6), SAMPLE_RATE)[:n].astype(np.float32)
    estimate = vocals + gain * accompaniment + 0.01 * rng.standard_normal((2, n)).astype(
        np.float32)
    r = evaluation.score_track(mixture, vocals, accompaniment, estimate)

    sdr = museval.metrics.bss_eval(vocals.T[None], estimate.T[None], window=SAMPLE_RATE,
                                   hop=SAMPLE_RATE)[0][0]
    ours = np.array([np.nan if v is None else v for v in r["csdr_frames"]])
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(sdr), err_msg=f"{seed=}")
    np.testing.assert_allclose(ours, sdr, atol=1e-6, err_msg=f"{seed=}")
    assert r["csdr"] == pytest.approx(float(np.nanmedian(sdr)), abs=1e-6), f"{seed=}"
    # Scoring both sources jointly drops the accompaniment-silent seconds: another number.
    joint = museval.evaluate(np.stack([vocals, accompaniment]).transpose(0, 2, 1),
                             np.stack([estimate, mixture - estimate]).transpose(0, 2, 1),
                             win=SAMPLE_RATE, hop=SAMPLE_RATE)[0][0]
    assert np.isnan(joint[1:3]).all() and np.isfinite(ours[1:3]).all()
    assert abs(np.nanmedian(joint) - r["csdr"]) > 0.1, f"{seed=}"
    # The accompaniment's own column is the accompaniment scored alone.
    _, acc_frames = metrics.sdr_scores(accompaniment, mixture - estimate)
    assert r["csdr_accompaniment"] == pytest.approx(float(np.nanmedian(acc_frames)))
    assert np.isnan(acc_frames[1:3]).all() and np.isfinite(acc_frames[4])


def test_museval_option_agrees_with_fast_csdr(test_tracks, tmp_path):
    """On a synthetic track, full museval's vocal SDR frames equal our frames."""
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
    assert set(full["accompaniment"]) >= {"SDR", "ISR", "SIR", "SAR"}


def test_load_track_names_missing_and_mismatched_stems(synthetic_root, tmp_path):
    src = sorted(p for p in (synthetic_root / "test").iterdir() if p.is_dir())[0]
    track = tmp_path / src.name
    track.mkdir()
    for stem in ("mixture", "vocals", "drums", "bass", "other"):
        (track / f"{stem}.wav").write_bytes((src / f"{stem}.wav").read_bytes())
    loaded = eval_io.load_track(track)
    want = sum(_read(src / f"{s}.wav") for s in ("drums", "bass", "other"))
    np.testing.assert_array_equal(loaded["accompaniment"], want)
    (track / "bass.wav").unlink()
    with pytest.raises(ValueError, match="bass.wav missing"):
        eval_io.load_track(track)
    sf.write(str(track / "bass.wav"), _read(src / "bass.wav").T[:1000], SAMPLE_RATE)
    with pytest.raises(ValueError, match="bass has shape"):
        eval_io.load_track(track)


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

    rng = np.random.default_rng(_seed("shifts"))
    x = (0.5 * rng.standard_normal((2, 10_000))).astype(np.float32)
    params = {"params": {"g": np.float32(0.7)}}
    want = np.tanh(0.7 * x) + 0.1 * x**2
    for shifts, overlap in ((1, 0.0), (3, 0.0), (2, 0.5), (1, 0.3)):
        fn = evaluation.make_vocals_fn(Pointwise(), params, segment_seconds=0.1, shifts=shifts,
                                       overlap=overlap, rate=SAMPLE_RATE, batch_size=3)
        np.testing.assert_allclose(fn(x), want, atol=1e-6, err_msg=f"{shifts=} {overlap=}")
    with pytest.raises(ValueError, match="shifts"):
        evaluation.make_vocals_fn(Pointwise(), params, shifts=0)


def test_onset_stretches_binned_by_length():
    rate = SAMPLE_RATE
    rng = np.random.default_rng(_seed("onset"))
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
    table = reports.onset_summary([{"name": "t", "onset": got}])
    assert table["2-4s"]["stretches"] == 1 and table["1-2s"]["usdr_mean"] == got[0]["usdr"]
    text = reports.table3({"A": table, "B": table})
    assert "1-2s" in text and f"{got[0]['usdr']:8.2f}" in text.splitlines()[3]


def test_side_by_side_tables_and_sweep_plot(tmp_path):
    sweeps = {"A": {1.0: {"usdr": 3.2, "csdr": 4.1}, 8.0: {"usdr": 5.5, "csdr": None}},
              "B": {1.0: {"usdr": -1.25, "csdr": 0.5}, 8.0: {"usdr": 2.0, "csdr": 2.5}}}
    text = reports.table4(sweeps)
    lines = text.splitlines()
    assert "1 s uSDR" in lines[0] and "8 s cSDR" in lines[0]
    assert lines[2].startswith("| A |") and "3.20" in lines[2] and "5.50" in lines[2]
    assert lines[3].startswith("| B |") and "-1.25" in lines[3]
    png = plots.plot_sweep(sweeps, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports.write_sweep(tmp_path / "sweep", sweeps)
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [(r["model"], r["segment_seconds"]) for r in rows] == [
        ("A", "1"), ("A", "8"), ("B", "1"), ("B", "8")]
    assert json.loads((tmp_path / "sweep.json").read_text())["A"]["8"]["csdr"] is None


def test_score_track_without_vocals():
    """A track with no vocals at all: the vocal cSDR is undefined (every frame silent), the
    accompaniment scored alone is not, leakage covers the whole track, and the summary leaves
    the undefined cSDR out instead of failing."""
    rng = np.random.default_rng(_seed("no-vocals"))
    acc = (0.3 * rng.standard_normal((2, 3 * SAMPLE_RATE))).astype(np.float32)
    vocals = np.zeros_like(acc)
    est = 0.1 * acc
    r = evaluation.score_track(acc, vocals, acc, est)
    assert r["csdr"] is None
    assert r["csdr_accompaniment"] == pytest.approx(20 * np.log10(1 / 0.1), abs=1e-5)
    assert r["silent_seconds"] == 3
    assert r["leakage_db"] == pytest.approx(20 * np.log10(0.1), abs=1e-6)
    assert r["vocals_silent"] and not r["accompaniment_silent"]
    voiced = {**r, "name": "b", "csdr": 5.0, "usdr": 7.0, "vocals_silent": False}
    summary = reports.summarize([{"name": "a", **r}, voiced])
    assert summary["csdr"] == 5.0 and summary["stats"]["csdr"]["n"] == 1
    assert summary["usdr"] == 7.0 and summary["stats"]["usdr"]["n"] == 1
    assert summary["stats"]["leakage_db"]["n"] == 2  # leakage is what a silent track measures
    json.dumps(r, allow_nan=False)  # strict JSON: undefined scores are null


def _copy_test_tracks(root: Path, dest: Path) -> list[Path]:
    """The synthetic test track folders copied to `dest` (to break), in name order."""
    out = []
    for src in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        (dest / src.name).mkdir(parents=True)
        for f in src.iterdir():
            (dest / src.name / f.name).write_bytes(f.read_bytes())
        out.append(dest / src.name)
    return out


def _write(path: Path, audio: np.ndarray, subtype: str = "FLOAT") -> None:
    sf.write(str(path), np.asarray(audio, np.float32).T, SAMPLE_RATE, subtype=subtype)


def test_silent_reference_vocals_are_named_and_left_out_of_usdr_and_csdr(synthetic_root,
                                                                         tmp_path):
    """A track whose vocals.wav is all zeros: its uSDR (about -80 dB, set by the regulariser) is
    not averaged with the others, its undefined cSDR is not counted, the tables' counts say so,
    and the notes name the track and how each score treats it."""
    voiced, silent = _copy_test_tracks(synthetic_root, tmp_path / "data")
    stems = {s: _read(silent / f"{s}.wav") for s in ("vocals", "drums", "bass", "other")}
    _write(silent / "vocals.wav", np.zeros_like(stems["vocals"]))
    _write(silent / "mixture.wav", stems["drums"] + stems["bass"] + stems["other"])
    results = evaluation.evaluate_tracks(Leaky(0.4), [voiced, silent], tmp_path / "out",
                                         producer=_producer(0.4), progress=False)
    by_name = {r["name"]: r for r in results}
    assert by_name[silent.name]["vocals_silent"] and not by_name[voiced.name]["vocals_silent"]
    assert by_name[silent.name]["usdr"] < -60  # what the old mean averaged in
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["usdr"] == pytest.approx(by_name[voiced.name]["usdr"])
    assert summary["csdr"] == pytest.approx(by_name[voiced.name]["csdr"])
    assert summary["stats"]["usdr"]["n"] == summary["stats"]["csdr"]["n"] == 1
    assert summary["tracks"] == 2 and summary["stats"]["leakage_db"]["n"] == 2
    assert summary["checks"]["silent_vocals"] == [silent.name]
    assert summary["left_out"]["usdr"] == {silent.name: "silent reference vocals"}
    note = next(n for n in summary["notes"] if n.startswith("Silent reference vocals"))
    assert silent.name in note and "museval refuses a silent reference" in note
    assert f"(uSDR {by_name[silent.name]['usdr']:.2f} dB)" in note
    assert any(n.startswith("cSDR over 1 of 2 track(s)") for n in summary["notes"])
    row = reports.table2({"m": summary}).splitlines()[2]
    assert row.endswith("| 2 (uSDR 1, cSDR 1) |"), row
    # Without silent references every score counts every track and nothing is noted.
    clean = evaluation.evaluate_tracks(Leaky(0.4), [voiced], tmp_path / "clean",
                                       producer=_producer(0.4), progress=False)
    summary = reports.summarize(clean)
    assert summary["notes"] == [] and reports.track_counts(summary) == "1"


def test_mixture_that_is_not_the_sum_of_its_stems_is_named(synthetic_root, tmp_path):
    """Another track's mixture.wav copied in is named with its residual; a mixture that is the
    sum of independently 16-bit-rounded stems (MUSDB18-HQ's case) is well inside the
    tolerance."""
    first, second = _copy_test_tracks(synthetic_root, tmp_path / "data")
    (second / "mixture.wav").write_bytes((first / "mixture.wav").read_bytes())
    # The first track as 16-bit files, the mixture rounded on its own as a studio export would.
    rng = np.random.default_rng(_seed("pcm16"))
    stems = {s: _read(first / f"{s}.wav") * rng.uniform(0.1, 0.5)
             for s in ("vocals", "drums", "bass", "other")}
    for s, audio in stems.items():
        _write(first / f"{s}.wav", audio, "PCM_16")
    _write(first / "mixture.wav", sum(stems.values()), "PCM_16")
    results = evaluation.evaluate_tracks(Leaky(0.4), [first, second], tmp_path / "out",
                                         producer=_producer(0.4), progress=False)
    ok, bad = results
    assert not ok["mixture_mismatch"] and ok["mixture_residual_db"] < -60
    assert bad["mixture_mismatch"] and bad["mixture_residual_db"] > -10
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["checks"]["mixture_mismatch"]) == [second.name]
    note = next(n for n in summary["notes"] if n.startswith("mixture.wav is not the sum"))
    assert second.name in note and first.name not in note and "tolerance -40 dB" in note
    assert f"{bad['mixture_residual_db']:.2f} dB" in note


def test_nan_in_a_reference_or_mixture_names_the_file_before_the_model_runs(synthetic_root,
                                                                             tmp_path):
    track, _ = _copy_test_tracks(synthetic_root, tmp_path / "data")
    for stem in ("vocals", "mixture", "bass"):
        clean = (track / f"{stem}.wav").read_bytes()
        audio = _read(track / f"{stem}.wav")
        audio[1, 2 * SAMPLE_RATE + 441] = np.nan if stem != "bass" else np.inf
        _write(track / f"{stem}.wav", audio)
        sep = Leaky()
        with pytest.raises(ValueError) as e:
            evaluation.evaluate_tracks(sep, [track], tmp_path / "out", progress=False)
        assert str(e.value).startswith(f"{track / stem}.wav: 1 non-finite sample(s)")
        assert "the first at 2.010 s" in str(e.value) and "float16" not in str(e.value)
        assert sep.calls == 0 and not list((tmp_path / "out").rglob("*.json"))
        (track / f"{stem}.wav").write_bytes(clean)


def test_evaluate_py_reports_a_bad_track_file_in_one_line(synthetic_root, tmp_path):
    """evaluate.py with a NaN in a test stem: one line naming the file, no traceback."""
    root = tmp_path / "root"
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True)
    for src in (synthetic_root / "train").iterdir():
        (root / "train" / src.name).symlink_to(src)
    (root / "musdb_setup.yaml").write_bytes((synthetic_root / "musdb_setup.yaml").read_bytes())
    (track,) = _copy_test_tracks(synthetic_root, root / "test")[:1]
    for extra in sorted((root / "test").iterdir())[1:]:
        for f in extra.iterdir():
            f.unlink()
        extra.rmdir()
    audio = _read(track / "vocals.wav")
    audio[0, 3 * SAMPLE_RATE] = np.nan
    _write(track / "vocals.wav", audio)
    model_file = _model_file(tmp_path / "m.msgpack", 1)
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--config=configs/bsmamba2.py:tiny",
           f"--workdir={tmp_path / 'run'}", f"--checkpoint={model_file}",
           f"--config.data.root={root}", "--noprogress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if f"{track}/vocals.wav" in line]
    assert len(errors) == 1 and "the first at 3.000 s" in errors[0], out.stderr[-2000:]


def test_result_files_never_share_a_temporary_name(test_tracks, tmp_path):
    """Two evaluations writing the same results at once: each writes its own temporary file
    (the one another process has in flight, here planted by hand, is never written into or
    renamed away), and a failed write leaves the old file and no temporary behind."""
    results = evaluation.evaluate_tracks(Leaky(0.4), test_tracks[:1], tmp_path,
                                         producer=_producer(0.4), progress=False)
    planted = {}
    for name in ("summary.json", "scores.csv", "onset.csv", "onset.json"):
        planted[tmp_path / f"{name}.tmp"] = f"another process's half-written {name}"
    planted[tmp_path / "audio.wav.tmp"] = "another process's half-written audio"
    for path, text in planted.items():
        path.write_text(text)
    reports.write_run_reports(results, tmp_path)
    estimate = (0.4 * _read(test_tracks[0].paths["mixture"])).astype(np.float32)
    eval_io.write_audio(tmp_path / "audio.wav", estimate)
    for path, text in planted.items():
        assert path.read_text() == text, path
    np.testing.assert_array_equal(_read(tmp_path / "audio.wav"), estimate)
    assert json.loads((tmp_path / "summary.json").read_text())["tracks"] == 1
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ValueError):
        eval_io.write_json(tmp_path / "summary.json", {"usdr": float("nan")})  # strict JSON
    with pytest.raises(ValueError):
        eval_io.write_audio(tmp_path / "audio.wav", estimate, subtype="NO_SUCH_SUBTYPE")
    assert (tmp_path / "summary.json").read_text() == before
    np.testing.assert_array_equal(_read(tmp_path / "audio.wav"), estimate)
    leftovers = {p for p in tmp_path.iterdir() if p.name.endswith(".tmp")} - set(planted)
    assert not leftovers


# ----------------------------------------------------------------------------- evaluate.py


@pytest.mark.parametrize("flag,value,needle", [
    ("sweep", ["1", "0"], "--sweep: '0'"),
    ("sweep", ["-2"], "--sweep: '-2'"),
    ("sweep", ["nan"], "--sweep: 'nan'"),
    ("sweep", ["1", "", "2"], "--sweep=1,,2: an empty value"),
    ("sweep", ["abc"], "--sweep: 'abc'"),
    ("sweep", ["2", "2"], "given twice"),
    ("segment_seconds", 0.0, "--segment_seconds: 0.0"),
    ("segment_seconds", float("nan"), "--segment_seconds: nan"),
    ("segment_seconds", 1e9, "--segment_seconds"),
    ("overlap", 1.0, "--overlap=1.0"),
    ("overlap", -0.25, "--overlap=-0.25"),
    ("overlap", float("nan"), "--overlap=nan"),
    ("shifts", 0, "--shifts=0: give an integer >= 1"),
    ("batch_size", -1, "--batch_size=-1: give an integer >= 0"),
    ("max_tracks", -1, "--max_tracks=-1: give an integer >= 0"),
    ("labels", ["a", "b"], "--label: 2 labels for 1 checkpoints"),
    ("labels", ["a/b"], "--label='a/b'"),
    ("checkpoints", ["/no/such/model.msgpack"], "--checkpoint=/no/such/model.msgpack"),
    ("workdir", "/no/such/run", "--workdir=/no/such/run: no such folder"),
])
def test_check_options_names_the_flag_and_range(tmp_path, flag, value, needle):
    from absl import app

    import evaluate

    with pytest.raises(app.UsageError) as e:
        evaluate.check_options(**{"workdir": str(tmp_path), flag: value})
    assert needle in str(e.value)
    if flag in ("sweep", "segment_seconds"):
        assert "(0, 600]" in str(e.value) or "twice" in str(e.value) or "empty" in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written


def _model_file(path: Path, seed: int) -> Path:
    """The tiny model with random weights of `seed`, as an exported file holding raw weights."""
    import jax

    from bsmamba2_jax import export
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    _, params, config = tiny_model_and_params()
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                          params)
    return export.save_model(path, params, config, weights="raw", step=seed)


def test_weights_and_dtype_reach_the_model(synthetic_root, tmp_path):
    """--dtype is an execution override of the loaded model and part of its result key;
    --weights must match what the source holds, with an error naming the flag."""
    from absl import app

    import evaluate

    config = _tiny_config(synthetic_root)
    path = str(_model_file(tmp_path / "m.msgpack", 3))
    keys = {}
    for dtype in ("checkpoint", "float16", "bfloat16"):
        opts = evaluate.check_options(workdir=str(tmp_path), checkpoints=[path], dtype=dtype)
        (c,) = evaluate.load_candidates(config, opts)
        want = "float32" if dtype == "checkpoint" else dtype  # the tiny config runs in float32
        assert c.model.dtype == want and c.identity["model"]["dtype"] == want
        assert c.identity["weights"] == "raw" and c.identity["step"] == 3
        keys[dtype] = c.identity["key"]
    assert len(set(keys.values())) == 3 and keys["float16"].startswith("step3-raw-float16-")
    opts = evaluate.check_options(workdir=str(tmp_path), checkpoints=[path], weights="ema")
    with pytest.raises(app.UsageError, match=r"--weights=ema\): .*holds the raw weights only"):
        evaluate.load_candidates(config, opts)
    opts = evaluate.check_options(workdir=str(tmp_path), checkpoints=[path], sweep=["0.01"])
    with pytest.raises(app.UsageError, match=r"--sweep: 0.01 s is 441 samples; .*at least 1025"):
        evaluate.load_candidates(config, opts)


def test_evaluate_py_rejects_a_bad_sweep_before_model_work(synthetic_root, tmp_path):
    model_file = _model_file(tmp_path / "m.msgpack", 1)
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--config=configs/bsmamba2.py:tiny",
           f"--workdir={workdir}", f"--checkpoint={model_file}",
           f"--config.data.root={synthetic_root}", "--sweep=1,0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--sweep: '0'" in out.stderr and "(0, 600]" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not workdir.exists()  # no result folders left behind


def _tiny_config(root):
    from configs.bsmamba2 import get_config

    config = get_config("tiny")
    config.data.root = str(root)
    return config


def test_evaluate_scores_each_checkpoint_in_its_own_folder(synthetic_root, tmp_path, capsys):
    """Scores stored for one checkpoint are never reported for another (they were, when stored
    results were keyed by the segment length alone); the tables name the checkpoint."""
    import evaluate

    config = _tiny_config(synthetic_root)
    first = _model_file(tmp_path / "first.msgpack", 11)
    second = _model_file(tmp_path / "second.msgpack", 12)
    common = dict(workdir=str(tmp_path / "run"), segment_seconds=2.0, max_tracks=1,
                  progress=False)
    a = evaluate.evaluate(config, evaluate.check_options(checkpoints=[str(first)], **common))
    b = evaluate.evaluate(config, evaluate.check_options(checkpoints=[str(second)],
                                                         write_audio=True, **common))
    (label_a, sum_a), = a["summary"].items()
    (label_b, sum_b), = b["summary"].items()
    assert (label_a, label_b) == ("first@11", "second@12")
    assert sum_a["model"]["source"] == str(first) and sum_b["model"]["source"] == str(second)
    assert sum_a["model"]["key"] != sum_b["model"]["key"]
    assert abs(sum_a["usdr"] - sum_b["usdr"]) > 1e-3  # the second was scored, not reused
    run_b = Path(b["out_dirs"][label_b][2.0])
    track = sorted(p for p in (synthetic_root / "test").iterdir() if p.is_dir())[0]
    r = json.loads((run_b / "tracks" / f"{track.name}.json").read_text())
    est = _read(run_b / "audio" / track.name / "vocals.wav")
    assert r["usdr"] == pytest.approx(metrics.usdr(_read(track / "vocals.wav"), est), abs=1e-9)
    assert json.loads((run_b / "summary.json").read_text())["model"]["source"] == str(second)
    out = capsys.readouterr().out
    assert str(second) in out and "| second@12 |" in out and "Table III" in out
    # A rerun of the first reuses its stored tracks.
    stored = {p: p.stat().st_mtime_ns for p in Path(a["out_dirs"][label_a][2.0]).rglob("*.json")
              if p.parent.name == "tracks"}
    again = evaluate.evaluate(config, evaluate.check_options(checkpoints=[str(first)], **common))
    assert {p: p.stat().st_mtime_ns for p in stored} == stored
    assert again["summary"][label_a]["usdr"] == sum_a["usdr"]


def test_mel_filterbank_and_sine_peak():
    rate, n_fft, n_mels = SAMPLE_RATE, 2048, 64
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
    track = sorted(p for p in (synthetic_root / "test").iterdir() if p.is_dir())[0]
    est = tmp_path / "est" / "vocals.wav"
    est.parent.mkdir()
    sf.write(str(est), 0.5 * _read(track / "mixture.wav").T, SAMPLE_RATE, subtype="FLOAT")
    out = tmp_path / "fig.png"
    assert plots.main(["--track", str(track), "--estimate", str(est), "--label", "half mix",
                       "--start", "1", "--duration", "3", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.main(["--track", str(track), "--start", "999", "-o", str(out)]) == 1


# The comparison the paper makes, on runs trained by train.py: BSMamba2 against BS-RoFormer.
TRAINED_RUNS = (("BSMamba2", "configs/bsmamba2.py:tiny", "--config.seed=0"),
                ("BS-RoFormer", "configs/bsroformer.py:tiny", "--config.seed=0"))


@pytest.mark.slow
def test_compare_two_runs_trained_by_train_py(synthetic_root, tmp_path, capsys):
    """train.py writes two tiny runs; evaluate.py scores each run directory's raw weights and
    prints them side by side, each labelled and tied to its own step and weights."""
    import evaluate

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    runs = []
    for label, config_arg, seed in TRAINED_RUNS:
        workdir = tmp_path / label.replace(" ", "_")
        cmd = [sys.executable, str(REPO / "train.py"), f"--config={config_arg}",
               f"--workdir={workdir}", f"--config.data.root={synthetic_root}",
               "--config.data.segment_seconds=0.25", "--config.total_steps=2",
               "--config.ckpt_every=2", seed]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((label, workdir))
    config = _tiny_config(synthetic_root)
    out = evaluate.evaluate(config, evaluate.check_options(
        workdir=str(tmp_path / "eval_out"), checkpoints=[str(w) for _, w in runs],
        labels=[label for label, _ in runs], segment_seconds=1.0, sweep=["0.5", "1"],
        max_tracks=1, progress=False))
    assert list(out["summary"]) == [label for label, _ in runs]
    for (_, workdir), ident in zip(runs, out["models"].values(), strict=True):
        assert ident["source"] == str(workdir) and ident["step"] == 2
        assert ident["weights"] == "raw" and ident["key"].startswith("step2-raw-")
    keys = {ident["key"] for ident in out["models"].values()}
    assert len(keys) == 2  # two models, two sets of weights, two result folders
    text = capsys.readouterr().out
    for table in ("Table II:", "Table III:", "Table IV:"):
        block = text[text.index(table):].split("\n\n")[0]
        assert all(f"| {label} |" in block for label, _ in runs), block
    report = Path(out["report_dir"])
    assert (report / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [label for label, _ in runs]
    rows = list(csv.DictReader(open(report / "table2.csv")))
    assert [r["model"] for r in rows] == labels
    for r in rows:
        assert float(r["usdr"]) == pytest.approx(out["summary"][r["model"]]["usdr"], abs=1e-4)
    assert [r["model"] for r in csv.DictReader(open(report / "table3.csv"))] == labels
    sweep = json.loads((report / "sweep.json").read_text())
    assert list(sweep) == labels and all(set(v) == {"0.5", "1"} for v in sweep.values())
