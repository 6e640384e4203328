"""Orbax checkpoints of a run, and loading weights from them for evaluation, export, fine-tuning.

Layout of a workdir (docs/DESIGN.md#checkpoints):
    config.json                      the run's config as first launched
    config.<step>.json               a config changed on resume (fields in config_check.RESUMABLE)
    checkpoints/<step>/              last `config.keep_checkpoints` steps, to resume; items:
        train_state/                 TrainState less ema_params (params, opt_state, step, ...)
        ema_params/                  EMA weights, a separate item so evaluation reads only them
        data_iter/                   Grain iterator state, one JSON per process
        config/                      the config as JSON (makes a step directory self-contained)
    best_loss/<step>/                the `config.keep_best` steps with the lowest validation loss
    best_usdr/<step>/                ... and with the highest validation uSDR; items params/ (raw),
                                     ema_params/, config/, metrics/ ({"loss", "usdr", ...})
    checkpoints/<step>.damaged-<n>/  a step that failed to restore, moved aside by train.py

This is the authors' selection (two Lightning ModelCheckpoint callbacks, val/loss min and
val/usdr max, top 4 each, plus the last); their evaluation loads the raw weights of those.
Validation scores the EMA weights, as their EMA callback swaps them in for validation.

`step` counts micro-batches (train-step calls). Orbax writes each step into a temporary directory
and renames it when complete, so a save cut short leaves `<step>.orbax-checkpoint-tmp-*`, which
`all_steps()` ignores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bsmamba2_jax.train.state import TrainState

CHECKPOINTS = "checkpoints"
BEST_LOSS = "best_loss"
BEST_USDR = "best_usdr"
LEGACY_BEST = "best"  # best-uSDR EMA weights of runs made before best_loss/ and best_usdr/
CONFIG_JSON = "config.json"
# Named selections of a workdir's steps: (folder, metric to rank by, True if larger is better).
SELECTIONS = {"best_usdr": (BEST_USDR, "usdr", True), "best_loss": (BEST_LOSS, "loss", False),
              "latest": (CHECKPOINTS, None, True)}
DEFAULT_SELECTION = "best_usdr"
_BEST_ITEMS = ("params", "ema_params", "config", "metrics")


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected (the message names the folder)."""


def _split(state: TrainState) -> tuple[dict, Any]:
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    ema = fields.pop("ema_params")
    return fields, ema


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """JSON turns tuples into lists; turn them back so configs stay hashable where it matters."""

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(fix(v) for v in x)
        return x

    return ml_collections.ConfigDict(fix(d))


def read_config_json(path: Path) -> ml_collections.ConfigDict:
    """A run config saved as JSON (config.json, config.<step>.json).

    Raises ValueError naming the file when it is not UTF-8 JSON holding an object, with the
    fix: every checkpoint step keeps its own copy of the config.
    """
    try:
        data = json.loads(path.read_bytes())
        problem = None if isinstance(data, dict) else f"JSON {type(data).__name__}, not an object"
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text: {e.reason} at byte {e.start}"
    except json.JSONDecodeError as e:
        problem = f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    if problem:
        raise ValueError(
            f"{path} is not a readable run config ({problem}). Restore it (every checkpoint "
            f"step keeps a copy of its config: {CHECKPOINTS}/<step>/config/metadata), or move "
            "it aside: the run's config is then read from its newest checkpoint")
    return config_from_dict(data)


