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

from bsmamba2_jax import eval_io

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


def summarize(results: list[dict], model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The paper's aggregates (uSDR: mean over tracks, cSDR: median over tracks) plus statistics.

    Non-finite track scores (e.g. a track whose frames are all NaN) are left out of the statistics.
    `model` (an `eval_io.model_identity`) is kept in the summary so it names what was scored.
    """
    keys = list(SUMMARY_KEYS)
    keys += sorted({k for r in results for k in r if k.startswith("museval_")})  # --museval
    stats = {k: _stats([r.get(k) for r in results]) for k in keys}
    return {
        "model": dict(model) if model is not None else None,
        "tracks": len(results),
        "usdr": stats["usdr"]["mean"],  # paper: mean over tracks
        "csdr": stats["csdr"]["median"],  # paper: median over tracks of per-track medians
        "usdr_accompaniment": stats["usdr_accompaniment"]["mean"],
        "csdr_accompaniment": stats["csdr_accompaniment"]["median"],
        "leakage_db": stats["leakage_db"]["median"],
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
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


# ----------------------------------------------------------------------------- tables


def _cell(x: Any, width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{float(x):{width}.2f}"


def table2(summaries: Mapping[str, dict]) -> str:
    """Table II side by side: {label: summary} -> Markdown, one row per model."""
    lines = ["| Model | uSDR | cSDR | accomp. uSDR | accomp. cSDR | leakage (dB) | tracks |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, s in summaries.items():
        lines.append(f"| {label} | {_cell(s['usdr'])} | {_cell(s['csdr'])} | "
                     f"{_cell(s.get('usdr_accompaniment'))} | "
                     f"{_cell(s.get('csdr_accompaniment'))} | {_cell(s.get('leakage_db'))} | "
                     f"{s['tracks']} |")
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
    _write_csv(out_dir / "table2.csv", ["model", *SUMMARY_KEYS, "tracks"],
               [[label, *(_fmt(s.get(k)) for k in SUMMARY_KEYS), s["tracks"]]
                for label, s in summaries.items()])
    bins = list(next(iter(onsets.values())))
    _write_csv(out_dir / "table3.csv", ["model", *bins],
               [[label, *(_fmt(o[b]["usdr_mean"]) for b in bins)] for label, o in onsets.items()])
    eval_io.write_json(out_dir / "comparison.json",
                       {"models": identities, "table2": summaries, "table3": onsets}, indent=2)
    (out_dir / "tables.md").write_text(text + "\n")
