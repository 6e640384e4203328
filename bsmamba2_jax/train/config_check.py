"""Checks of a run config before any work, and which fields a resumed run may change.

    check_config(config)                  # ValueError naming the field and the allowed range
    config_changes(old, new)              # {"model.dim": (32, 64), ...} of differing leaves
    incompatible(changes)                 # those a resume cannot take (not in RESUMABLE)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

# Fields a resumed run may change: how long and how often things happen, how the run executes,
# and the learning rate / clip. Everything else (model shape, data stream, optimizer structure,
# seed, validation set) defines the run: changing it on resume is an error.
RESUMABLE = (
    "total_steps", "log_every", "eval_every", "eval_batch_size", "ckpt_every",
    "keep_checkpoints", "keep_best", "async_checkpointing", "max_nonfinite_run",
    "compilation_cache", "tensorboard", "tensorboard_examples", "init_from",
    "optim.lr", "optim.clip_norm",
    "model.ssd_impl", "model.attn_impl", "model.remat", "model.group_tokens", "model.dtype",
    "model.chunk_size", "model.band_chunk_size",
    "mesh.data", "mesh.fsdp", "mesh.fsdp_min_size",
    "data.root", "data.num_workers", "data.worker_buffer_batches", "data.read_threads",
    "data.prefetch_batches",
)

_MAX_SEED = 2**32 - 1


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        tree = tuple(tree)
    return {prefix[:-1]: tree}


def config_changes(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (old value, new value)} for leaves present in both that differ.

    A field present on one side only (added or removed by a code change) is not a change of the
    run: it is not reported. Lists and tuples compare equal (JSON has no tuples).
    """
    a, b = _flat(old), _flat(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def incompatible(changes: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes a resumed run cannot take."""
    return {k: v for k, v in changes.items() if k not in RESUMABLE}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{field}={value!r} is out of range: it must be {allowed} "
                     f"(set --config.{field}=...)")


def _int_at_least(config, field: str, low: int) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(field, value, f"an integer >= {low}")


def _number(config, field: str, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> None:
    value = _get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(field, value, f"a finite number in {interval}")


def _get(config, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def check_config(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Raises ValueError for the first field out of its range, naming it and the range.

    Covers the loop timing, checkpointing, optimizer, EMA, data and mesh fields; the model's own
    fields are checked by building it (`BSMamba2` raises for a bad band split or dtype).
    process_count: processes of the run (the global batch is split between them).
    """
    for field in ("total_steps", "log_every", "ckpt_every", "keep_checkpoints",
                  "eval_batch_size", "max_nonfinite_run", "optim.accum_steps",
                  "data.batch_size", "data.examples_per_epoch", "data.validation_windows",
                  "data.activity_chunks", "data.read_threads", "data.prefetch_batches",
                  "data.worker_buffer_batches", "mesh.fsdp", "mesh.fsdp_min_size"):
        _int_at_least(config, field, 1)
    for field in ("eval_every", "keep_best", "data.num_workers", "data.synthetic_seed",
                  "model.group_tokens", "tensorboard_examples"):
        _int_at_least(config, field, 0)
    if config.mesh.data != -1:
        _int_at_least(config, "mesh.data", 1)
    if not isinstance(config.seed, int) or not 0 <= config.seed <= _MAX_SEED:
        _fail("seed", config.seed, f"an integer in [0, {_MAX_SEED}]")
    _number(config, "ema_decay", 0.0, 1.0, high_open=True)
    _number(config, "optim.lr", 0.0, math.inf, low_open=True, high_open=True)
    _number(config, "optim.b1", 0.0, 1.0, high_open=True)
    _number(config, "optim.b2", 0.0, 1.0, high_open=True)
    _number(config, "optim.eps", 0.0, math.inf, low_open=True, high_open=True)
    _number(config, "optim.weight_decay", 0.0, math.inf, high_open=True)
    _number(config, "optim.clip_norm", 0.0, math.inf, high_open=True)

    d = config.data
    if d.sample_rate != 44100:
        _fail("data.sample_rate", d.sample_rate, "44100 (MUSDB18-HQ's rate)")
    # The model needs more than n_fft / 2 samples (STFT reflect padding), the loss more than
    # 2048 (its 4096-point STFT).
    min_seconds = (max(config.model.n_fft // 2, 2048) + 1) / d.sample_rate
    _number(config, "data.segment_seconds", min_seconds, math.inf, high_open=True)
    _number(config, "data.silence_prob", 0.0, 1.0)
    _number(config, "data.gain_min", 0.0, math.inf, high_open=True)
    _number(config, "data.gain_max", d.gain_min, math.inf, high_open=True)
    _number(config, "data.activity_step_fraction", 0.0, 1.0, low_open=True)
    _number(config, "data.activity_quantile", 0.0, 1.0)
    _number(config, "data.activity_rms_floor", 0.0, math.inf, high_open=True)
    _number(config, "data.activity_min_fraction", 0.0, 1.0, high_open=True)
    if d.batch_size % process_count:
        _fail("data.batch_size", d.batch_size,
              f"a multiple of the {process_count} processes (each reads an equal share)")
    if not d.root:
        _int_at_least(config, "data.synthetic_valid_tracks", 1)
        _int_at_least(config, "data.synthetic_test_tracks", 1)
        _int_at_least(config, "data.synthetic_tracks", d.synthetic_valid_tracks + 1)
        _number(config, "data.synthetic_seconds", d.segment_seconds, math.inf,
                high_open=True)