def _short(e: BaseException) -> str:
    """One line for a log: the exception type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def move_aside(step_dir: Path) -> Path:
    """Renames `<step>` to the first free `<step>.damaged-<n>`; returns the new path."""
    n = 1
    while (dest := step_dir.with_name(f"{step_dir.name}.damaged-{n}")).exists():
        n += 1
    step_dir.rename(dest)
    return dest


def _shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{"params/Dense_0/kernel": shape} of the leaves of nested dicts (arrays, shape structs or
    Orbax array metadata: anything with a `.shape`)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_shapes(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tuple(getattr(tree, "shape", ()))}


def model_mismatch(step_dir: Path, params: Any, ema_params: Any) -> str | None:
    """How the weights saved in a resume step differ from the model's, or None.

    params, ema_params: the model's (abstract) trees. Compares the saved array shapes (from
    the step's metadata, no array is read) with them: a difference means the launch builds
    another model than the one saved (its config or the code changed), which is no damage of
    the step. None also when the metadata cannot be read: restoring will tell.
    """
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = {"params": ckptr.metadata(step_dir / "train_state").item_metadata.tree[
                "params"], "ema_params": ckptr.metadata(step_dir / "ema_params").item_metadata.tree}
    except Exception:  # noqa: BLE001 - unreadable metadata: a damaged step, found by the restore
        return None
    have, want = _shapes(saved), _shapes({"params": params, "ema_params": ema_params})
    for name in sorted(have.keys() | want.keys()):
        if have.get(name) != want.get(name):
            return (f"{name} is {have.get(name, 'missing')} there, the model built from this "
                    f"launch's config has {want.get(name, 'no such parameter')}")
    return None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """The run's CheckpointManagers: the last k steps (to resume) and the selected best steps.

    Async saves: `save` returns once arrays are copied off the devices; a failed background write
    raises at the next `save`, `check`, or `wait` — the run stops, never silently.
    """

    def __init__(self, workdir: str | Path, config: ml_collections.ConfigDict):
        workdir = Path(workdir).absolute()
        self.config = config
        self.latest = ocp.CheckpointManager(
            workdir / CHECKPOINTS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep_checkpoints, create=True,
                enable_async_checkpointing=config.async_checkpointing),
            item_names=("train_state", "ema_params", "data_iter", "config"),
        )
        self.best: dict[str, tuple[ocp.CheckpointManager, str, bool]] = {}
        if config.keep_best > 0:
            for name in ("best_loss", "best_usdr"):
                folder, metric, larger = SELECTIONS[name]
                manager = ocp.CheckpointManager(
                    workdir / folder,
                    options=ocp.CheckpointManagerOptions(
                        max_to_keep=config.keep_best, create=True,
                        best_fn=lambda m, metric=metric: m[metric],
                        best_mode="max" if larger else "min",
                        keep_checkpoints_without_metrics=False,
                        enable_async_checkpointing=config.async_checkpointing),
                    item_names=_BEST_ITEMS,
                )
                self.best[name] = (manager, metric, larger)

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [self.latest] + [m for m, _, _ in self.best.values()]

    def save(self, step: int, state: TrainState, data_iter: Any, *, force: bool = False) -> bool:
        """Starts an async save of `state` and the data iterator at `step`."""
        self.check()
        rest, ema = _split(state)
        return self.latest.save(step, args=ocp.args.Composite(
            train_state=ocp.args.StandardSave(rest),
            ema_params=ocp.args.StandardSave(ema),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(self.config.to_dict()),
        ), force=force)

    def save_selected(self, step: int, state: TrainState, metrics: dict[str, float]) -> list[str]:
        """Keeps the raw and EMA weights of `step` in each selection it enters.

        metrics: validation results with "loss" and "usdr" (of the EMA weights). A selection
        already holding keep_best steps that all rank above this one is not written to at all.
        Returns the names of the selections the step entered.
        """
        self.check()
        entered = []
        for name, (manager, metric, larger) in self.best.items():
            value = float(metrics[metric])
            if not math.isfinite(value):
                continue
            kept = [float((manager.metrics(s) or {}).get(metric, math.nan))
                    for s in manager.all_steps()]
            if len(kept) >= self.config.keep_best and all(
                    (k >= value) if larger else (k <= value) for k in kept):
                continue
            record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
            manager.save(step, metrics=record, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                ema_params=ocp.args.StandardSave(state.ema_params),
                config=ocp.args.JsonSave(self.config.to_dict()),
                metrics=ocp.args.JsonSave(record),
            ), force=True)
            entered.append(name)
        return entered

    def _restore_step(self, step: int, rest: dict, ema: Any, data_iter: Any) -> TrainState:
        step_dir = Path(self.latest.directory) / str(step)
        # Top-level fields saved by older code and since removed (e.g. a PRNG key) are read into
        # a throw-away target: restoring needs the saved and the target structure to agree.
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(step_dir / "train_state").item_metadata.tree
        target = dict(rest)
        replicated = rest["step"].sharding
        for key in set(saved) - set(rest):
            leaf = saved[key]
            target[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
        restored = self.latest.restore(step, args=ocp.args.Composite(
            train_state=ocp.args.StandardRestore(target),
            ema_params=ocp.args.StandardRestore(ema)))
        fields = {k: v for k, v in restored["train_state"].items() if k in rest}
        state = TrainState(ema_params=restored["ema_params"], **fields)
        # The data position last: a step that fails above leaves the iterator as it was.
        own_iter_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if (step_dir / "data_iter" / own_iter_file).exists():
            self.latest.restore(step, args=ocp.args.Composite(
                data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
        else:
            logging.warning("Checkpoint step %d has no data iterator state for %s (written by "
                            "another process count?): the data stream restarts", step,
                            own_iter_file)
        return state

    def restore_latest(self, abstract_state: TrainState, data_iter: Any) -> TrainState | None:
        """Restores the newest readable step into `abstract_state`'s shapes/shardings.

        `data_iter` is set to the saved position in place. Returns None when there is nothing
        to resume from. A step that fails to restore (truncated, hand-edited, ...) is moved
        aside to `<step>.damaged-<n>` with a warning and the next older one is tried; when
        steps exist but none is readable, raises CheckpointError naming the folder. A step whose
        saved shapes differ from `abstract_state`'s is another model, not damage: CheckpointError
        naming the first differing parameter, nothing moved. A
        checkpoint written by a different number of processes restores the model and optimizer
        but not the data position (Grain keeps one iterator state per process): the data stream
        restarts, with a warning.
        """
        rest, ema = _split(abstract_state)
        folder = Path(self.latest.directory)
        moved = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            mismatch = model_mismatch(folder / str(step), rest["params"], ema)
            if mismatch:
                raise CheckpointError(
                    f"Checkpoint step {step} in {folder} holds another model: {mismatch}. The "
                    "step is not damaged and was left as it is. Launch with the run's model "
                    f"config (saved in {folder / str(step) / 'config' / 'metadata'}), or pass "
                    "--restart (moves this run aside) or another --workdir to train this one")
            try:
                return self._restore_step(step, rest, ema, data_iter)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                error = _short(e)
            _barrier(f"restore {step} failed")  # every process tried it before it moves
            dest = folder / f"{step}.damaged-?"
            if jax.process_index() == 0:
                dest = move_aside(folder / str(step))
            logging.warning("Checkpoint step %d in %s is unreadable (%s): moved it to %s (move "
                            "it back by hand to retry it); trying the next older step", step,
                            folder, error, dest.name)
            moved.append(dest.name)
            _barrier(f"moved {step} aside")
            self.latest.reload()
        if moved:
            raise CheckpointError(
                f"No readable checkpoint in {folder}: every step failed to restore and was moved "
                f"aside ({', '.join(moved)}). Nothing was deleted. Move a step back by hand to "
                "retry it, start over with --restart (moves this run aside), or use another "
                "--workdir")
        return None

    def check(self) -> None:
        """Raises the error of a failed background save, if any."""
        for manager in self._managers():
            manager.check_for_errors()

    def wait(self) -> None:
        """Blocks until pending saves are on disk; raises if one failed."""
        for manager in self._managers():
            manager.wait_until_finished()
        self.check()

    def close(self) -> None:
        self.wait()
        for manager in self._managers():
            manager.close()


# ----------------------------------------------------------------------------- loading weights

def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and any((path / item).is_dir()
                                 for item in ("ema_params", "params", "train_state"))


def step_numbers(folder: Path) -> list[int]:
    """Ascending steps of the complete step directories in `folder` ([] if it is absent)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and _is_step_dir(p))


