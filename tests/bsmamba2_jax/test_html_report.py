"""The HTML evaluation report: where its excerpts are, the clips evaluation keeps for it, the page
written by plain Python, and the page in headless Chromium for a tiny run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import eval_io, evaluation, excerpts, html_report
from bsmamba2_jax.data.musdb import SAMPLE_RATE

RATE = SAMPLE_RATE


def _vocals(seconds: float, phrases: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Noise phrases at [start, stop) seconds (never zero inside), exact zeros elsewhere."""
    rng = np.random.default_rng(seed)
    x = np.zeros((2, int(seconds * RATE)), np.float32)
    for a, b in phrases:
        i, j = round(a * RATE), round(b * RATE)
        x[:, i:j] = 0.2 * rng.standard_normal((2, j - i)) + 0.05
    return x


class Gain:
    """Stand-in model: vocal estimate = gain x mixture (a leaky one); counts calls."""

    def __init__(self, gain: float):
        self.gain, self.calls = gain, 0

    def __call__(self, mixture: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (self.gain * mixture).astype(np.float32)


def _producer(gain: float) -> dict:
    return {"model": {"key": f"gain{gain:g}", "params_sha256": f"{gain:g}", "source": "x"},
            "settings": {"segment_seconds": 8.0}}


@pytest.fixture(scope="module")
def test_tracks(synthetic_root):
    from bsmamba2_jax.data import list_tracks

    return list_tracks(synthetic_root, "test")


# ----------------------------------------------------------------------------- excerpts


def test_excerpts_are_the_silent_stretch_and_the_onsets_after_the_longest_silences():
    # 30 s: vocals at 3.2-6, 7-9 (1 s gap), 15.3-18 (6.3 s gap: holds silent 1 s frames 9-15),
    # 18.5-30 (0.5 s gap).
    phrases = [(3.2, 6.0), (7.0, 9.0), (15.3, 18.0), (18.5, 30.0)]
    vocals = _vocals(30.0, phrases)
    found = excerpts.onsets(vocals, RATE)
    assert [round(o.at / RATE, 1) for o in found] == [3.2, 7.0, 15.3, 18.5]
    assert [round(o.silence / RATE, 1) for o in found] == [3.2, 1.0, 6.3, 0.5]
    assert excerpts.silent_stretch(vocals, RATE) == (9 * RATE, 15 * RATE)
    length = 4 * RATE
    chosen = excerpts.choose(vocals, RATE, 3)
    assert [c.kind for c in chosen] == ["onset", "silence", "onset"]  # time order
    first, silence, second = chosen
    assert (silence.start, silence.stop, silence.at, silence.seconds) == (
        10 * RATE, 14 * RATE, 9 * RATE, 6.0)  # centred on the stretch
    # The onsets after the two longest silences (15.3 s after 6.3 s, 3.2 s after 3.2 s), each
    # 1.5 s of its 4 s clip in.
    assert (second.at, second.start) == (found[2].at, found[2].at - int(1.5 * RATE))
    assert (first.at, first.start, first.stop) == (found[0].at, found[0].at - int(1.5 * RATE),
                                                   found[0].at + int(2.5 * RATE))
    assert round(first.seconds, 1) == 3.2 and "vocal onset at 0:03.2" in first.describe(RATE)
    assert "silent reference vocals for 6 s from 0:09.0" in silence.describe(RATE)
    # More clips: the other onsets' clips (5.5-9.5 s, 17-21 s) overlap the chosen ones'.
    more = excerpts.choose(vocals, RATE, 5)
    assert [round(c.at / RATE, 1) for c in more if c.kind == "onset"] == [3.2, 15.3]
    assert all(0 <= c.start < c.stop <= vocals.shape[1] and c.stop - c.start == length
               for c in more)
    assert excerpts.choose(vocals, RATE, 0) == []
    assert [c.kind for c in excerpts.choose(vocals, RATE, 1)] == ["silence"]


def test_excerpts_of_tracks_without_silence_without_onsets_and_shorter_than_a_clip():
    always = _vocals(10.0, [(0.0, 10.0)])
    assert excerpts.choose(always, RATE, 3) == []  # vocals throughout: nothing to show
    gaps = _vocals(10.0, [(0.0, 4.0), (4.6, 10.0)])  # no silent 1 s frame, one onset
    (only,) = excerpts.choose(gaps, RATE, 3)
    assert only.kind == "onset" and only.at == 46 * 4410  # 100 ms frames
    silent = np.zeros((2, 3 * RATE), np.float32)
    (whole,) = excerpts.choose(silent, RATE, 3)
    assert (whole.kind, whole.start, whole.stop) == ("silence", 0, 3 * RATE)  # clip = track
    late = _vocals(2.5, [(2.0, 2.5)])
    assert [(c.kind, c.start, c.stop) for c in excerpts.choose(late, RATE, 2)] == [
        ("onset", 0, late.shape[1]), ("silence", 0, late.shape[1])]


def test_evaluation_keeps_the_clips_and_scores_again_without_them(test_tracks, tmp_path):
    sep = Gain(0.5)
    kw = dict(producer=_producer(0.5), progress=False)
    results = evaluation.evaluate_tracks(sep, test_tracks, tmp_path, excerpts=2, **kw)
    assert sep.calls == 2
    for track, r in zip(test_tracks, results, strict=True):
        audio = eval_io.load_track(track)
        folder = tmp_path / "excerpts" / r["name"]
        stored = excerpts.load(folder, 2)
        assert stored == excerpts.choose(audio["vocals"], RATE, 2) and stored
        for i, c in enumerate(stored):
            clip, rate = sf.read(str(excerpts.clip_file(folder, i)), always_2d=True)
            want = np.clip(0.5 * audio["mixture"][:, c.start:c.stop], -1, 1)
            assert rate == RATE and np.max(np.abs(clip.T - want)) <= 2 ** -15
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, excerpts=2, **kw)
    assert sep.calls == 2  # all stored: reused
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, **kw)
    assert sep.calls == 2  # no excerpts asked for: reused
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, excerpts=3, **kw)
    assert sep.calls == 4  # another count: separated again
    name = results[0]["name"]
    excerpts.clip_file(tmp_path / "excerpts" / name, 0).unlink()
    assert excerpts.load(tmp_path / "excerpts" / name, 3) is None
    evaluation.evaluate_tracks(sep, test_tracks, tmp_path, excerpts=3, **kw)
    assert sep.calls == 5  # one clip lost: that track again
    assert excerpts.load(tmp_path / "excerpts" / name, 3) is not None


