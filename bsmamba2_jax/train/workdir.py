"""A run's workdir between launches: what a launch may change, and nothing it may destroy.

    plan = check_launch(workdir, config, restart=False)   # read-only; raises on a bad resume
    ...                                                  # build everything, restore the state
    record_config(workdir, config, plan, step)           # config.json / config.<step>.json
    drop_metrics_after(workdir, step)                    # records of steps that will be redone

A launch on a workdir that holds a run resumes it. Its config may differ from the run's only in
`config_check.RESUMABLE` fields; any other difference is an error naming the fields, and nothing
is written. `--restart` moves the old run into WORKDIR/previous_runs/<time>/ (never deletes it)
and starts a new one; the synthetic data set and caches stay where they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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


def _has_run(workdir: Path) -> bool:
    return bool(_config_files(workdir)) or any((workdir / item).exists() for item in RUN_ITEMS)


def run_config(workdir: str | Path) -> ml_collections.ConfigDict | None:
    """The config the run in `workdir` last ran with; None if it holds no run config."""
    workdir = Path(workdir)
    files = _config_files(workdir)
    if files:
        return ckpt_lib.config_from_dict(json.loads(files[-1].read_text()))
    steps = ckpt_lib.step_numbers(workdir / ckpt_lib.CHECKPOINTS)
    if steps:  # config.json lost: every checkpoint step carries its config
        return ckpt_lib.run_config_of(workdir / ckpt_lib.CHECKPOINTS / str(steps[-1]))
    return None


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_launch(workdir: str | Path, config: ml_collections.ConfigDict,
                 restart: bool = False) -> LaunchPlan:
    """Decides what a launch does with `workdir`, writing nothing.

    Raises ValueError when the workdir holds a run whose config differs from `config` in a
    field a resume cannot take, naming each field with both values and the ways out.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir={workdir} is a file; pass a folder")
    if not workdir.is_dir() or not _has_run(workdir):
        return LaunchPlan(resume=False, changes={})
    if restart:
        return LaunchPlan(resume=False, changes={}, restart=True)
    old = run_config(workdir)
    if old is None:  # run items but no config anywhere (e.g. only metrics.jsonl)
        raise ValueError(f"{workdir} holds files of a run ({', '.join(RUN_ITEMS)}) but no "
                         f"{ckpt_lib.CONFIG_JSON} and no checkpoint: cannot tell whether this "
                         "config may continue it. Use another --workdir, or --restart to move "
                         f"those files into {workdir / PREVIOUS_RUNS}/ and start over")
    changes = config_check.config_changes(old, config)
    bad = config_check.incompatible(changes)
    if bad:
        lines = "\n".join(f"  {k}: {_show(a)} (run) -> {_show(b)} (this launch)"
                          for k, (a, b) in bad.items())
        raise ValueError(
            f"{workdir} holds a run whose config differs in fields a resume cannot change:\n"
            f"{lines}\nNothing was changed. To keep that run, pass another --workdir (or "
            "--config.init_from=" f"{workdir} to start a new run from its weights); to start "
            f"over here, pass --restart (moves the old run into {workdir / PREVIOUS_RUNS}/, "
            "deletes nothing). Fields a resume may change: " + ", ".join(
                config_check.RESUMABLE))
    return LaunchPlan(resume=True, changes=changes)


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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
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


def drop_metrics_after(workdir: str | Path, step: int) -> int:
    """Removes metrics.jsonl records of steps after `step` (they will be logged again).

    A trailing partial line (a kill mid-write) is dropped too. Returns the records removed.
    """
    path = Path(workdir) / METRICS_JSONL
    if not path.is_file():
        return 0
    text = path.read_text()
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else a partial record
    kept, dropped = [], int(bool(tail))
    for line in lines:
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            kept.append(line)  # not ours to judge: keep it
            continue
        if record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        _write_atomic(path, "".join(line + "\n" for line in kept))
        logging.info("metrics.jsonl: dropped %d record(s) after step %d (those steps run again)",
                     dropped, step)
    return dropped