def _read_json_item(item: Path) -> dict:
    """The dict of an Orbax JsonSave item folder (its file is named after the item)."""
    for name in (item.name, "metadata"):
        if (item / name).is_file():
            return json.loads((item / name).read_text())
    raise FileNotFoundError(f"{item} holds no JSON item")


def _ranked(folder: Path, metric: str | None, larger: bool) -> list[Path]:
    """Step directories of `folder`, best first (newest first when metric is None)."""
    steps = step_numbers(folder)
    if metric is None:
        return [folder / str(s) for s in reversed(steps)]

    def score(step: int) -> float:
        try:
            value = float(_read_json_item(folder / str(step) / "metrics")[metric])
        except (OSError, ValueError, KeyError):
            return -math.inf  # unreadable metrics rank last; the weights may still be fine
        return value if larger else -value

    return [folder / str(s) for s in sorted(steps, key=lambda s: (score(s), s), reverse=True)]


def candidate_step_dirs(path: str | Path, select: str | None = None) -> tuple[list[Path], str]:
    """The step directories `path` names, in the order to try them, and how they were chosen.

    path: a workdir, a selection folder (checkpoints/, best_usdr/, best_loss/, best/) or a step
    directory. select: "best_usdr" (default for a workdir: the steps with the highest
    validation uSDR, best first), "best_loss" (lowest validation loss first) or "latest" (the
    resume checkpoints, newest first). A workdir without validated steps falls back to
    "latest" (with a log line) unless `select` was given.
    """
    path = Path(path).absolute()
    if select is not None and select not in SELECTIONS:
        raise ValueError(f"Unknown selection {select!r}; choose one of {sorted(SELECTIONS)}")
    if _is_step_dir(path):
        if select is not None:
            raise ValueError(f"{path} is one step directory; select={select!r} applies to a "
                             "workdir")
        return [path], "step directory"
    by_folder = {folder: (name, metric, larger)
                 for name, (folder, metric, larger) in SELECTIONS.items()}
    by_folder[LEGACY_BEST] = ("best_usdr", None, True)  # held one step only
    if path.name in by_folder and step_numbers(path):
        name, metric, larger = by_folder[path.name]
        return _ranked(path, metric, larger), name
    if select is not None:
        folder, metric, larger = SELECTIONS[select]
        dirs = _ranked(path / folder, metric, larger)
        if not dirs and select == "best_usdr":
            dirs = _ranked(path / LEGACY_BEST, None, True)
        if not dirs:
            raise FileNotFoundError(f"No {select} checkpoint under {path}: {path / folder} holds "
                                    f"no step; choose another selection of {sorted(SELECTIONS)}")
        return dirs, select
    for name in (DEFAULT_SELECTION, "latest"):
        folder, metric, larger = SELECTIONS[name]
        dirs = _ranked(path / folder, metric, larger)
        if name == DEFAULT_SELECTION and not dirs:
            dirs = _ranked(path / LEGACY_BEST, None, True)
        if dirs:
            if name != DEFAULT_SELECTION:
                logging.info("%s has no validated (best_usdr) step: using its latest step", path)
            return dirs, name
    raise FileNotFoundError(
        f"No checkpoint under {path}: pass a workdir of train.py, or a step directory such as "
        f"WORKDIR/{CHECKPOINTS}/1000 or WORKDIR/{BEST_USDR}/N")


