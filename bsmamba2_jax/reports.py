"""The paper's tables from per-track results: aggregates, Markdown tables, CSV/JSON reports.

Aggregates as the paper (and the authors' `src/evaluate.py`): uSDR is the mean over tracks, cSDR
the median over tracks of each track's nanmedian frame SDR. Every table takes one or several
models as `{label: ...}`, so one model and a side-by-side comparison print the same way:

    Table II   uSDR, cSDR (vocals), the accompaniment's, silent-region leakage
    Table III  uSDR of vocal-active stretches of 1-2 / 2-4 / 4-8 s (onsets)
    Table IV   uSDR and cSDR against the inference segment length (input-length sweep)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax import eval_io, metrics

ONSET_BINS = ((1.0, 2.0), (2.0, 4.0), (4.0, 8.0))  # seconds, Table III's columns
SCALAR_KEYS = ("usdr", "csdr", "usdr_accompaniment", "csdr_accompaniment", "leakage_db",
               "silent_seconds", "seconds")
SUMMARY_KEYS = ("usdr", "csdr", "usdr_accompaniment", "csdr_accompaniment", "leakage_db")


def bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}s"


def from_json(x: Any) -> float:
    """A stored score as a float: None (undefined) -> NaN, "inf" / "-inf" -> +-inf."""
    return float("nan") if x is None else float(x)


def _fmt(x: Any) -> str:
    return "nan" if x is None else f"{float(x):.4f}"


def _stats(values: Sequence[Any]) -> dict[str, float | int | None]:
    v = np.asarray([from_json(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "n": int(v.size)}


# ----------------------------------------------------------------------------- aggregates

LABELS = {"usdr": "uSDR", "csdr": "cSDR", "usdr_accompaniment": "accomp. uSDR",
          "csdr_accompaniment": "accomp. cSDR", "leakage_db": "leakage"}


def _silence_flag(key: str) -> str | None:
    """The per-track flag that marks `key`'s reference silent (evaluation.score_track).

    A track whose reference is silent is left out of that score's aggregate: museval refuses a
    silent reference (`bss_eval` raises, so the authors' evaluation, which scores every track
    with it, cannot score such a track at all), and the uSDR of one, defined only by its 1e-7
    regulariser, measures the estimate's energy alone (about -89 dB for a typical leak), which
    would swamp a mean over tracks. Leakage is measured where the reference vocals are silent, so
    such a track counts there.
    """
    if key in ("usdr", "csdr") or key.startswith("museval_"):
        return "vocals_silent"
    if key in ("usdr_accompaniment", "csdr_accompaniment"):
        return "accompaniment_silent"
    return None


def _undefined_reason(key: str, value: float) -> str:
    if key == "leakage_db":
        return "no second with silent reference vocals" if np.isnan(value) else "infinite"
    if np.isnan(value):
        return "undefined: the reference or the estimate is silent in every 1 s frame"
    return "infinite: the estimate is exact"


def counted_tracks(results: Sequence[dict], key: str) -> tuple[list[float], dict[str, str]]:
    """The values `key`'s aggregate is computed over, and {track name: why} for the others."""
    flag = _silence_flag(key)
    values, left_out = [], {}
    for r in results:
        name = str(r.get("name", "?"))
        value = from_json(r.get(key))
        if flag and r.get(flag):
            left_out[name] = f"silent reference {flag.split('_')[0]}"
        elif not np.isfinite(value):
            left_out[name] = _undefined_reason(key, value)
        else:
            values.append(value)
    return values, left_out