# ----------------------------------------------------------------------------- the page


def _two_models(test_tracks, root: Path, gains=(0.3, 0.8), count: int = 3) -> dict:
    """Evaluates stand-in models on the test tracks; the write_report arguments for them."""
    from bsmamba2_jax import reports

    out = {"identities": {}, "summaries": {}, "onsets": {}, "results": {}, "run_dirs": {}}
    for gain in gains:
        label = f"gain {gain:g}"
        run = root / f"gain{gain:g}"
        results = evaluation.evaluate_tracks(Gain(gain), test_tracks, run, excerpts=count,
                                             producer=_producer(gain), progress=False)
        ident = {"key": f"gain{gain:g}", "source": str(run), "step": None, "weights": "raw",
                 "params_sha256": "0" * 64, "model": {"dtype": "float32"}}
        out["identities"][label] = ident
        out["summaries"][label] = reports.summarize(results, ident)
        out["onsets"][label] = reports.onset_summary(results)
        out["results"][label] = results
        out["run_dirs"][label] = run
    return out


def _sources(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_report_is_one_folder_with_every_clip_and_table(test_tracks, tmp_path):
    inputs = _two_models(test_tracks, tmp_path / "runs")
    folder = tmp_path / "report"
    page_path = html_report.write_report(
        folder, split="test", settings={"segment_seconds": 8.0}, tracks=test_tracks,
        audio_format="flac", **inputs)
    assert page_path == folder / "report.html"
    page = page_path.read_text()
    assert "http://" not in page and "https://" not in page and "//" not in "".join(
        _sources(page))
    for src in _sources(page):  # every asset is in the folder (anchors are in the page)
        if src.startswith("#"):
            assert f'id="{src[1:]}"' in page, src
        else:
            assert (folder / src).is_file() and (folder / src).resolve().is_relative_to(folder)
    for label, summary in inputs["summaries"].items():  # Table II
        assert f"<td>{label}</td><td class=num>{summary['usdr']:.2f}</td>" in page
    # The per-track table: one row per track, each model's uSDR as the sort value.
    table = page[page.index('id="tracks"'):].split("</table>")[0]
    rows = table.split("<tr>")[2:]
    assert len(rows) == len(test_tracks)
    for i, row in enumerate(rows):
        values = re.findall(r'data-value="([^"]*)"', row)
        first, second = (inputs["results"][label][i] for label in ("gain 0.3", "gain 0.8"))
        assert values[0] == first["name"] and float(values[3]) == first["usdr"]
        assert float(values[6]) == second["usdr"] != first["usdr"]
    # Players: per excerpt the mixture, the reference and both estimates, in that order.
    audio_srcs = re.findall(r'<audio controls preload="metadata" src="([^"]+)"', page)
    spans = [excerpts.load(tmp_path / "runs" / "gain0.3" / "excerpts" / eval_io.track_name(t))
             for t in test_tracks]
    assert len(audio_srcs) == 4 * sum(len(s) for s in spans) > 0
    audio = eval_io.load_track(test_tracks[0])
    first = spans[0][0]
    for k, want in enumerate([audio["mixture"], audio["vocals"], 0.3 * audio["mixture"],
                              0.8 * audio["mixture"]]):
        clip, rate = sf.read(str(folder / audio_srcs[k]), always_2d=True)
        assert audio_srcs[k].endswith(".flac") and rate == RATE
        assert np.max(np.abs(clip.T - np.clip(want[:, first.start:first.stop], -1, 1))) < 2e-4
    assert first.describe(RATE) in page


def test_report_of_the_worst_track_in_ogg_replaces_the_old_folder(test_tracks, tmp_path):
    inputs = _two_models(test_tracks, tmp_path / "runs", count=1)
    folder = tmp_path / "report"
    html_report.write_report(folder, split="test", settings={}, tracks=test_tracks,
                             audio_format="flac", **inputs)
    old = set(p.name for p in (folder / "media").iterdir())
    worst = min(inputs["results"]["gain 0.3"], key=lambda r: r["usdr"])["name"]
    page = html_report.write_report(
        folder, split="test", settings={}, tracks=test_tracks, audio_format="ogg",
        selection=html_report.Selection.parse("worst:1"), **inputs).read_text()
    media = set(p.name for p in (folder / "media").iterdir())
    assert not any(name.endswith(".flac") for name in media) and media != old  # replaced
    assert page.count('<section class="track"') == 1 and f"<h3>{worst}</h3>" in page
    for src in re.findall(r'<audio controls preload="metadata" src="([^"]+)"', page):
        info = sf.info(str(folder / src))
        assert (info.format, info.samplerate, info.channels) == ("OGG", RATE, 2)
        assert abs(info.duration - 4.0) < 0.01
    assert not list(tmp_path.glob(".report.*"))  # no temporary folder left


def test_report_without_excerpts_has_the_tables_and_says_why_there_is_no_audio(test_tracks,
                                                                               tmp_path):
    inputs = _two_models(test_tracks, tmp_path / "runs", count=0)  # nothing kept
    assert not (tmp_path / "runs" / "gain0.3" / "excerpts").exists()
    tables_only = html_report.write_report(tmp_path / "a", split="test", settings={},
                                           tracks=test_tracks, listen=False, **inputs)
    page = tables_only.read_text()
    assert "<audio" not in page and 'id="tracks"' in page and "Table III" in page
    assert "Excerpts of no track (0)" in " ".join(page.split())
    assert sorted(p.name for p in (tmp_path / "a" / "media").iterdir()) == ["scale.png"]
    asked = html_report.write_report(tmp_path / "b", split="test", settings={},
                                     tracks=test_tracks, **inputs).read_text()
    assert asked.count("No excerpt: no clips were stored for this track.") == len(test_tracks)


@pytest.mark.parametrize("text, want", [("all", ("all", 0)), ("worst:5", ("worst", 5)),
                                        ("best:1", ("best", 1))])
def test_track_selection_parses(text, want):
    s = html_report.Selection.parse(text)
    assert (s.order, s.count) == want
    names, usdr = ["a", "b", "c", "d"], {"a": 1.0, "b": None, "c": -3.0, "d": 7.0}
    assert html_report.Selection("worst", 3).pick(names, usdr) == ["c", "a", "d"]
    assert html_report.Selection("best", 4).pick(names, usdr) == ["d", "a", "c", "b"]


@pytest.mark.parametrize("flag, value, needle", [
    ("report_tracks", "worst", "give all, worst:N or best:N"),
    ("report_tracks", "best:0", "give all, worst:N or best:N"),
    ("report_excerpts", -1, "--report_excerpts=-1: give an integer >= 0"),
    ("report_audio", "mp3", "--report_audio='mp3': choose ogg or flac"),
])
def test_report_flags_are_checked_before_any_work(tmp_path, flag, value, needle):
    from absl import app

    import evaluate

    with pytest.raises(app.UsageError, match=re.escape(needle)):
        evaluate.check_options(workdir=str(tmp_path), **{flag: value})


# ----------------------------------------------------------------------------- in a browser


@pytest.mark.slow
def test_the_report_of_a_tiny_run_in_chromium(synthetic_root, browser, tmp_path):
    """evaluate.py scores two tiny models and writes the report; Chromium opens it from disk:
    no console error, every player's source decodes, every image loads, a header click sorts
    the per-track table. One model alone reuses the stored clips and writes its report in its
    run folder."""
    from selenium.webdriver.common.by import By

    import evaluate
    from tests import browser as chromium
    from tests.bsmamba2_jax.test_evaluation import _model_file, _tiny_config

    config = _tiny_config(synthetic_root)
    models = [str(_model_file(tmp_path / f"{name}.msgpack", seed))
              for name, seed in (("first", 21), ("second", 22))]
    out = evaluate.evaluate(config, evaluate.check_options(
        workdir=str(tmp_path / "run"), checkpoints=models, labels=["BSMamba2", "Other"],
        segment_seconds=2.0, sweep=["1", "2"], progress=False))
    page = Path(out["report"])
    assert page == Path(out["report_dir"]) / "report" / "report.html"
    html = page.read_text()
    assert "Table IV" in html and "media/sweep.png" in html

    browser.get(page.as_uri())
    players = browser.find_elements(By.TAG_NAME, "audio")
    assert len(players) == 2 * 2 * 4  # 2 tracks x 2 excerpts x (mixture, reference, 2 models)

    def durations():
        d = browser.execute_script(
            "return arguments[0].map(a => a.error ? -a.error.code : a.duration)", players)
        assert all(v is None or v >= 0 for v in d), f"a player failed to decode: {d}"
        return d if all(v and v > 0 for v in d) else None

    for duration in chromium.wait_for(durations, chromium.TIMEOUT, "every player's metadata"):
        assert abs(duration - 4.0) < 0.01
    widths = browser.execute_script("return Array.from(document.images).map(i => "
                                    "i.complete ? i.naturalWidth : -1)")
    assert len(widths) == 16 + 2 and min(widths) > 0  # the mel images, the scale, the plot
    table = browser.find_element(By.ID, "tracks")
    heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    column = heads.index("Other uSDR")

    def values() -> list[float]:
        return [float(td.get_attribute("data-value")) for td in table.find_elements(
            By.CSS_SELECTOR, f"tbody tr td:nth-child({column + 1})")]

    before = values()
    assert len(before) == 2 and before[0] != before[1]
    button = table.find_elements(By.CSS_SELECTOR, "thead th button")[column]
    button.click()
    assert values() == sorted(before)
    button.click()
    assert values() == sorted(before, reverse=True)
    names = [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody td:first-child")]
    assert sorted(names) == sorted(p.name for p in (synthetic_root / "test").iterdir()
                                   if p.is_dir())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000

    alone = evaluate.evaluate(config, evaluate.check_options(
        workdir=str(tmp_path / "run"), checkpoints=models[:1], segment_seconds=2.0,
        progress=False))
    (label,) = alone["out_dirs"]
    assert Path(alone["report"]) == Path(alone["out_dirs"][label][2.0]) / "report" / "report.html"
    assert Path(alone["report"]).read_text().count("<audio ") == 2 * 2 * 3