def _restore_numpy(item: Path, subtree: str | None = None) -> Any:
    """An Orbax PyTree item as float32-or-native np.ndarray leaves on the host.

    subtree: restore only this top-level key of the item (e.g. "params" of a train_state item,
    whose optimizer state is then never read).
    """
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if subtree is not None:
        tree = {subtree: tree[subtree]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            item, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                              partial_restore=subtree is not None))
    return restored if subtree is None else restored[subtree]


def step_config(step_dir: Path) -> ml_collections.ConfigDict:
    """The config a step directory was saved with (its `config` item)."""
    return config_from_dict(_read_json_item(step_dir / "config"))


def run_config_of(step_dir: Path) -> ml_collections.ConfigDict:
    """The step's own config; for steps saved without one, the workdir's config.json."""
    try:
        return step_config(step_dir)
    except FileNotFoundError:
        return read_config_json(step_dir.parent.parent / CONFIG_JSON)


def _read_step(step_dir: Path, weights: str) -> tuple[Any, ml_collections.ConfigDict]:
    if weights == "ema":
        params = _restore_numpy(step_dir / "ema_params")
    elif (step_dir / "params").is_dir():
        params = _restore_numpy(step_dir / "params")
    elif (step_dir / "train_state").is_dir():
        params = _restore_numpy(step_dir / "train_state", subtree="params")
    else:
        raise FileNotFoundError(f"{step_dir} holds only the EMA weights; pass weights='ema' "
                                f"or a step directory under {CHECKPOINTS}/")
    return params, run_config_of(step_dir)


def load_params(path: str | Path, weights: str = "ema", select: str | None = None
                ) -> tuple[Any, ml_collections.ConfigDict, int | None]:
    """Weights, the run's config and the step from a checkpoint, as NumPy arrays on the host.

    path: a workdir, a selection folder or a step directory (see `candidate_step_dirs`).
    weights: "ema" (the EMA weights) or "raw" (the optimizer's weights).
    select: which of a workdir's steps: "best_usdr" (default: the best validation uSDR, the
    authors' criterion for the weights they evaluate), "best_loss" or "latest".
    A step that fails to read is skipped with a warning naming it (nothing is moved: training
    may be writing next to it) and the next candidate is used; when none reads, one
    CheckpointError names the folder. Needs neither the optimizer structure nor the devices
    the run used.
    Returns (params, config, step): params is the `model.init` pytree ({"params": ...}) of
    np.ndarray; `BSMamba2(**config.model).apply(params, audio)` runs the model.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"Unknown weights {weights!r}; choose 'ema' or 'raw'")
    dirs, how = candidate_step_dirs(path, select)
    failed = []
    for step_dir in dirs:
        try:
            params, config = _read_step(step_dir, weights)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable step: try the next one
            logging.warning("Skipping unreadable checkpoint %s (%s)", step_dir, _short(e))
            failed.append(step_dir.name)
            continue
        if failed:
            logging.warning("Using %s (%s) instead of the unreadable %s", step_dir, how,
                            ", ".join(failed))
        step = int(step_dir.name) if re.fullmatch(r"\d+", step_dir.name) else None
        return params, config, step
    raise CheckpointError(f"No readable checkpoint in {dirs[0].parent}: {', '.join(failed)} "
                          "failed to read (see the warnings above); pass another step "
                          "directory or workdir")


def load_ema_params(path: str | Path) -> tuple[Any, ml_collections.ConfigDict]:
    """EMA weights and the run's config (see `load_params`)."""
    params, config, _ = load_params(path, "ema")
    return params, config