def summarize(results: list[dict], model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The paper's aggregates (uSDR: mean over tracks, cSDR: median over tracks) plus statistics.

    Each score is aggregated over the tracks where it is defined: tracks whose reference is silent
    (see `_silence_flag`) and non-finite track scores (a track whose frames are all NaN) are left
    out, and `stats[key]["n"]` / `left_out[key]` say which tracks each score counts. `checks`
    names the tracks with a silent reference or a mixture that is not the sum of its stems, and
    `notes` says all of it in sentences. `model` (an `eval_io.model_identity`) is kept in the
    summary so it names what was scored.
    """
    keys = list(SUMMARY_KEYS)
    keys += sorted({k for r in results for k in r if k.startswith("museval_")})  # --museval
    stats, left_out = {}, {}
    for k in keys:
        values, out = counted_tracks(results, k)
        stats[k] = _stats(values)
        if out:
            left_out[k] = out
    checks = {
        "silent_vocals": [r["name"] for r in results if r.get("vocals_silent")],
        "silent_accompaniment": [r["name"] for r in results if r.get("accompaniment_silent")],
        "mixture_mismatch": {r["name"]: r.get("mixture_residual_db") for r in results
                             if r.get("mixture_mismatch")},
    }
    summary = {
        "model": dict(model) if model is not None else None,
        "tracks": len(results),
        "usdr": stats["usdr"]["mean"],  # paper: mean over tracks
        "csdr": stats["csdr"]["median"],  # paper: median over tracks of per-track medians
        "usdr_accompaniment": stats["usdr_accompaniment"]["mean"],
        "csdr_accompaniment": stats["csdr_accompaniment"]["median"],
        "leakage_db": stats["leakage_db"]["median"],
        "stats": stats,
        "left_out": left_out,
        "checks": checks,
    }
    summary["notes"] = check_notes(summary, results)
    return summary


def _db(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2f}"


def _names(names: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def check_notes(summary: Mapping[str, Any], results: Sequence[dict]) -> list[str]:
    """Sentences naming the tracks a reader of the tables must know about, and each score's count.

    Empty when every track is fine and every score counts every track.
    """
    notes = []
    usdr = {r.get("name"): r.get("usdr") for r in results}
    tracks, checks = summary["tracks"], summary["checks"]
    silent = checks["silent_vocals"]
    if silent:
        scored = ", ".join(f"{n!r} (uSDR {_db(usdr[n])} dB)" for n in silent[:8])
        notes.append(
            f"Silent reference vocals (every 1 s frame at or below {metrics.SILENCE_DB:g} dBFS) "
            f"in {len(silent)} of {tracks} track(s): {scored}{' ...' if len(silent) > 8 else ''}."
            " uSDR and cSDR leave them out: museval refuses a silent reference (the authors' "
            "evaluation stops on one) and its uSDR, set by the 1e-7 regulariser, measures only "
            "the estimate's energy; the leakage column counts them, scores.csv keeps their "
            "scores; if the track should have vocals, check its vocals.wav.")
    silent = checks["silent_accompaniment"]
    if silent:
        notes.append(
            f"Silent reference accompaniment (drums + bass + other) in {len(silent)} of {tracks} "
            f"track(s): {_names(silent)}. The accompaniment columns leave them out, as above.")
    mismatch = checks["mixture_mismatch"]
    if mismatch:
        listed = ", ".join(f"{n!r} ({_db(db)} dB)" for n, db in
                           list(mismatch.items())[:8])
        notes.append(
            f"mixture.wav is not the sum of the stems in {len(mismatch)} of {tracks} track(s): "
            f"{listed}{' ...' if len(mismatch) > 8 else ''} (the residual's energy relative to "
            f"the mixture's; tolerance {eval_io.MIXTURE_TOLERANCE_DB:g} dB, where a MUSDB18-HQ "
            "track differs only by the 16-bit rounding of its files, 50 dB or more below). Their "
            "scores separate a mixture the references do not make and are counted as they are: "
            "replace the track's files with a matching set and score again with --force.")
    for key, out in summary["left_out"].items():
        n = summary["stats"][key]["n"]
        notes.append(f"{LABELS.get(key, key)} over {n} of {tracks} track(s); left out: "
                     + "; ".join(f"{name!r} ({why})" for name, why in list(out.items())[:8])
                     + (" ..." if len(out) > 8 else ""))
    return notes


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


def write_run_reports(results: list[dict], out_dir: str | Path,
                      model: Mapping[str, Any] | None = None) -> dict:
    """scores.csv, summary.json, onset.json/csv of one run; returns the summary."""
    out_dir = Path(out_dir)
    keys = ["name", *SCALAR_KEYS] + sorted({k for r in results for k in r
                                            if k.startswith("museval_")})
    _write_csv(out_dir / "scores.csv", keys,
               [[r.get("name", "")] + [_fmt(r.get(k)) for k in keys[1:]] for r in results])
    summary = summarize(results, model)
    eval_io.write_json(out_dir / "summary.json", summary, indent=2)
    onset = onset_summary(results)
    eval_io.write_json(out_dir / "onset.json", onset, indent=2)
    _write_csv(out_dir / "onset.csv",
               ["bin", "stretches", "tracks", "usdr_mean", "usdr_median", "usdr_std"],
               [[label, s["stretches"], s["tracks"], _fmt(s["usdr_mean"]), _fmt(s["usdr_median"]),
                 _fmt(s["usdr_std"])] for label, s in onset.items()])
    return summary


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    eval_io.write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- tables


def _cell(x: Any, width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{float(x):{width}.2f}"


def track_counts(summary: Mapping[str, Any]) -> str:
    """Table II's tracks cell: the tracks scored, and each score's count where it differs."""
    stats = summary.get("stats", {})
    differ = [f"{LABELS[k]} {stats[k]['n']}" for k in SUMMARY_KEYS
              if k in stats and stats[k]["n"] != summary["tracks"]]
    return f"{summary['tracks']}" + (f" ({', '.join(differ)})" if differ else "")


def table2(summaries: Mapping[str, dict]) -> str:
    """Table II side by side: {label: summary} -> Markdown, one row per model.

    The tracks column counts the tracks scored and, in brackets, each score that was computed
    over fewer (see `summarize` and the summary's notes).
    """
    lines = ["| Model | uSDR | cSDR | accomp. uSDR | accomp. cSDR | leakage (dB) | tracks |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, s in summaries.items():
        lines.append(f"| {label} | {_cell(s['usdr'])} | {_cell(s['csdr'])} | "
                     f"{_cell(s.get('usdr_accompaniment'))} | "
                     f"{_cell(s.get('csdr_accompaniment'))} | {_cell(s.get('leakage_db'))} | "
                     f"{track_counts(s)} |")
    return "\n".join(lines)


def stats_table(summary: dict) -> str:
    """mean / median / std / n of every per-track score of one model."""
    lines = ["| metric | mean | median | std | n |", "|---|---:|---:|---:|---:|"]
    for k, s in summary["stats"].items():
        lines.append(f"| {k} | {_cell(s['mean'])} | {_cell(s['median'])} | {_cell(s['std'])} | "
                     f"{s['n']} |")
    return "\n".join(lines)


def table3(onsets: Mapping[str, dict]) -> str:
    """Table III side by side: {label: onset_summary} -> mean uSDR per stretch-length bin.

    The last row counts the stretches (they depend on the reference vocals only).
    """
    bins = list(next(iter(onsets.values())))
    lines = ["| Model | " + " | ".join(bins) + " |", "|---|" + "---:|" * len(bins)]
    for label, onset in onsets.items():
        lines.append(f"| {label} | " + " | ".join(_cell(onset[b]["usdr_mean"]) for b in bins)
                     + " |")
    first = next(iter(onsets.values()))
    lines.append("| stretches | " + " | ".join(f"{first[b]['stretches']:>8d}" for b in bins)
                 + " |")
    return "\n".join(lines)


def table4(sweeps: Mapping[str, Mapping[float, dict]]) -> str:
    """Table IV side by side: {label: {segment seconds: summary}} -> uSDR and cSDR per length."""
    lengths = sorted({s for sweep in sweeps.values() for s in sweep})
    lines = ["| Model | " + " | ".join(f"{s:g} s uSDR | {s:g} s cSDR" for s in lengths) + " |",
             "|---|" + "---:|---:|" * len(lengths)]
    for label, sweep in sweeps.items():
        cells = [f"{_cell(sweep[s]['usdr'])} | {_cell(sweep[s]['csdr'])}" if s in sweep
                 else f"{_cell(None)} | {_cell(None)}" for s in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def models_table(identities: Mapping[str, Mapping[str, Any]]) -> str:
    """Which weights each label stands for."""
    lines = ["| Model | checkpoint | step | weights | dtype | params sha256 |",
             "|---|---|---:|---|---|---|"]
    for label, ident in identities.items():
        step = "-" if ident.get("step") is None else ident["step"]
        lines.append(f"| {label} | {ident['source']} | {step} | {ident['weights']} | "
                     f"{ident['model'].get('dtype')} | {ident['params_sha256'][:12]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report files


def write_sweep(path_stem: str | Path, sweeps: Mapping[str, Mapping[float, dict]]) -> None:
    """<stem>.json {label: {seconds: {usdr, csdr}}} and <stem>.csv (model, seconds, usdr, csdr)."""
    stem = Path(path_stem)
    table = {label: {f"{s:g}": {"usdr": v["usdr"], "csdr": v["csdr"]}
                     for s, v in sorted(sweep.items())} for label, sweep in sweeps.items()}
    eval_io.write_json(stem.with_name(stem.name + ".json"), table, indent=2)
    _write_csv(stem.with_name(stem.name + ".csv"), ["model", "segment_seconds", "usdr", "csdr"],
               [[label, f"{s:g}", _fmt(v["usdr"]), _fmt(v["csdr"])]
                for label, sweep in sweeps.items() for s, v in sorted(sweep.items())])


def write_comparison(out_dir: str | Path, identities: Mapping[str, Mapping[str, Any]],
                     summaries: Mapping[str, dict], onsets: Mapping[str, dict],
                     text: str) -> None:
    """Side-by-side Table II and III as CSV, everything as comparison.json, the text as tables.md.

    Args:
      identities, summaries, onsets: {label: ...} for every model, in table order.
      text: the printed tables (Markdown).
    """
    out_dir = Path(out_dir)
    _write_csv(out_dir / "table2.csv",
               ["model", *SUMMARY_KEYS, "tracks", *(f"tracks_{k}" for k in SUMMARY_KEYS)],
               [[label, *(_fmt(s.get(k)) for k in SUMMARY_KEYS), s["tracks"],
                 *(s["stats"][k]["n"] for k in SUMMARY_KEYS)] for label, s in summaries.items()])
    bins = list(next(iter(onsets.values())))
    _write_csv(out_dir / "table3.csv", ["model", *bins],
               [[label, *(_fmt(o[b]["usdr_mean"]) for b in bins)] for label, o in onsets.items()])
    eval_io.write_json(out_dir / "comparison.json",
                       {"models": identities, "table2": summaries, "table3": onsets}, indent=2)
    eval_io.write_text(out_dir / "tables.md", text + "\n")
