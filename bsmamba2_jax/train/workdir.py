"""A run's workdir between launches: what a launch may change, and nothing it may destroy.

    plan = check_launch(workdir, config, restart=False)   # read-only; raises on a bad resume
    ...                                                  # build everything, restore the state
    record_config(workdir, config, plan, step)           # config.json / config.<step>.json
    drop_metrics_after(workdir, step)                    # records of steps that will be redone

A launch on a workdir that holds a run resumes it. Its config may differ from the run's only in
`config_check.RESUMABLE` fields; any other difference is an error naming the fields, and nothing
is written. The run's config is read from its config files and from the copy each checkpoint
step keeps, so a hand-edited config.json is reported as a config mismatch. A run whose
checkpoints are gone (deleted, or all moved aside as damaged) is an error too: a new start would
drop its metrics and mix its best steps with the new run's. `--restart` moves the old run into
WORKDIR/previous_runs/<time>/ (never deletes it) and starts a new one; the synthetic data set and
caches stay where they are. Empty folders (a launch stopped before its config was written) are
no run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections

from bsmamba2_jax.train import checkpoint as ckpt_lib
from bsmamba2_jax.train import config_check

METRICS_JSONL = "metrics.jsonl"
PREVIOUS_RUNS = "previous_runs"
# What belongs to one run (moved aside by --restart); derived data (synthetic/, jax_cache/, the
# activity index) is kept for the next run.
RUN_ITEMS = (ckpt_lib.CHECKPOINTS, ckpt_lib.BEST_LOSS, ckpt_lib.BEST_USDR, ckpt_lib.LEGACY_BEST,
             METRICS_JSONL, "tensorboard", "eval")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What a launch found. resume: a run is there to continue. changes: resumable fields that
    differ from the run's newest config ({field: (old, new)}). restart: move the run aside."""

    resume: bool
    changes: dict[str, tuple[Any, Any]]
    restart: bool = False


def _config_files(workdir: Path) -> list[Path]:
    """config.json then config.<step>[.<n>].json in the order they were written."""
    def order(p: Path) -> tuple[int, int]:
        parts = p.name.split(".")[1:-1]  # "config.120.2.json" -> ["120", "2"]
        nums = [int(x) for x in parts if x.isdigit()]
        return (nums + [0, 0])[0], (nums + [0, 0])[1]

    later = sorted((p for p in workdir.glob("config.*.json")
                    if all(x.isdigit() for x in p.name.split(".")[1:-1])), key=order)
    first = [workdir / ckpt_lib.CONFIG_JSON] if (workdir / ckpt_lib.CONFIG_JSON).is_file() else []
    return first + later


def _holds_something(path: Path) -> bool:
    """A non-empty file, or a folder with a non-empty file somewhere below it."""
    if path.is_file():
        return path.stat().st_size > 0
    return path.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in path.rglob("*"))


def run_items(workdir: Path) -> list[str]:
    """The names of the run's files that hold something: config files and RUN_ITEMS. Empty
    folders and files (what a launch stopped early leaves) are not part of a run."""
    return ([p.name for p in _config_files(workdir)]
            + [item for item in RUN_ITEMS if _holds_something(workdir / item)])


def _step_configs(workdir: Path) -> list[tuple[str, ml_collections.ConfigDict]]:
    """[("checkpoints/<step>", config)] of the resume steps, newest first; a step whose config
    copy cannot be read is left out (restoring it tells whether it is damaged)."""
    folder = workdir / ckpt_lib.CHECKPOINTS
    found = []
    for step in reversed(ckpt_lib.step_numbers(folder)):
        try:
            found.append((f"{ckpt_lib.CHECKPOINTS}/{step}",
                          ckpt_lib.step_config(folder / str(step))))
        except (OSError, ValueError, TypeError):
            continue
    return found


