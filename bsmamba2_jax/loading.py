"""One way to load a trained model, whatever holds it.

    from bsmamba2_jax.loading import load_model
    model, params, config = load_model(path)       # then model.apply(params, audio)

`path` may be
  - a train.py workdir (by default its step with the best validation uSDR, else its newest step;
    `select="best_usdr" | "best_loss" | "latest"` names the choice, see
    `bsmamba2_jax.train.checkpoint.candidate_step_dirs`),
  - a checkpoint step directory (`WORKDIR/checkpoints/<step>`, `WORKDIR/best_usdr/<step>`, ...),
  - a model file written by `python -m bsmamba2_jax.export` (or `bsmamba2_jax.convert`),
  - one of the authors' PyTorch checkpoints (BSMamba2 or BS-RoFormer, their Lightning `.ckpt`
    or a bare state_dict such as Music-Source-Separation-Training's; `bsmamba2_jax.convert`),
    read without PyTorch. Its "raw" weights are the state_dict (what the authors' evaluation
    scores), "ema" the Lightning file's EMA tuple; a bare state_dict has raw weights only.

`config` is a plain dict in the model file's layout: {"model": BSMamba2 keyword arguments,
"sample_rate": Hz, "segment_seconds": training segment length, "step": int or None,
"weights": "ema" or "raw", "source": str(path)}; for a PyTorch checkpoint also "checkpoint" (what
was read: file, sha256, release, layout, architecture, epoch, global_step; "step" is its
global_step) and "loaded" (the same in a few lines for users). The architecture always comes from
what was saved with the weights; only execution fields (how to run, not what was trained) may be
overridden.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Fields of the model config that say how to run it, not what was trained: callers may override
# them (e.g. evaluate.py's --config.model.ssd_impl); any other field must come from the checkpoint.
EXECUTION_FIELDS = ("ssd_impl", "attn_impl", "remat", "group_tokens", "dtype")
WEIGHTS = ("ema", "raw")


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def read_weights(path: str | Path, weights: str | None = "ema", select: str | None = None, *,
                 report: Callable[[str], None] | None = _to_stderr) -> tuple[Any, dict]:
    """(params as float32 NumPy pytree, config dict) from any supported source; see module doc.

    weights None: what the source holds by default (a model file's one kind, the raw
      state_dict of a PyTorch checkpoint, EMA otherwise).
    select: which step of a workdir (checkpoint.SELECTIONS); only for workdirs.
    report: called with config["loaded"] when a PyTorch checkpoint was read (which release,
      checksum, layout, weights, epoch/step); None to stay quiet. Default: print to stderr.
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"Unknown weights {weights!r}; choose one of {WEIGHTS}")
    path = Path(path)
    if path.is_file() and _is_torch_checkpoint(path):
        weights = weights or "raw"  # what the authors' evaluation scores
        params, config = _read_torch(path, weights)
        if report is not None:
            report(config["loaded"])
    elif path.is_file():
        from bsmamba2_jax import export

        params, config = export.load_model(path)
        stored = config.get("weights", "ema")
        weights = stored if weights is None else weights
        if stored != weights:
            raise ValueError(f"{path} holds the {stored} weights only, not the {weights} ones; "
                             f"pass weights={stored!r} or export the {weights} weights")
        check_params_fit(params, config["model"], path)
    elif path.is_dir():
        from bsmamba2_jax import export
        from bsmamba2_jax.train import checkpoint

        weights = weights or "ema"
        params, run_config, step = checkpoint.load_params(path, weights, select)
        config = {**export.model_config_dict(run_config), "step": step}
        check_params_fit(params, config["model"], path)
    else:
        raise FileNotFoundError(
            f"No model at {path}: pass a train.py workdir, a checkpoint step directory "
            "(WORKDIR/checkpoints/<step>), a model file from `python -m bsmamba2_jax.export` "
            "or one of the authors' PyTorch checkpoints")
    config.setdefault("step", None)
    config["weights"] = weights
    config["source"] = str(path)
    return params, config


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple]:
    """{path: shape} of a nested dict of arrays."""
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], tuple] = {}
        for k, v in tree.items():
            out.update(_leaf_paths(v, prefix + (str(k),)))
        return out
    return {prefix: tuple(getattr(tree, "shape", ()))}


