"""Evaluate one or several checkpoints: Table II (uSDR, cSDR, leakage), III (onsets), IV (sweep).

    python evaluate.py --config=configs/bsmamba2.py --workdir=DIR
        [--checkpoint=PATH [--label=NAME]] [--checkpoint=PATH2 --label=NAME2 ...]
        [--weights=raw|ema] [--dtype=checkpoint|float32|float16|bfloat16]
        [--split=test] [--segment_seconds=8] [--overlap=0] [--shifts=1] [--sweep=1,2,4,8,12,16]
        [--museval] [--write_audio] [--force] [--batch_size=0] [--max_tracks=0]
        [--noreport] [--report_excerpts=3] [--report_tracks=all|worst:N|best:N]
        [--report_audio=ogg|flac]

Each --checkpoint is a train.py workdir (its default step), a checkpoint step directory, a model
file (`python -m bsmamba2_jax.export`) or the authors' PyTorch checkpoint (sota_model.ckpt, ...;
`bsmamba2_jax.convert`); without one, --workdir itself. --label names it in the
tables (default: its folder or file name and step). The weights are the raw ones by default, as the
paper's numbers were made (the authors' evaluation loads the checkpoint's state_dict); --weights=ema
scores the moving average. The architecture comes from the checkpoint; --config gives the data
(--config.data.root; empty = the synthetic set of --workdir) and how to run (ssd_impl, attn_impl,
remat); --dtype sets the compute dtype (the authors test under float16 autocast).

Results go to DIR/eval/<split>/<model key>/seg<S>_ov<O>_shifts<N>/ (bsmamba2_jax/eval_io.py), one
folder per weights: a rerun reuses the tracks its own weights scored, never another checkpoint's
(--force scores them again). Tables II and III use --segment_seconds, which --sweep adds to its
lengths. With several checkpoints the side-by-side tables, and with --sweep one plot with a line
per model, go to DIR/eval/<split>/comparison/<labels>/.

The HTML report (bsmamba2_jax/html_report.py) goes to report/report.html beside the tables: in
the run folder for one checkpoint, in the comparison folder for several. Its excerpts are clips
of each estimate that scoring keeps (excerpts/<track>/ in the run folder): a stored result
without them (or with another --report_excerpts) is scored again.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/bsmamba2.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir; results go to WORKDIR/eval/.")
flags.DEFINE_multi_string("checkpoint", None, "Workdir, checkpoint step dir, exported model "
                          "file or the authors' PyTorch .ckpt; repeat to compare models "
                          "(default: --workdir).")
flags.DEFINE_multi_string("label", None, "Name of each --checkpoint in the tables, in order.")
flags.DEFINE_enum("weights", "raw", ["raw", "ema"], "Raw weights (the paper's) or the EMA ones.")
flags.DEFINE_enum("dtype", "checkpoint", ["checkpoint", "float32", "float16", "bfloat16"],
                  "Compute dtype of the model's matmuls (default: what the checkpoint says).")
flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Dataset split to evaluate.")
flags.DEFINE_float("segment_seconds", 8.0, "Inference segment length for Tables II and III "
                   "(paper: 8 s).")
flags.DEFINE_float("overlap", 0.0, "Segment overlap fraction in [0, 1) (paper: 0).")
flags.DEFINE_list("sweep", [], "Segment lengths in seconds for Table IV, e.g. 1,2,4,8,12,16.")
flags.DEFINE_integer("shifts", 1, "Shift test-time averaging copies (1 = off).")
flags.DEFINE_integer("batch_size", 0, "Segments per model call; 0 = 1 on a CPU, 8 on a GPU.")
flags.DEFINE_integer("max_tracks", 0, "Evaluate only the first N tracks (0 = all).")
flags.DEFINE_bool("museval", False, "Also run full museval (SDR/ISR/SIR/SAR) and store its JSON.")
flags.DEFINE_bool("write_audio", False, "Write vocals/accompaniment estimates as wav.")
flags.DEFINE_bool("force", False, "Score tracks again even when their results are stored.")
flags.DEFINE_bool("progress", True, "Show a progress bar over tracks.")
flags.DEFINE_bool("report", True, "Write report/report.html beside the tables: tables, a "
                  "sortable per-track table and audio excerpts with mel spectrograms.")
flags.DEFINE_integer("report_excerpts", 3, "Excerpts per track in the report: its longest "
                     "silent stretch and vocal onsets, 4 s each (0 = tables only).")
flags.DEFINE_string("report_tracks", "all", "Tracks with excerpts in the report: all, worst:N "
                    "or best:N by the first model's uSDR.")
flags.DEFINE_enum("report_audio", "ogg", ["ogg", "flac"], "Report audio: Ogg Vorbis (small) "
                  "or 16-bit FLAC (lossless).")

MAX_SEGMENT_SECONDS = 600.0  # longer segments only run out of memory
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+@()-]{0,39}$")


@dataclasses.dataclass(frozen=True)
class Options:
    """Validated command-line options (see the module docstring)."""

    workdir: Path
    checkpoints: tuple[str, ...]  # one or more sources of weights
    labels: tuple[str | None, ...]  # per checkpoint; None = derived from it
    weights: str = "raw"
    dtype: str | None = None  # None: the checkpoint's compute dtype
    split: str = "test"
    segment_seconds: float = 8.0
    sweep: tuple[float, ...] = ()
    overlap: float = 0.0
    shifts: int = 1
    batch_size: int = 0  # 0: inference.default_max_batch()
    max_tracks: int = 0
    museval: bool = False
    write_audio: bool = False
    force: bool = False
    progress: bool = True
    report: bool = True
    report_excerpts: int = 3  # clips per track; 0 = tables only
    report_tracks: Any = None  # html_report.Selection; None = all
    report_audio: str = "ogg"

    @property
    def lengths(self) -> tuple[float, ...]:
        """Segment lengths to score: the sweep's, and --segment_seconds for Tables II and III."""
        return tuple(sorted({*self.sweep, self.segment_seconds}))