def _recorded_configs(workdir: Path) -> list[tuple[str, ml_collections.ConfigDict]]:
    """Where the run's config is recorded, newest first: (the newest config file's name, its
    config) if there is one, then each resume step's copy. Raises ValueError naming a config
    file that cannot be read."""
    files = _config_files(workdir)
    first = [(files[-1].name, ckpt_lib.read_config_json(files[-1]))] if files else []
    return first + _step_configs(workdir)


def run_config(workdir: str | Path) -> ml_collections.ConfigDict | None:
    """The config the run in `workdir` last ran with (its newest config file, else its newest
    checkpoint's copy); None if it holds no run config."""
    recorded = _recorded_configs(Path(workdir))
    return recorded[0][1] if recorded else None


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_path(workdir: Path) -> None:
    """ValueError when `workdir` is a file, lies under a file, or cannot be written (a
    read-only file system, no permission)."""
    try:
        existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    except OSError as e:  # e.g. a parent this user may not enter
        raise ValueError(f"--workdir={workdir} cannot be used ({e.strerror}: {e.filename}); "
                         "pass another --workdir") from None
    if existing == workdir and not workdir.is_dir():
        raise ValueError(f"--workdir={workdir} is a file; pass a folder")
    if not existing.is_dir():
        raise ValueError(f"--workdir={workdir} lies under {existing}, which is a file, not a "
                         "folder; pass a --workdir whose parents are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "--workdir" if existing == workdir else f"its parent {existing}"
        raise ValueError(f"--workdir={workdir}: {what} is not writable (read-only file system "
                         "or no permission); make it writable or pass another --workdir")


def _show_fields(bad: dict[str, list[tuple[Any, list[str]]]], new: dict[str, Any]) -> str:
    """One line per field and recorded value: '  model.dim: 32 (config.json, checkpoints/6)
    -> 64 (this launch)'."""
    return "\n".join(f"  {k}: {_show(old)} ({', '.join(labels)}) -> {_show(new[k])} "
                     "(this launch)" for k, olds in bad.items() for old, labels in olds)


def _check_compatible(workdir: Path, recorded: list[tuple[str, ml_collections.ConfigDict]],
                      config: ml_collections.ConfigDict) -> None:
    """ValueError naming each field a resume cannot change in which `config` differs from a
    recorded config of the run, with the values and where each is recorded."""
    bad: dict[str, list[tuple[Any, list[str]]]] = {}  # field -> [(recorded value, where)]
    new = {}
    for label, old in recorded:
        for k, (a, b) in config_check.incompatible(config_check.config_changes(old, config)
                                                   ).items():
            new[k] = b
            olds = bad.setdefault(k, [])
            match = next((o for o in olds if o[0] == a), None)
            if match:
                match[1].append(label)
            else:
                olds.append((a, [label]))
    if not bad:
        return
    note = ""
    files = [label for label, _ in recorded if not label.startswith(ckpt_lib.CHECKPOINTS)]
    steps = [label for label, _ in recorded if label.startswith(ckpt_lib.CHECKPOINTS)]
    if files and steps:
        disagree = config_check.incompatible(config_check.config_changes(recorded[0][1],
                                                                         recorded[1][1]))
        if disagree:
            note = (f"\n{files[0]} disagrees with the config saved in {steps[0]} in "
                    f"{', '.join(disagree)} (edited by hand?): the checkpoints' values are the "
                    f"ones their weights fit; restore {files[0]} (a copy of each step's config "
                    f"is in {workdir / steps[0] / 'config' / 'metadata'}).")
    raise ValueError(
        f"{workdir} holds a run whose config differs in fields a resume cannot change:\n"
        f"{_show_fields(bad, new)}{note}\nNothing was changed. To keep that run, pass another "
        f"--workdir (or --config.init_from={workdir} to start a new run from its weights); "
        f"to start over here, pass --restart (moves the old run into {workdir / PREVIOUS_RUNS}/, "
        "deletes nothing). Fields a resume may change: " + ", ".join(config_check.RESUMABLE))


def _last_metrics_step(workdir: Path) -> int | None:
    """The largest step of a parseable metrics.jsonl record; None without any."""
    path = workdir / METRICS_JSONL
    if not path.is_file():
        return None
    steps = [r["step"] for r in map(_record, path.read_bytes().split(b"\n"))
             if r is not None and isinstance(r.get("step"), int)]
    return max(steps, default=None)


def _check_nothing_lost(workdir: Path, configs: list[ml_collections.ConfigDict]) -> None:
    """For a run with no resume step: ValueError naming what a new start would lose or mix up.

    A run stopped before its first checkpoint (only records of the steps before it) starts
    over: replaying those steps writes the same records again. Anything else (steps moved aside
    as damaged, best steps, evaluation results, a config of a resume, records of steps at or
    after the first checkpoint) means checkpoints existed and are gone.
    """
    folder = workdir / ckpt_lib.CHECKPOINTS
    damaged = sorted((p.name for p in folder.glob("*.damaged-*")
                      if re.fullmatch(r"\d+\.damaged-\d+", p.name)),
                     key=lambda n: tuple(int(x) for x in n.split(".damaged-")))
    found = []
    if damaged:
        found.append(f"{ckpt_lib.CHECKPOINTS}/ holds only steps moved aside as unreadable "
                     f"({', '.join(damaged)})")
    elif not folder.is_dir():
        found.append(f"{ckpt_lib.CHECKPOINTS}/ is missing")
    else:
        found.append(f"{ckpt_lib.CHECKPOINTS}/ holds no step")
    best = {}
    for name in (ckpt_lib.BEST_USDR, ckpt_lib.BEST_LOSS, ckpt_lib.LEGACY_BEST):
        if steps := ckpt_lib.step_numbers(workdir / name):
            best[name] = steps
            found.append(f"{name}/ holds step{'s' * (len(steps) > 1)} "
                         f"{', '.join(map(str, steps))}")
    resumed = [p.name for p in _config_files(workdir) if p.name != ckpt_lib.CONFIG_JSON]
    if resumed:
        found.append(f"{', '.join(resumed)} (written by resumes)")
    evaluated = _holds_something(workdir / "eval")
    if evaluated:
        found.append("eval/ holds evaluation results")
    last = _last_metrics_step(workdir)
    first_checkpoint = min(min(c.get("ckpt_every", 1), c.get("total_steps", 1))
                           for c in configs)
    if last is not None:
        found.append(f"{METRICS_JSONL} runs to step {last}")
    if not (damaged or best or resumed or evaluated
            or (last is not None and last >= first_checkpoint)):
        return
    ways = []
    if damaged:
        back = damaged[-1].split(".damaged-")[0]
        ways.append(f"move a damaged step back to retry it (mv {folder / damaged[-1]} "
                    f"{folder / back})")
    ways.append(f"pass --restart (moves this run into {workdir / PREVIOUS_RUNS}/ and starts "
                "over; deletes nothing)")
    other = "pass another --workdir"
    if best:
        other += f" (with --config.init_from={workdir} to start from its best weights)"
    ways.append(other)
    raise ValueError(
        f"{workdir} holds a run but no checkpoint to resume it from: {'; '.join(found)}. "
        "Starting again at step 0 here would drop its metrics and mix its best steps with a "
        "new run's, so nothing was changed. Either " + "; or ".join(ways))


def check_launch(workdir: str | Path, config: ml_collections.ConfigDict,
                 restart: bool = False) -> LaunchPlan:
    """Decides what a launch does with `workdir`, writing nothing.

    Raises ValueError, naming the file or flag and the ways out, when the workdir path is
    unusable (a file, under a file, read-only), when a config file of the run cannot be read,
    when the run's config (its files or a checkpoint's copy) differs from `config` in a field a
    resume cannot take, or when the run has no checkpoint to resume but left results a new
    start would lose.
    """
    workdir = Path(workdir)
    _check_path(workdir)
    if not workdir.is_dir() or not run_items(workdir):
        return LaunchPlan(resume=False, changes={})
    if restart:
        return LaunchPlan(resume=False, changes={}, restart=True)
    recorded = _recorded_configs(workdir)
    if not recorded:  # run items but no config anywhere (e.g. only metrics.jsonl)
        raise ValueError(f"{workdir} holds files of a run ({', '.join(run_items(workdir))}) "
                         f"but no {ckpt_lib.CONFIG_JSON} and no checkpoint: cannot tell whether "
                         "this config may continue it. Use another --workdir, or --restart to "
                         f"move those files into {workdir / PREVIOUS_RUNS}/ and start over")
    _check_compatible(workdir, recorded, config)
    if not ckpt_lib.step_numbers(workdir / ckpt_lib.CHECKPOINTS):
        _check_nothing_lost(workdir, [c for _, c in recorded])
    return LaunchPlan(resume=True, changes=config_check.config_changes(recorded[0][1], config))


def move_run_aside(workdir: str | Path) -> Path:
    """Moves the run's files (RUN_ITEMS and config files) into previous_runs/<time>/."""
    workdir = Path(workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = workdir / PREVIOUS_RUNS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = workdir / PREVIOUS_RUNS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for item in [*RUN_ITEMS, *(p.name for p in _config_files(workdir))]:
        if (workdir / item).exists():
            (workdir / item).rename(dest / item)
    logging.warning("--restart: moved the previous run of %s into %s", workdir, dest)
    return dest


def _write_atomic(path: Path, data: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def record_config(workdir: str | Path, config: ml_collections.ConfigDict, plan: LaunchPlan,
                  step: int) -> Path | None:
    """Writes the launch's config: config.json for a new run; config.<step>.json beside the
    old ones when a resume changed resumable fields (never over an existing file). Returns the
    file written, or None."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        path = workdir / ckpt_lib.CONFIG_JSON
    elif plan.changes:
        path, n = workdir / f"config.{step}.json", 1
        while path.exists():
            n += 1
            path = workdir / f"config.{step}.{n}.json"
        logging.info("Config changed on resume at step %d: %s (saved as %s)", step,
                     ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in
                               plan.changes.items()), path.name)
    else:
        return None
    _write_atomic(path, config.to_json(indent=2))
    return path


_UNPARSED = object()


def _parse(line: bytes) -> object:
    """The JSON value of a line; _UNPARSED if it is not JSON (cut short, not UTF-8, ...)."""
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return _UNPARSED


def _record(line: bytes) -> dict | None:
    """A metrics.jsonl line as its record; None if it is no JSON object."""
    record = _parse(line)
    return record if isinstance(record, dict) else None


def drop_metrics_after(workdir: str | Path, step: int) -> int:
    """Removes metrics.jsonl records of steps after `step` (they will be logged again).

    A last line that does not parse (a kill mid-write) is dropped too; a complete last record
    without its newline (an editor strips it) is kept and gets the newline back, so the next
    record starts on a line of its own. Other lines that do not parse are kept as they are.
    Returns the records removed.
    """
    path = Path(workdir) / METRICS_JSONL
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    partial = bool(tail) and _parse(tail) is _UNPARSED
    if tail and not partial:
        lines.append(tail)

    def replayed(line: bytes) -> bool:
        record = _record(line)
        return record is not None and isinstance(record.get("step"), int) and \
            record["step"] > step

    kept = [line for line in lines if not replayed(line)]
    dropped = len(lines) - len(kept) + partial
    text = b"".join(line + b"\n" for line in kept)
    if text != data:
        _write_atomic(path, text)
    if dropped:
        logging.info("metrics.jsonl: dropped %d record(s) after step %d (those steps run again)",
                     dropped, step)
    return dropped
