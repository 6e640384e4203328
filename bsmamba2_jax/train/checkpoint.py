"""Orbax checkpoints of a run, and loading EMA weights for evaluation/export.

Layout of a workdir:
    config.json                      the run's config (`config.to_json()`)
    checkpoints/<step>/              last `config.keep_checkpoints` steps, each with items
        train_state/                 TrainState less ema_params (params, opt_state, step, rng...)
        ema_params/                  EMA weights, a separate item so evaluation reads only them
        data_iter/                   Grain iterator state, one JSON per process
        config/                      the config as JSON (makes a step directory self-contained)
    best/<step>/                     the best step by validation uSDR: ema_params/ and config/

`step` counts micro-batches (train-step calls). Orbax writes each step into a temporary directory
and renames it when complete, so a save cut short leaves `<step>.orbax-checkpoint-tmp-*`, which
`all_steps()` ignores; a step directory that still fails to restore is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bsmamba2_jax.train.state import TrainState

CHECKPOINTS = "checkpoints"
BEST = "best"
CONFIG_JSON = "config.json"


def _split(state: TrainState) -> tuple[dict, Any]:
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    ema = fields.pop("ema_params")
    return fields, ema


def write_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Writes workdir/config.json (process 0 only)."""
    if jax.process_index() == 0:
        path = Path(workdir) / CONFIG_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_json(indent=2))


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """JSON turns tuples into lists; turn them back so configs stay hashable where it matters."""

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(fix(v) for v in x)
        return x

    return ml_collections.ConfigDict(fix(d))


class Checkpointer:
    """The run's two CheckpointManagers: the last k steps (to resume) and the best step.

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
        self.best = ocp.CheckpointManager(
            workdir / BEST,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["usdr"], best_mode="max",
                enable_async_checkpointing=config.async_checkpointing),
            item_names=("ema_params", "config"),
        )

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

    def save_best(self, step: int, state: TrainState, usdr: float) -> None:
        """Keeps the EMA weights of `step` if its validation uSDR is the best so far."""
        self.check()
        self.best.save(step, metrics={"usdr": float(usdr)}, args=ocp.args.Composite(
            ema_params=ocp.args.StandardSave(state.ema_params),
            config=ocp.args.JsonSave(self.config.to_dict()),
        ), force=True)

    def restore_latest(self, abstract_state: TrainState, data_iter: Any) -> TrainState | None:
        """Restores the newest readable step into `abstract_state`'s shapes/shardings.

        `data_iter` is set to the saved position in place. Returns None when there is nothing
        to resume from. An unreadable step (e.g. hand-copied, truncated) is skipped with a warning.
        A checkpoint written by a different number of processes restores the model and optimizer
        but not the data position (Grain keeps one iterator state per process): the data stream
        restarts, with a warning.
        """
        rest, ema = _split(abstract_state)
        own_iter_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        for step in sorted(self.latest.all_steps(), reverse=True):
            items = {"train_state": ocp.args.StandardRestore(rest),
                     "ema_params": ocp.args.StandardRestore(ema)}
            step_dir = Path(self.latest.directory) / str(step)
            if (step_dir / "data_iter" / own_iter_file).exists():
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                logging.warning("Checkpoint step %d has no data iterator state for %s (written by "
                                "another process count?): the data stream restarts", step,
                                own_iter_file)
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                logging.warning("Skipping unreadable checkpoint step %d: %s", step, e)
                continue
            return TrainState(ema_params=restored["ema_params"], **restored["train_state"])
        return None

    def check(self) -> None:
        """Raises the error of a failed background save, if any."""
        self.latest.check_for_errors()
        self.best.check_for_errors()

    def wait(self) -> None:
        """Blocks until pending saves are on disk; raises if one failed."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.check()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def _step_dir(path: Path) -> Path:
    """A workdir, a checkpoints/ or best/ folder, or a step directory -> a step directory."""
    if (path / "ema_params").is_dir():
        return path
    for root in (path / CHECKPOINTS, path / BEST, path):
        if root.is_dir():
            steps = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                     and (p / "ema_params").is_dir()]
            if steps:
                return root / str(max(steps))
    raise FileNotFoundError(
        f"No checkpoint under {path}: pass a workdir of train.py (uses its latest step in "
        f"{CHECKPOINTS}/), or a step directory such as WORKDIR/{CHECKPOINTS}/1000 or "
        f"WORKDIR/{BEST}/N")


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
    restored = ocp.PyTreeCheckpointer().restore(
        item, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                          partial_restore=subtree is not None))
    return restored if subtree is None else restored[subtree]


def _run_config(step_dir: Path) -> ml_collections.ConfigDict:
    config_file = step_dir / "config" / "metadata"
    if not config_file.exists():
        candidates = [p for p in (step_dir / "config").glob("*") if p.is_file()]
        config_file = candidates[0] if candidates else step_dir.parent.parent / CONFIG_JSON
    return config_from_dict(json.loads(config_file.read_text()))


def load_params(path: str | Path, weights: str = "ema"
                ) -> tuple[Any, ml_collections.ConfigDict, int | None]:
    """Weights, the run's config and the step from a checkpoint, as NumPy arrays on the host.

    path: a workdir (its latest step in checkpoints/), or a step directory (checkpoints/<step> or
    best/<step>). weights: "ema" (the EMA weights) or "raw" (the optimizer's weights). Needs
    neither the optimizer structure nor the devices the run used.
    Returns (params, config, step): params is the `model.init` pytree ({"params": ...}) of
    np.ndarray; `BSMamba2(**config.model).apply(params, audio)` runs the model.
    """
    step_dir = _step_dir(Path(path).absolute())
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    if weights == "ema":
        params = _restore_numpy(step_dir / "ema_params")
    elif weights == "raw":
        if (step_dir / "params").is_dir():
            params = _restore_numpy(step_dir / "params")
        elif (step_dir / "train_state").is_dir():
            params = _restore_numpy(step_dir / "train_state", subtree="params")
        else:
            raise FileNotFoundError(f"{step_dir} holds only the EMA weights; pass weights='ema' "
                                    f"or a step directory under {CHECKPOINTS}/")
    else:
        raise ValueError(f"Unknown weights {weights!r}; choose 'ema' or 'raw'")
    return params, _run_config(step_dir), step


def load_ema_params(path: str | Path) -> tuple[Any, ml_collections.ConfigDict]:
    """EMA weights and the run's config (see `load_params`)."""
    params, config, _ = load_params(path, "ema")
    return params, config
