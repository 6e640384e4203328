"""Evaluation over a split: per-track scores, the paper's tables, onset analysis, length sweep.

The model enters only as `separate_fn(mixture (2, n) float32) -> vocals (2, n)`, so every function
here is testable with stand-ins; `make_separator` builds one from a BSMamba2 and its params.

Output folder of one evaluation (`evaluate_tracks(..., out_dir)`):
    tracks/<name>.json          every score of the track, frame cSDRs, vocal stretches
    tracks/<name>.museval.json  full museval (SDR/ISR/SIR/SAR per frame) when asked
    audio/<name>/{vocals,accompaniment}.wav   estimates, when asked
    scores.csv                  one row per track (scalar scores)
    summary.json                Table II numbers (uSDR mean, cSDR median, mean/median/std of each)
    onset.json, onset.csv       Table III: uSDR of vocal-active stretches grouped by length
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax import metrics

SAMPLE_RATE = 44100
STEMS = ("mixture", "vocals", "drums", "bass", "other")
ONSET_BINS = ((1.0, 2.0), (2.0, 4.0), (4.0, 8.0))  # seconds, Table III's columns
SCALAR_KEYS = ("usdr", "csdr", "usdr_accompaniment", "csdr_accompaniment", "leakage_db",
               "silent_seconds", "seconds")

SeparateFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- tracks and audio


def track_name(track: Any) -> str:
    """Name of a track from `bsmamba2_jax.data.list_tracks` (or a folder path)."""
    if isinstance(track, (str, Path)):
        return Path(track).name
    return str(track.name)


def stem_path(track: Any, stem: str) -> Path:
    """Path of one stem's wav for a `bsmamba2_jax.data.Track` or a MUSDB18-HQ track folder."""
    if isinstance(track, (str, Path)):
        return Path(track) / f"{stem}.wav"
    paths = getattr(track, "paths", None)  # bsmamba2_jax.data.Track
    if isinstance(paths, Mapping) and stem in paths:
        return Path(paths[stem])
    raise ValueError(f"Track {track!r} has no {stem} file")


