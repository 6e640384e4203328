"""One self-contained model file: weights + model config, readable on any device.

    python -m bsmamba2_jax.export WORKDIR_OR_STEP_DIR OUT.msgpack [--weights ema|raw]
    python -m bsmamba2_jax.export sota_model.ckpt OUT.msgpack       # the authors' PyTorch file

File format (flax.serialization msgpack of one dict):
    {"format": "bsmamba2-jax-model", "version": 1,
     "config": JSON text {"model": {...BSMamba2 kwargs...}, "sample_rate": 44100,
                          "segment_seconds": 8.0, "step": ...},
     "params": the `model.init` pytree of float32 arrays}
No dataset paths, optimizer state or device layout are stored: loading needs only NumPy, and the
params land on whatever device runs `model.apply`.

OUT is never the input and never inside the run it is exported from (`write_guard`: the run's
config and checkpoints stay as train.py wrote them); it appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax.data.musdb import SAMPLE_RATE
from bsmamba2_jax.write_guard import OutputPathError, check_output, write_error

FORMAT = "bsmamba2-jax-model"
VERSION = 1


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenDict / tuples -> JSON-able dicts and lists."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuples(x: Any) -> Any:
    """JSON lists back to tuples (BSMamba2's band_widths is a tuple field)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _to_numpy(params: Any) -> Any:
    import jax

    # float32 on the host: device-independent, and what `model.apply` expects for storage.
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a), dtype=np.float32), params)


def model_config_dict(config: Any) -> dict:
    """The run config (or just its model section) -> the exported config dict."""
    plain = _plain(config)
    if "model" not in plain:
        plain = {"model": plain}
    data = plain.get("data", {}) or {}
    return {
        "model": plain["model"],
        "sample_rate": int(data.get("sample_rate", SAMPLE_RATE)),
        "segment_seconds": float(data.get("segment_seconds", 8.0)),
    }


def save_model(path: str | Path, params: Any, config: Any, **extra: Any) -> Path:
    """Writes params + config to one file.

    Args:
      path: output file; its parent folders are created.
      params: the `model.init` pytree ({"params": ...}).
      config: the run's ConfigDict (or a dict with a "model" section, or the model section).
      extra: JSON-able facts to keep with the config (e.g. step=...).
    Raises:
      write_guard.WriteError naming the file (a full disk as such) when it cannot be written;
      nothing is left behind then, and an earlier file at `path` is kept.
    """
    from flax import serialization

    cfg = model_config_dict(config)
    cfg.update(_plain(extra))
    blob = serialization.msgpack_serialize({
        "format": FORMAT, "version": VERSION, "config": json.dumps(cfg),
        "params": _to_numpy(_plain_tree(params)),
    })
    path = Path(path)
    # A name of this process's own, so two exports into one folder cannot mix their bytes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        tmp.replace(path)  # never leave a half-written model file behind
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e, "or choose another OUT") from e
    return path


def _plain_tree(params: Any) -> Any:
    """FrozenDict -> dict (msgpack stores dicts; restoring gives dicts either way)."""
    if isinstance(params, Mapping):
        return {str(k): _plain_tree(v) for k, v in params.items()}
    return params


def load_model(path: str | Path) -> tuple[Any, dict]:
    """Reads a file written by `save_model`.

    Returns:
      (params, config): params a pytree of float32 np.ndarray; config a dict with "model" (the
      BSMamba2 keyword arguments, lists turned back into tuples), "sample_rate", "segment_seconds".
    """
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        hint = (" (that is a folder: export it first with `python -m bsmamba2_jax.export "
                f"{path} model.msgpack`)") if path.is_dir() else ""
        raise FileNotFoundError(f"No model file at {path}{hint}")
    try:
        blob = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any decoding error means "not our file"
        raise ValueError(f"{path} is not a bsmamba2-jax model file ({e}); write one with "
                         "`python -m bsmamba2_jax.export WORKDIR OUT`") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bsmamba2-jax model file; write one with "
                         "`python -m bsmamba2_jax.export WORKDIR OUT`")
    if blob.get("version") != VERSION:
        raise ValueError(f"{path} has model-file version {blob.get('version')}, this code reads "
                         f"version {VERSION}")
    try:
        config = json.loads(blob["config"])
        config["model"] = _tuples(config["model"])
        params = blob["params"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is a damaged bsmamba2-jax model file (its config or params "
                         f"cannot be read: {type(e).__name__}: {e}); export it again with "
                         "`python -m bsmamba2_jax.export WORKDIR OUT`") from e
    return params, config


def export(checkpoint: str | Path, out: str | Path, weights: str | None = None) -> Path:
    """Weights of a training checkpoint (workdir or step dir) or of the authors' PyTorch
    checkpoint -> one model file.

    weights: "ema" or "raw"; None: EMA for a training checkpoint, raw (the published state_dict,
      as `bsmamba2_jax.convert`) for a PyTorch file.
    Raises OutputPathError (before reading anything) when `out` is the checkpoint or lies in a
    run (`write_guard.check_output`), WriteError when `out` cannot be written.
    """
    from bsmamba2_jax.loading import read_weights

    check_output(out, [checkpoint], name="OUT")
    params, config = read_weights(checkpoint, weights)
    extra = {"step": config["step"], "weights": config["weights"]}
    if "checkpoint" in config:  # what bsmamba2_jax.convert records for a PyTorch file
        extra["source"] = config["checkpoint"]
    return save_model(out, params, config, **extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bsmamba2_jax.export",
        description="Export the weights of a training checkpoint (or of the authors' PyTorch "
                    "checkpoint) to one model file.")
    parser.add_argument("checkpoint", help="train.py workdir (latest step), a step directory or "
                                           "the authors' .ckpt")
    parser.add_argument("out", help="output model file, e.g. bsmamba2.msgpack (not the input, "
                                    "not inside the run read)")
    parser.add_argument("--weights", choices=("ema", "raw"), default=None,
                        help="default: ema for a training checkpoint, raw (the state_dict) for "
                             "a PyTorch file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"{out} is a folder; give a file name such as {out / 'bsmamba2.msgpack'}")
    try:
        path = export(args.checkpoint, out, args.weights)
    except OutputPathError as e:
        parser.error(str(e))
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, a failed write
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
