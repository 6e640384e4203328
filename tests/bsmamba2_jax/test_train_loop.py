"""train.py end to end on the tiny config: resume equality, half-written checkpoints, SIGTERM.

Every run is a fresh `python train.py` process (as a user runs it); they share one persistent
compilation cache so only the first run compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bsmamba2_jax.train.checkpoint import load_ema_params

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def train_cmd(workdir: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config=configs/bsmamba2.py:tiny",
            f"--workdir={workdir}", f"--config.data.root={root}",
            "--config.data.segment_seconds=0.25", "--config.data.validation_max_segments=2",
            f"--config.total_steps={steps}", *extra]


def env(cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def train(workdir, root, steps, cache, *extra) -> str:
    proc = subprocess.run(train_cmd(workdir, root, steps, *extra), cwd=REPO, env=env(cache),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def restore_numpy(step_dir: Path, item: str):
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(step_dir / item).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ocp.PyTreeCheckpointer().restore(step_dir / item,
                                                args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(tmp_path, synthetic_root, compile_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = train(straight, synthetic_root, 6, compile_cache)
    assert "Starting at step 0" in log
    train(resumed, synthetic_root, 3, compile_cache)
    assert (resumed / "checkpoints" / "3").is_dir()
    log = train(resumed, synthetic_root, 6, compile_cache)
    assert "Resuming at step 3" in log

    # The straight run saved step 3 asynchronously while training went on with donated
    # buffers: that checkpoint must still equal the one the stopped run wrote at its end.
    assert_trees_equal(restore_numpy(straight / "checkpoints" / "3", "train_state"),
                       restore_numpy(resumed / "checkpoints" / "3", "train_state"))
    a = restore_numpy(straight / "checkpoints" / "6", "train_state")
    b = restore_numpy(resumed / "checkpoints" / "6", "train_state")
    assert int(a["step"]) == int(b["step"]) == 6
    assert_trees_equal(a, b)  # params, optimizer state, rng, counters
    ema_a, config_a = load_ema_params(straight)
    ema_b, _ = load_ema_params(resumed / "checkpoints" / "6")
    assert_trees_equal(ema_a, ema_b)
    assert config_a.total_steps == 6 and config_a.model.band_widths == (16, 32, 64, 128, 256, 529)
    # The data iterators stopped at the same position, so the data order was the same.
    it_a = json.loads((straight / "checkpoints/6/data_iter/process_0-of-1.json").read_text())
    it_b = json.loads((resumed / "checkpoints/6/data_iter/process_0-of-1.json").read_text())
    assert it_a == it_b
    # Logs and metrics were written, with the validation uSDR and the mixture baseline.
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    val = [r for r in records if "val/usdr" in r]
    assert len(val) == 1 and np.isfinite(val[0]["val/usdr"])
    assert "val/usdr_mixture_baseline" in val[0]
    assert json.loads((straight / "config.json").read_text())["total_steps"] == 6
    assert (straight / "best").is_dir()

    # A half-written step (a save cut short) and a step directory with garbage are skipped.
    ckpts = resumed / "checkpoints"
    (ckpts / "9.orbax-checkpoint-tmp-1234" / "train_state").mkdir(parents=True)
    (ckpts / "9.orbax-checkpoint-tmp-1234" / "train_state" / "junk").write_bytes(b"\0" * 10)
    (ckpts / "8" / "train_state").mkdir(parents=True)
    (ckpts / "8" / "train_state" / "_METADATA").write_text("{not json")
    log = train(resumed, synthetic_root, 7, compile_cache)
    assert "Skipping unreadable checkpoint step 8" in log
    assert "Resuming at step 6" in log
    assert int(restore_numpy(ckpts / "7", "train_state")["step"]) == 7


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, synthetic_root, compile_cache):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(workdir, synthetic_root, 10_000), cwd=REPO,
                            env=env(compile_cache), stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 600
    for line in proc.stderr:  # wait until training is under way
        lines.append(line)
        if "step 2/10000" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-4000:]
    assert "Received signal" in log and "Stopped at step" in log
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 2
    state = restore_numpy(workdir / "checkpoints" / str(max(steps)), "train_state")
    assert int(state["step"]) == max(steps)
