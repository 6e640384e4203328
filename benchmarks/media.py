"""What the audio and images cost: TensorBoard's example windows per validation, and the HTML
evaluation report's size per excerpt, extrapolated to the 50 MUSDB18-HQ test tracks.

    python benchmarks/media.py [--repeats 5] [--tracks 50] [--excerpts 3]

TensorBoard: `MetricWriter.write_examples` for config.tensorboard_examples = 4 windows of 4 s
(synthetic audio, the estimate a leaky one: vocals + 0.1 x accompaniment), seconds per
validation (median of --repeats, after one untimed call) and event-file bytes per validation.

Report: evaluation of 2 synthetic 30 s test tracks by that stand-in model and by the mixture
itself as an estimate (the worst case for size: a full mix in every estimate's player), then
`html_report.write_report` in Ogg Vorbis and FLAC; mean bytes of one player (audio + mel
image) by role, and the size for --tracks tracks x --excerpts clips with 1 and 2 models. White
noise (every band full, the most a clip can take) bounds a player from above.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsmamba2_jax import eval_io, evaluation, html_report, plots, reports  # noqa: E402
from bsmamba2_jax.data import list_tracks, synthetic  # noqa: E402
from bsmamba2_jax.train.validate import ExampleWindow  # noqa: E402
from bsmamba2_jax.train.writers import MetricWriter  # noqa: E402

RATE = 44100


def tensorboard_cost(folder: Path, repeats: int) -> tuple[float, float]:
    """(median seconds, bytes) per validation of 4 example windows of 4 s."""
    track = synthetic.synthesize_track(0, "train", 0, 8.0).stems
    accompaniment = sum(v for k, v in track.items() if k != "vocals")
    window = {"mixture": track["vocals"] + accompaniment, "vocals": track["vocals"],
              "estimate": track["vocals"] + 0.1 * accompaniment}
    examples = [ExampleWindow(i, RATE * i // 2, 4 * RATE, "window") for i in range(4)]
    audio = dict.fromkeys(range(4), window)
    writer = MetricWriter(folder, tensorboard=True)
    writer.write_examples(0, examples, audio)  # the mixture and reference, once
    events = lambda: sum(p.stat().st_size for p in (folder / "tensorboard").iterdir())
    before, times = events(), []
    for step in range(1, repeats + 1):
        t = time.perf_counter()
        writer.write_examples(step, examples, audio)
        times.append(time.perf_counter() - t)
    per_validation = (events() - before) / repeats
    writer.close()
    return statistics.median(times), per_validation


class Leaky:
    """Stand-in estimate: vocals + `leak` x accompaniment of the track whose mixture it gets."""

    def __init__(self, tracks, leak: float):
        self.estimates = {}
        for t in tracks:
            audio = eval_io.load_track(t)
            self.estimates[audio["mixture"].tobytes()] = (
                audio["vocals"] + leak * audio["accompaniment"])

    def __call__(self, mixture: np.ndarray) -> np.ndarray:
        return self.estimates[np.asarray(mixture, np.float32).tobytes()].astype(np.float32)


def report_sizes(folder: Path, count: int) -> dict[str, dict[str, float]]:
    """{format: {role: mean bytes of one player}} over the report's excerpts."""
    root = synthetic.generate_dataset(folder / "root", tracks=2, valid_tracks=1, test_tracks=2,
                                      seconds=30.0, seed=3)
    tracks = list_tracks(root, "test")
    inputs = {k: {} for k in ("identities", "summaries", "onsets", "results", "run_dirs")}
    for label, leak in (("leaky", 0.1), ("mixture", 1.0)):
        run = folder / label
        results = evaluation.evaluate_tracks(Leaky(tracks, leak), tracks, run, excerpts=count,
                                             producer={"model": {"key": label}}, progress=False)
        ident = {"key": label, "source": label, "step": None, "weights": "raw",
                 "params_sha256": "0" * 64, "model": {"dtype": "float32"}}
        inputs["identities"][label] = ident
        inputs["summaries"][label] = reports.summarize(results, ident)
        inputs["onsets"][label] = reports.onset_summary(results)
        inputs["results"][label] = results
        inputs["run_dirs"][label] = run
    out = {}
    for fmt, (suffix, *_) in html_report.AUDIO_FORMATS.items():
        page = html_report.write_report(folder / f"report_{fmt}", split="test", settings={},
                                        tracks=tracks, audio_format=fmt, **inputs)
        media = page.parent / html_report.MEDIA
        sizes = {}
        for role, k in (("mixture", 0), ("reference", 1), ("leaky estimate", 2),
                        ("mixture as estimate", 3)):
            players = [p.stat().st_size + p.with_suffix(".png").stat().st_size
                       for p in media.glob(f"t*-e*-{k}{suffix}")]
            sizes[role] = float(np.mean(players))
        sizes["page"] = float(page.stat().st_size)
        sizes["excerpts"] = len(list(media.glob(f"t*-e*-0{suffix}")))
        out[fmt] = sizes
    return out


def noise_player(folder: Path) -> dict[str, float]:
    """Bytes of one player of 4 s of stereo white noise at -10 dBFS, per format."""
    import soundfile as sf

    x = (0.3 * np.random.default_rng(0).standard_normal((2, 4 * RATE))).astype(np.float32)
    png = plots.write_png(folder / "noise.png",
                          plots.mel_images([x], RATE, **plots.PREVIEW_MEL)[0]).stat().st_size
    out = {}
    for fmt, (_, sf_format, subtype, kwargs) in html_report.AUDIO_FORMATS.items():
        buf = io.BytesIO()
        sf.write(buf, x.T, RATE, format=sf_format, subtype=subtype, **kwargs)
        out[fmt] = len(buf.getvalue()) + png
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tracks", type=int, default=50)
    parser.add_argument("--excerpts", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seconds, size = tensorboard_cost(tmp / "tb", args.repeats)
        print("| TensorBoard, 4 example windows of 4 s | seconds per validation | "
              "MB per validation |\n|---|---:|---:|")
        print(f"| write_examples | {seconds:.3f} | {size / 1e6:.2f} |\n")
        sizes = report_sizes(tmp / "report", args.excerpts)
        noise = noise_player(tmp)
        n = args.tracks * args.excerpts
        print(f"| report audio | mixture | reference | leaky estimate | mixture as estimate | "
              f"white noise | {n} excerpts, 1 model | 2 models | bound, 2 models |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fmt, s in sizes.items():
            fixed = s["mixture"] + s["reference"]
            one, two = fixed + s["leaky estimate"], fixed + s["leaky estimate"] + s[
                "mixture as estimate"]
            print(f"| {fmt} | {s['mixture'] / 1e3:.0f} kB | {s['reference'] / 1e3:.0f} kB | "
                  f"{s['leaky estimate'] / 1e3:.0f} kB | {s['mixture as estimate'] / 1e3:.0f} "
                  f"kB | {noise[fmt] / 1e3:.0f} kB | {n * one / 1e6:.0f} MB | "
                  f"{n * two / 1e6:.0f} MB | {n * 4 * noise[fmt] / 1e6:.0f} MB |")
        print(f"\n(per player: one 4 s stereo clip and its mel image; means over "
              f"{sizes['ogg']['excerpts']} excerpts of 2 synthetic tracks; the page itself "
              f"{sizes['ogg']['page'] / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