def _seconds(flag: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SEGMENT_SECONDS):
        raise app.UsageError(f"--{flag}: {value!r} is not a segment length; give seconds in "
                             f"(0, {MAX_SEGMENT_SECONDS:g}] (the paper uses 8; its sweep is "
                             "1,2,4,8,12,16)")
    return seconds


def check_options(*, workdir: str | None, checkpoints: Sequence[str] | None = None,
                  labels: Sequence[str] | None = None, weights: str = "raw",
                  dtype: str = "checkpoint", split: str = "test", segment_seconds: Any = 8.0,
                  sweep: Sequence[str] = (), overlap: Any = 0.0, shifts: int = 1,
                  batch_size: int = 0, max_tracks: int = 0, museval: bool = False,
                  write_audio: bool = False, force: bool = False,
                  progress: bool = True, report: bool = True, report_excerpts: int = 3,
                  report_tracks: str = "all", report_audio: str = "ogg") -> Options:
    """Every flag checked before any data or model work; app.UsageError names the flag and range.

    `sweep` is the raw list of --sweep's comma-separated strings.
    """
    if not workdir:
        raise app.UsageError("--workdir is required (the training workdir; results go there)")
    if not checkpoints and not Path(workdir).is_dir():
        raise app.UsageError(f"--workdir={workdir}: no such folder; pass the training workdir, "
                             "or --checkpoint with the weights to score")
    checkpoints = tuple(checkpoints or (workdir,))
    for path in checkpoints:
        if not Path(path).exists():
            raise app.UsageError(f"--checkpoint={path}: no such file or folder; pass a train.py "
                                 "workdir, a checkpoint step directory or an exported model file")
    labels = tuple(labels or ())
    if labels and len(labels) != len(checkpoints):
        raise app.UsageError(f"--label: {len(labels)} labels for {len(checkpoints)} "
                             "checkpoints; give one --label per --checkpoint, in order, or none")
    for label in labels:
        if not LABEL_RE.match(label):
            raise app.UsageError(f"--label={label!r}: use 1-40 letters, digits, spaces or "
                                 "._+@()- starting with a letter or digit")
    if len(set(labels)) != len(labels):
        raise app.UsageError(f"--label: labels must differ, got {list(labels)}")
    if weights not in ("raw", "ema"):
        raise app.UsageError(f"--weights={weights!r}: choose raw (the paper's) or ema")
    if dtype not in ("checkpoint", "float32", "float16", "bfloat16"):
        raise app.UsageError(f"--dtype={dtype!r}: choose checkpoint, float32, float16 or bfloat16")
    if split not in ("train", "valid", "test"):
        raise app.UsageError(f"--split={split!r}: choose train, valid or test")
    seconds = _seconds("segment_seconds", segment_seconds)
    lengths = []
    for text in sweep:
        if not str(text).strip():
            raise app.UsageError(f"--sweep={','.join(sweep)}: an empty value; give segment "
                                 "lengths in seconds separated by commas, e.g. 1,2,4,8,12,16")
        lengths.append(_seconds("sweep", text))
    if len(set(lengths)) != len(lengths):
        raise app.UsageError(f"--sweep={','.join(sweep)}: a length is given twice")
    try:
        overlap_value = float(overlap)
    except (TypeError, ValueError):
        overlap_value = math.nan
    if not 0.0 <= overlap_value < 1.0:  # False for NaN too
        raise app.UsageError(f"--overlap={overlap!r}: give a fraction of a segment in [0, 1) "
                             "(the paper uses 0)")
    for flag, value, least in (("shifts", shifts, 1), ("batch_size", batch_size, 0),
                               ("max_tracks", max_tracks, 0), ("report_excerpts",
                                                               report_excerpts, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise app.UsageError(f"--{flag}={value!r}: give an integer >= {least}")
    from bsmamba2_jax import html_report

    try:
        selection = html_report.Selection.parse(report_tracks)
    except ValueError as e:
        raise app.UsageError(f"--report_tracks: {e}") from e
    if report_audio not in html_report.AUDIO_FORMATS:
        raise app.UsageError(f"--report_audio={report_audio!r}: choose "
                             f"{' or '.join(html_report.AUDIO_FORMATS)}")
    from bsmamba2_jax.write_guard import OutputPathError, check_output

    try:  # never over a checkpoint, never into a run's step directories (its eval/ is fine)
        check_output(Path(workdir) / "eval" / split, checkpoints, name="--workdir's results "
                     "folder", fix="pass the run itself as --workdir (results go to its eval/)")
    except OutputPathError as e:
        raise app.UsageError(str(e)) from e
    return Options(workdir=Path(workdir), checkpoints=checkpoints,
                   labels=labels or (None,) * len(checkpoints), weights=weights,
                   dtype=None if dtype == "checkpoint" else dtype, split=split,
                   segment_seconds=seconds, sweep=tuple(lengths), overlap=overlap_value,
                   shifts=shifts, batch_size=batch_size, max_tracks=max_tracks, museval=museval,
                   write_audio=write_audio, force=force, progress=progress, report=report,
                   report_excerpts=report_excerpts, report_tracks=selection,
                   report_audio=report_audio)


# ----------------------------------------------------------------------------- steps of a run


def dataset_tracks(config: Any, workdir: Path, split: str,
                   max_tracks: int = 0) -> tuple[Path, list]:
    """(root, tracks of `split`) from config.data.root, or from the workdir's synthetic set."""
    from bsmamba2_jax import data

    root = data.prepare_dataset_root(config, workdir)
    tracks = list(data.list_tracks(root, split))
    if not tracks:
        raise ValueError(f"No {split} tracks under {root}; check --config.data.root and --split")
    return root, tracks[:max_tracks] if max_tracks else tracks


@dataclasses.dataclass
class Candidate:
    """One model under evaluation."""

    label: str
    model: Any
    params: Any
    identity: dict  # bsmamba2_jax.eval_io.model_identity


def default_label(identity: dict) -> str:
    """A table label from the source: file stem, or run folder name, and @step."""
    source = Path(identity["source"])
    if source.is_file():
        base = source.stem
    elif source.name.isdigit() and source.parent.name in ("checkpoints", "best"):
        base = source.parent.parent.name  # WORKDIR/checkpoints/<step>
    else:
        base = source.name
    base = re.sub(r"[^A-Za-z0-9._+@()-]+", "-", base).strip("-") or "model"
    return base if identity["step"] is None else f"{base}@{identity['step']}"


def load_candidates(config: Any, opts: Options) -> list[Candidate]:
    """Loads every checkpoint and checks the segment lengths against each model."""
    from bsmamba2_jax import eval_io
    from bsmamba2_jax.loading import build_model, read_weights

    # How to run comes from --config and --dtype; what was trained from the checkpoint.
    overrides = {k: config.model[k] for k in ("ssd_impl", "attn_impl", "remat")
                 if k in config.model}
    if opts.dtype is not None:
        overrides["dtype"] = opts.dtype
    rate = int(config.data.sample_rate)
    out = []
    for path, label in zip(opts.checkpoints, opts.labels, strict=True):
        try:
            params, loaded = read_weights(path, opts.weights)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--checkpoint={path} (--weights={opts.weights}): {e}") from e
        if int(loaded.get("sample_rate", rate)) != rate:
            raise app.UsageError(f"--checkpoint={path} was trained at {loaded['sample_rate']} Hz "
                                 f"but --config.data.sample_rate is {rate}")
        model = build_model(loaded["model"], overrides)
        run_config = {**loaded["model"], **overrides}
        identity = eval_io.model_identity(params, loaded, run_config)
        minimum = int(model.n_fft) // 2 + 1  # the STFT's reflect padding needs more than n_fft/2
        for seconds in opts.lengths:
            if int(round(seconds * rate)) < minimum:
                flag = "segment_seconds" if seconds == opts.segment_seconds else "sweep"
                raise app.UsageError(f"--{flag}: {seconds:g} s is {int(round(seconds * rate))} "
                                     f"samples; the model {path} needs at least {minimum} "
                                     f"({minimum / rate:.3f} s)")
        out.append(Candidate(label or default_label(identity), model, params, identity))
    labels = [c.label for c in out]
    for i, c in enumerate(out):  # derived labels can collide: number them
        if labels.count(c.label) > 1:
            c.label = f"{c.label}#{i + 1}"
    return out


def score(candidate: Candidate, tracks: list, seconds: float, opts: Options, base: Path,
          rate: int, data_root: str) -> tuple[dict, dict, Path, list[dict]]:
    """One model at one segment length over the tracks -> (summary, onset table, folder,
    per-track results). The report's excerpts are kept at --segment_seconds only."""
    from bsmamba2_jax import eval_io, evaluation, inference, reports

    out_dir = base / candidate.identity["key"] / eval_io.run_tag(seconds, opts.overlap,
                                                                 opts.shifts)
    vocals_fn = evaluation.make_vocals_fn(
        candidate.model, candidate.params, segment_seconds=seconds, overlap=opts.overlap,
        batch_size=opts.batch_size or inference.default_max_batch(), shifts=opts.shifts,
        rate=rate)
    producer = {"model": candidate.identity,
                "settings": {"segment_seconds": seconds, "overlap": opts.overlap,
                             "shifts": opts.shifts, "sample_rate": rate, "data_root": data_root}}
    results = evaluation.evaluate_tracks(
        vocals_fn, tracks, out_dir, producer=producer, force=opts.force,
        save_audio=opts.write_audio, run_museval=opts.museval, rate=rate,
        compute_dtype=candidate.identity["model"].get("dtype"),
        desc=f"{candidate.label} {opts.split} {seconds:g}s", progress=opts.progress,
        excerpts=opts.report_excerpts if opts.report and seconds == opts.segment_seconds else 0)
    return (reports.summarize(results, candidate.identity), reports.onset_summary(results),
            out_dir, results)


def evaluate(config: Any, opts: Options) -> dict:
    """Scores every checkpoint at every length, prints and writes the tables.

    Returns {"models": {label: identity}, "summary": {label: Table II summary},
    "onset": {label: Table III}, "sweep": {label: {seconds: summary}} (with --sweep),
    "out_dirs": {label: {seconds: folder}}, "report_dir": folder of the sweep/comparison files,
    "report": the HTML report's page (unless --noreport)}.
    """
    from bsmamba2_jax import html_report, plots, reports

    try:
        root, tracks = dataset_tracks(config, opts.workdir, opts.split, opts.max_tracks)
    except ValueError as e:  # a missing or incomplete dataset, named by the data code
        raise app.UsageError(f"--config.data.root / --split: {e}") from e
    candidates = load_candidates(config, opts)
    rate = int(config.data.sample_rate)
    base = opts.workdir / "eval" / opts.split

    runs: dict[str, dict[float, tuple[dict, dict, Path, list[dict]]]] = {}
    for c in candidates:
        runs[c.label] = {s: score(c, tracks, s, opts, base, rate, str(root))
                         for s in opts.lengths}
    identities = {c.label: c.identity for c in candidates}
    summaries = {label: run[opts.segment_seconds][0] for label, run in runs.items()}
    onsets = {label: run[opts.segment_seconds][1] for label, run in runs.items()}

    head = (f"{opts.split}: {len(tracks)} tracks, {opts.segment_seconds:g} s segments, "
            f"overlap {opts.overlap:g}, shifts {opts.shifts}")
    parts = [head, "", reports.models_table(identities), "",
             "Table II: uSDR (mean over tracks), cSDR (median over tracks), vocals scored alone; "
             "leakage: median over tracks", reports.table2(summaries)]
    for label, summary in summaries.items():  # tracks to know about, and each score's count
        prefix = f"{label}: " if len(summaries) > 1 else ""
        parts += [f"Note: {prefix}{note}" for note in summary["notes"]]
    if len(candidates) == 1:
        parts += ["", reports.stats_table(next(iter(summaries.values())))]
    parts += ["", "Table III: uSDR of vocal-active stretches by length", reports.table3(onsets)]
    out = {"models": identities, "summary": summaries, "onset": onsets,
           "out_dirs": {label: {s: str(r[2]) for s, r in run.items()}
                        for label, run in runs.items()}}
    tag = f"ov{opts.overlap:g}_shifts{opts.shifts}"
    if len(candidates) == 1:
        report_dir = base / candidates[0].identity["key"]
        stem = report_dir / f"sweep_{tag}"
    else:
        names = "+".join(re.sub(r"[^A-Za-z0-9._@-]+", "-", label).strip("-") for label in runs)
        report_dir = base / "comparison" / names / f"seg{opts.segment_seconds:g}_{tag}"
        stem = report_dir / "sweep"
    sweeps, png = None, None
    if opts.sweep:
        sweeps = {label: {s: run[s][0] for s in opts.sweep} for label, run in runs.items()}
        reports.write_sweep(stem, sweeps)
        png = plots.plot_sweep(sweeps, stem.with_name(stem.name + ".png"),
                               title=f"{opts.split}, {len(tracks)} tracks")
        parts += ["", f"Table IV: input-length sweep ({png})", reports.table4(sweeps)]
        out["sweep"] = sweeps
    text = "\n".join(parts)
    if len(candidates) > 1:
        reports.write_comparison(report_dir, identities, summaries, onsets, text)
    out["report_dir"] = str(report_dir)
    print("\n" + text)
    for label, run in runs.items():
        print(f"{label}: results in {run[opts.segment_seconds][2]}")
    if opts.report:
        here = {label: run[opts.segment_seconds] for label, run in runs.items()}
        tables_dir = report_dir if len(candidates) > 1 else next(iter(here.values()))[2]
        page = html_report.write_report(
            tables_dir / "report", split=opts.split, settings={
                "segment_seconds": opts.segment_seconds, "overlap": opts.overlap,
                "shifts": opts.shifts, "sample_rate": rate, "data_root": str(root)},
            identities=identities, summaries=summaries, onsets=onsets,
            results={label: r[3] for label, r in here.items()},
            run_dirs={label: r[2] for label, r in here.items()}, tracks=tracks, sweeps=sweeps,
            sweep_png=png, selection=opts.report_tracks or html_report.Selection(),
            listen=opts.report_excerpts > 0,
            audio_format=opts.report_audio, rate=rate)
        size = sum(p.stat().st_size for p in page.parent.rglob("*") if p.is_file())
        print(f"report: {page} ({size / 2**20:.1f} MiB)")
        out["report"] = str(page)
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/bsmamba2.py")
    opts = check_options(
        workdir=FLAGS.workdir, checkpoints=FLAGS.checkpoint, labels=FLAGS.label,
        weights=FLAGS.weights, dtype=FLAGS.dtype, split=FLAGS.split,
        segment_seconds=FLAGS.segment_seconds, sweep=FLAGS.sweep, overlap=FLAGS.overlap,
        shifts=FLAGS.shifts, batch_size=FLAGS.batch_size, max_tracks=FLAGS.max_tracks,
        museval=FLAGS.museval, write_audio=FLAGS.write_audio, force=FLAGS.force,
        progress=FLAGS.progress, report=FLAGS.report, report_excerpts=FLAGS.report_excerpts,
        report_tracks=FLAGS.report_tracks, report_audio=FLAGS.report_audio)
    try:
        evaluate(FLAGS.config, opts)
    except ValueError as e:
        # A bad track file or a broken estimate: one message naming the file or track and the
        # fix; the traceback at --verbosity=1.
        logging.debug("Traceback", exc_info=True)
        logging.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    app.run(main)