def read_audio(path: str | Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A wav at `rate` -> (channels, samples) float32; a clear error for wrong files."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != rate:
        raise ValueError(f"{path} is sampled at {sr} Hz; evaluation needs {rate} Hz "
                         "(resample the dataset, or use bsmamba2-separate which resamples)")
    return audio.T.copy()


def load_track(track: Any, rate: int = SAMPLE_RATE) -> dict[str, np.ndarray]:
    """mixture, vocals and accompaniment (drums + bass + other), each (2, samples) float32.

    The accompaniment reference is the sum of the other stems (as musdb's "accompaniment"); when a
    stem file is missing it falls back to mixture - vocals.
    """
    mixture = read_audio(stem_path(track, "mixture"), rate)
    vocals = read_audio(stem_path(track, "vocals"), rate)
    if vocals.shape != mixture.shape:
        raise ValueError(f"{track_name(track)}: vocals {vocals.shape} and mixture {mixture.shape} "
                         "differ in shape")
    try:
        accompaniment = sum(read_audio(stem_path(track, s), rate)
                            for s in ("drums", "bass", "other"))
    except (ValueError, RuntimeError, OSError):
        accompaniment = mixture - vocals
    return {"mixture": mixture, "vocals": vocals, "accompaniment": accompaniment}


def write_audio(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE,
                subtype: str = "FLOAT") -> None:
    """(channels, samples) -> wav/flac file (format from the suffix)."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(audio, dtype=np.float32).T, rate, subtype=subtype)


# ----------------------------------------------------------------------------- separation


def make_separator(model: Any, params: Any, *, segment_seconds: float = 8.0,
                   overlap: float = 0.0, batch_size: int = 4, shifts: int = 1,
                   rate: int = SAMPLE_RATE) -> SeparateFn:
    """A `separate_fn` around `bsmamba2_jax.inference.separate`.

    shifts > 1: test-time averaging over `shifts` copies of the input delayed by k/shifts of a
    segment (k = 0..shifts-1, zeros in front), so segment boundaries fall at different places;
    each output is moved back and the copies are averaged. Deterministic.
    """
    if shifts < 1:
        raise ValueError(f"shifts={shifts} must be >= 1 (1 = no shift averaging)")
    from bsmamba2_jax.inference import separate

    segment = int(round(segment_seconds * rate))

    def run(mixture: np.ndarray) -> np.ndarray:
        return np.asarray(separate(model, params, mixture, segment_seconds=segment_seconds,
                                   overlap=overlap, batch_size=batch_size, sample_rate=rate),
                          dtype=np.float32)

    def separate_fn(mixture: np.ndarray) -> np.ndarray:
        mixture = np.asarray(mixture, dtype=np.float32)
        if shifts == 1:
            return run(mixture)
        n = mixture.shape[-1]
        total = np.zeros(mixture.shape, np.float64)
        for k in range(shifts):
            offset = k * segment // shifts
            shifted = np.pad(mixture, ((0, 0), (offset, 0)))
            total += run(shifted)[:, offset:offset + n]
        return (total / shifts).astype(np.float32)

    return separate_fn


# ----------------------------------------------------------------------------- scores


def onset_stretch_scores(vocals: np.ndarray, estimate: np.ndarray, rate: int = SAMPLE_RATE,
                         bins: Sequence[tuple[float, float]] = ONSET_BINS) -> list[dict]:
    """uSDR of each vocal-active stretch whose length falls in one of `bins` (Table III).

    Stretches come from `metrics.active_stretches` on the reference vocals; a stretch of length d
    belongs to the bin with lo <= d < hi (the last bin includes hi).
    Returns: [{"start": s, "stop": s, "seconds": d, "bin": "1-2s", "usdr": dB}, ...].
    """
    out = []
    for a, b in metrics.active_stretches(vocals, rate):
        d = (b - a) / rate
        for i, (lo, hi) in enumerate(bins):
            if lo <= d < hi or (i == len(bins) - 1 and d == hi):
                out.append({"start": a / rate, "stop": b / rate, "seconds": d,
                            "bin": bin_label(lo, hi),
                            "usdr": metrics.usdr(vocals[:, a:b], estimate[:, a:b])})
                break
    return out


def bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}s"


def score_track(mixture: np.ndarray, vocals: np.ndarray, accompaniment: np.ndarray,
                estimate: np.ndarray, rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Every score of one track.

    Args:
      mixture, vocals, accompaniment, estimate: (2, samples); estimate = estimated vocals, the
        estimated accompaniment is mixture - estimate.
    Returns: dict with usdr, csdr (vocals; nanmedian of frames), the accompaniment's usdr/csdr,
      leakage_db (silent-region leakage), silent_seconds, seconds, csdr_frames (list, None = NaN)
      and onset (per-stretch uSDRs).
    """
    if estimate.shape != vocals.shape:
        raise ValueError(f"estimate {estimate.shape} must match the reference {vocals.shape}")
    est_acc = mixture - estimate
    frames = metrics.csdr_frames([vocals, accompaniment], [estimate, est_acc], rate)
    track_csdr = metrics.nanmedian(frames, axis=-1)
    leakage, silent = metrics.silent_leakage(vocals, estimate, mixture, rate)
    return {
        "usdr": metrics.usdr(vocals, estimate),
        "csdr": _json_float(track_csdr[0]),  # None when every frame is NaN (silent vocals)
        "usdr_accompaniment": metrics.usdr(accompaniment, est_acc),
        "csdr_accompaniment": _json_float(track_csdr[1]),
        "leakage_db": _json_float(leakage),  # None without vocal-silent frames
        "silent_seconds": silent * 1.0,
        "seconds": vocals.shape[-1] / rate,
        "csdr_frames": [_json_float(v) for v in frames[0]],
        "onset": onset_stretch_scores(vocals, estimate, rate),
    }


def museval_scores(mixture: np.ndarray, vocals: np.ndarray, accompaniment: np.ndarray,
                   estimate: np.ndarray, rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Full museval v4 (SDR, ISR, SIR, SAR per 1 s frame) for vocals and accompaniment."""
    import museval

    refs = np.stack([vocals, accompaniment]).transpose(0, 2, 1).astype(np.float64)
    ests = np.stack([estimate, mixture - estimate]).transpose(0, 2, 1).astype(np.float64)
    try:
        sdr, isr, sir, sar = museval.evaluate(refs, ests, win=rate, hop=rate)
    except ValueError as e:  # museval refuses a source that is silent over the whole track
        return {"error": str(e)}
    out: dict[str, Any] = {}
    for i, target in enumerate(("vocals", "accompaniment")):
        out[target] = {name: [_json_float(v) for v in values[i]]
                       for name, values in zip(("SDR", "ISR", "SIR", "SAR"),
                                               (sdr, isr, sir, sar), strict=True)}
        out[target]["median"] = {name: _json_float(metrics.nanmedian(values[i]))
                                 for name, values in zip(("SDR", "ISR", "SIR", "SAR"),
                                                         (sdr, isr, sir, sar), strict=True)}
    return out


def _json_float(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _from_json(x: Any) -> float:
    return float("nan") if x is None else float(x)


# ----------------------------------------------------------------------------- the loop


def evaluate_tracks(separate_fn: SeparateFn, tracks: Iterable[Any], out_dir: str | Path, *,
                    force: bool = False, save_audio: bool = False, run_museval: bool = False,
                    rate: int = SAMPLE_RATE, desc: str = "tracks",
                    progress: bool = True) -> list[dict]:
    """Separates and scores every track; skips tracks already scored unless `force`.

    Writes tracks/<name>.json per track as soon as it is scored (so an interrupted run resumes),
    then scores.csv, summary.json, onset.json and onset.csv over all tracks.
    Returns the per-track result dicts (with "name"), in track order.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / "tracks").mkdir(parents=True, exist_ok=True)
    tracks = list(tracks)
    if not tracks:
        raise ValueError("No tracks to evaluate: check the dataset root and the split")
    results = []
    bar = tqdm(tracks, desc=desc, unit="track", disable=not progress, dynamic_ncols=True)
    for track in bar:
        name = track_name(track)
        path = out_dir / "tracks" / f"{name}.json"
        museval_path = out_dir / "tracks" / f"{name}.museval.json"
        if path.exists() and not force and (not run_museval or museval_path.exists()):
            results.append(json.loads(path.read_text()))
            continue
        audio = load_track(track, rate)
        estimate = np.asarray(separate_fn(audio["mixture"]), dtype=np.float32)
        if estimate.shape != audio["mixture"].shape:
            raise ValueError(f"separate_fn returned {estimate.shape} for a mixture of shape "
                             f"{audio['mixture'].shape}; it must return the same shape")
        result = {"name": name, **score_track(audio["mixture"], audio["vocals"],
                                              audio["accompaniment"], estimate, rate)}
        if run_museval:
            full = museval_scores(audio["mixture"], audio["vocals"], audio["accompaniment"],
                                  estimate, rate)
            museval_path.write_text(json.dumps(full))
            if "vocals" in full:
                result.update({f"museval_{k.lower()}": v
                               for k, v in full["vocals"]["median"].items()})
        if save_audio:
            write_audio(out_dir / "audio" / name / "vocals.wav", estimate, rate)
            write_audio(out_dir / "audio" / name / "accompaniment.wav",
                        audio["mixture"] - estimate, rate)
        path.write_text(json.dumps(result))
        results.append(result)
        bar.set_postfix(usdr=f"{result['usdr']:.2f}", csdr=f"{_from_json(result['csdr']):.2f}")
    write_reports(results, out_dir)
    return results


def write_reports(results: list[dict], out_dir: str | Path) -> dict:
    """scores.csv, summary.json, onset.json/csv from per-track results; returns the summary."""
    out_dir = Path(out_dir)
    keys = ["name", *SCALAR_KEYS] + sorted({k for r in results for k in r
                                            if k.startswith("museval_")})
    with open(out_dir / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in results:
            writer.writerow([r.get(k, "") if k == "name" else _fmt(r.get(k)) for k in keys])
    summary = summarize(results)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    onset = onset_summary(results)
    (out_dir / "onset.json").write_text(json.dumps(onset, indent=2))
    with open(out_dir / "onset.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bin", "stretches", "tracks", "usdr_mean", "usdr_median", "usdr_std"])
        for label, s in onset.items():
            writer.writerow([label, s["stretches"], s["tracks"], _fmt(s["usdr_mean"]),
                             _fmt(s["usdr_median"]), _fmt(s["usdr_std"])])
    return summary


def _fmt(x: Any) -> str:
    if x is None:
        return "nan"
    return f"{float(x):.4f}"


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    v = np.asarray([_from_json(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "n": int(v.size)}


def summarize(results: list[dict]) -> dict[str, Any]:
    """The paper's aggregates (uSDR: mean over tracks, cSDR: median over tracks) plus statistics.

    Non-finite track scores (e.g. a track whose frames are all NaN) are left out of the statistics.
    """
    keys = ["usdr", "csdr", "usdr_accompaniment", "csdr_accompaniment", "leakage_db"]
    keys += sorted({k for r in results for k in r if k.startswith("museval_")})  # --museval
    stats = {k: _stats([r.get(k) for r in results]) for k in keys}
    return {
        "tracks": len(results),
        "usdr": stats["usdr"]["mean"],  # paper: mean over tracks
        "csdr": stats["csdr"]["median"],  # paper: median over tracks of per-track medians
        "stats": stats,
    }


def onset_summary(results: list[dict],
                  bins: Sequence[tuple[float, float]] = ONSET_BINS) -> dict[str, dict]:
    """Table III: per bin, uSDR over all vocal-active stretches of that length (all tracks)."""
    out = {}
    for lo, hi in bins:
        label = bin_label(lo, hi)
        values, names = [], set()
        for r in results:
            for s in r.get("onset", []):
                if s["bin"] == label:
                    values.append(s["usdr"])
                    names.add(r["name"])
        st = _stats(values)
        out[label] = {"stretches": st["n"], "tracks": len(names), "usdr_mean": st["mean"],
                      "usdr_median": st["median"], "usdr_std": st["std"]}
    return out


# ----------------------------------------------------------------------------- tables and plots


def _cell(x: Any, width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{float(x):{width}.2f}"


def format_summary(summary: dict, label: str = "BSMamba2") -> str:
    """Table II (uSDR mean, cSDR median) and the statistics behind it, as Markdown."""
    lines = ["| Model | uSDR | cSDR | leakage (dB) | tracks |", "|---|---:|---:|---:|---:|",
             f"| {label} | {_cell(summary['usdr'])} | {_cell(summary['csdr'])} | "
             f"{_cell(summary['stats']['leakage_db']['median'])} | {summary['tracks']} |", "",
             "| metric | mean | median | std | n |", "|---|---:|---:|---:|---:|"]
    for k, s in summary["stats"].items():
        lines.append(f"| {k} | {_cell(s['mean'])} | {_cell(s['median'])} | {_cell(s['std'])} | "
                     f"{s['n']} |")
    return "\n".join(lines)


def format_onset(onset: dict, label: str = "BSMamba2") -> str:
    """Table III: mean uSDR of vocal-active stretches per length bin (stretch counts below)."""
    head = " | ".join(onset)
    lines = [f"| Model | {head} |", "|---|" + "---:|" * len(onset),
             f"| {label} | " + " | ".join(_cell(s["usdr_mean"]) for s in onset.values()) + " |",
             "| stretches | " + " | ".join(f"{s['stretches']:>8d}" for s in onset.values()) + " |"]
    return "\n".join(lines)


def format_sweep(sweep: dict[float, dict], label: str = "BSMamba2") -> str:
    """Table IV: uSDR and cSDR per inference segment length."""
    lengths = list(sweep)
    lines = ["| Model | " + " | ".join(f"{s:g} s uSDR | {s:g} s cSDR" for s in lengths) + " |",
             "|---|" + "---:|---:|" * len(lengths),
             f"| {label} | " + " | ".join(f"{_cell(sweep[s]['usdr'])} | {_cell(sweep[s]['csdr'])}"
                                         for s in lengths) + " |"]
    return "\n".join(lines)


def plot_sweep(sweep: dict[float, dict], path: str | Path, label: str = "BSMamba2") -> Path:
    """Table IV as a figure: uSDR (mean) and cSDR (median) against input length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(sweep)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, name, marker in (("usdr", "uSDR (mean)", "o"), ("csdr", "cSDR (median)", "s")):
        ys = [np.nan if sweep[s][key] is None else sweep[s][key] for s in lengths]
        ax.plot(lengths, ys, marker=marker, label=f"{label} {name}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{s:g}" for s in lengths])
    ax.set_xlabel("inference segment length (s)")
    ax.set_ylabel("dB")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- whole runs


def dataset_tracks(config: Any, workdir: str | Path, split: str, max_tracks: int = 0) -> list:
    """Tracks of `split` from config.data.root, or from the workdir's synthetic set."""
    from bsmamba2_jax import data

    root = data.prepare_dataset_root(config, workdir)
    tracks = list(data.list_tracks(root, split))
    if not tracks:
        raise ValueError(f"No {split} tracks under {root}; check --config.data.root and --split")
    return tracks[:max_tracks] if max_tracks else tracks


def _tag(segment_seconds: float, overlap: float, shifts: int) -> str:
    return f"seg{segment_seconds:g}_ov{overlap:g}_shifts{shifts}"


def run(config: Any, workdir: str | Path, *, checkpoint: str | None = None, split: str = "test",
        segment_seconds: float = 8.0, overlap: float = 0.0, sweep: list[float] | None = None,
        shifts: int = 1, batch_size: int = 4, max_tracks: int = 0, run_museval: bool = False,
        write_audio: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Evaluates and prints the tables; returns {"summary", "onset", "out_dir"[, "sweep"]}."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap} must be in [0, 1)")
    workdir = Path(workdir)
    from bsmamba2_jax.loading import load_model

    # How to run comes from --config; what was trained (and its dtype) from the checkpoint.
    overrides = {k: config.model[k] for k in ("ssd_impl", "remat") if k in config.model}
    model, params, _ = load_model(checkpoint or workdir, overrides=overrides)
    tracks = dataset_tracks(config, workdir, split, max_tracks)
    rate = int(config.data.sample_rate)
    base = workdir / "eval" / split

    def one(seconds: float) -> tuple[dict, dict, Path]:
        out_dir = base / _tag(seconds, overlap, shifts)
        separate_fn = make_separator(
            model, params, segment_seconds=seconds, overlap=overlap, batch_size=batch_size,
            shifts=shifts, rate=rate)
        results = evaluate_tracks(
            separate_fn, tracks, out_dir, force=force, save_audio=write_audio,
            run_museval=run_museval, rate=rate, desc=f"{split} {seconds:g}s", progress=progress)
        return summarize(results), onset_summary(results), out_dir

    if not sweep:
        summary, onset, out_dir = one(segment_seconds)
        print(f"\n{split}: {summary['tracks']} tracks, {segment_seconds:g} s segments, "
              f"overlap {overlap:g}, shifts {shifts}  ->  {out_dir}")
        print(format_summary(summary))
        print("\nuSDR of vocal-active stretches by length (Table III):")
        print(format_onset(onset))
        return {"summary": summary, "onset": onset, "out_dir": str(out_dir)}

    table = {}
    for seconds in sweep:
        summary, onset, out_dir = one(float(seconds))
        table[float(seconds)] = {"usdr": summary["usdr"], "csdr": summary["csdr"],
                                 "out_dir": str(out_dir)}
    stem = base / f"sweep_ov{overlap:g}_shifts{shifts}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({f"{k:g}": v for k, v in table.items()}, indent=2))
    with open(f"{stem}.csv", "w") as f:
        f.write("segment_seconds,usdr,csdr\n")
        for k, v in table.items():
            f.write(f"{k:g},{_fmt(v['usdr'])},{_fmt(v['csdr'])}\n")
    png = plot_sweep(table, f"{stem}.png")
    print(f"\n{split}: input-length sweep (Table IV), {len(tracks)} tracks  ->  {png}")
    print(format_sweep(table))
    return {"sweep": table, "out_dir": str(base), "plot": str(png)}