def check_params_fit(params: Any, model_config: dict, source: str | Path) -> None:
    """Raises ValueError naming `source` unless `params` are what BSMamba2(**model_config) has.

    A model file or a run whose config was edited (or belongs to other weights) would otherwise
    fail inside Flax, naming neither the file nor the field.
    """
    from bsmamba2_jax import convert

    fix = ("the config was edited or belongs to other weights: restore the config the weights "
           "were trained with, or export the model again from its run")
    try:
        want = convert.expected_leaves(_model_kwargs(model_config))
    except Exception as e:  # noqa: BLE001 - any failure to build the model is the config's
        raise ValueError(f"{source}: its model config does not build a BSMamba2 "
                         f"({type(e).__name__}: {e}); {fix}") from e
    got = _leaf_paths(params)
    fields = ", ".join(f"{k}={model_config[k]}" for k in ("mixer", "dim", "depth", "expand",
                                                          "d_state", "headdim", "heads")
                       if k in model_config)
    for leaf in sorted(set(want) | set(got)):
        if want.get(leaf) != got.get(leaf):
            name = "/".join(leaf)
            have = "absent" if leaf not in got else f"of shape {got[leaf]}"
            need = "no such leaf" if leaf not in want else f"{want[leaf]}"
            differ = sum(want.get(k) != got.get(k) for k in set(want) | set(got))
            raise ValueError(f"{source}: its weights do not fit its model config "
                             f"BSMamba2({fields}): {name} is {have} in the weights, the config "
                             f"needs {need} ({differ} leaves differ); {fix}")


def _model_kwargs(model_config: Mapping) -> dict:
    """A saved model config as BSMamba2 keyword arguments (JSON lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}


def _is_torch_checkpoint(path: Path) -> bool:
    # A truncated or legacy torch file is routed to the torch reader too, for its named error.
    from bsmamba2_jax.torch_checkpoint import is_torch_checkpoint, starts_like_torch_checkpoint

    return is_torch_checkpoint(path) or starts_like_torch_checkpoint(path)


def _read_torch(path: Path, weights: str) -> tuple[Any, dict]:
    """The authors' checkpoint as (params, config)."""
    from bsmamba2_jax import convert

    params, config, info = convert.load_torch_model(path, weights)
    keep = ("file", "size", "sha256", "release", "layout", "architecture", "epoch",
            "global_step")
    config["step"] = info.get("global_step")
    config["checkpoint"] = {k: info[k] for k in keep if info.get(k) is not None}
    config["loaded"] = convert.describe(info)
    return params, config


def build_model(model_config: dict, overrides: dict | None = None) -> Any:
    """`BSMamba2` from a saved model config, with execution fields overridden.

    overrides: {field: value} for fields in EXECUTION_FIELDS; anything else is an error, because
    the weights fix the architecture.
    """
    from bsmamba2_jax.model import BSMamba2

    kwargs = _model_kwargs(model_config)
    for field, value in (overrides or {}).items():
        if field not in EXECUTION_FIELDS:
            raise ValueError(f"model.{field} comes from the checkpoint and cannot be overridden; "
                             f"only {EXECUTION_FIELDS} can")
        kwargs[field] = value
    return BSMamba2(**kwargs)


def load_model(path: str | Path, *, weights: str | None = "ema", overrides: dict | None = None,
               select: str | None = None, report: Callable[[str], None] | None = _to_stderr
               ) -> tuple[Any, Any, dict]:
    """(model, params, config) from a workdir, a step directory, a model file or the authors'
    PyTorch checkpoint.

    weights: "ema" (the exponential moving average of training), "raw" (the optimizer's weights)
      or None (the source's default; see `read_weights`).
    overrides: execution fields of the model config (EXECUTION_FIELDS) to change.
    select: which step of a workdir: "best_usdr" (default), "best_loss" or "latest".
    report: see `read_weights`.
    """
    params, config = read_weights(path, weights, select, report=report)
    return build_model(config["model"], overrides), params, config
