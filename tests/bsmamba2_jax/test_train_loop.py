"""train.py end to end on the tiny config: SIGKILL then resume is bit-identical, metrics are not
repeated, damaged and half-written checkpoints, an incompatible resume, SIGTERM, a second launch
on a running workdir.

Every run is a fresh `python train.py` process (as a user runs it); they share one persistent
compilation cache so only the first run compiles.
"""

from __future__ import annotations

import json
import os
import re
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
            "--config.data.segment_seconds=0.25", "--config.data.validation_windows=2",
            f"--config.total_steps={steps}", *extra]


def env(cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def train(workdir, root, steps, cache, *extra, returncode=0) -> str:
    proc = subprocess.run(train_cmd(workdir, root, steps, *extra), cwd=REPO, env=env(cache),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == returncode, proc.stderr[-4000:]
    return proc.stderr


def restore_numpy(step_dir: Path, item: str):
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(step_dir / item).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(step_dir / item, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "jax_cache" not in p.parts}


def kill_after_checkpoint(workdir, root, cache, step: int) -> None:
    """Starts a long run and SIGKILLs it once checkpoint `step` is complete and the run has
    logged a later step (so metrics of steps after the checkpoint exist)."""
    proc = subprocess.Popen(train_cmd(workdir, root, 10_000), cwd=REPO, env=env(cache),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    try:
        for line in proc.stderr:
            if f"step {step + 1}/10000" in line or time.time() > deadline:
                break
        while not (workdir / "checkpoints" / str(step)).is_dir() and time.time() < deadline:
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert (workdir / "checkpoints" / str(step)).is_dir()


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, synthetic_root, compile_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = train(straight, synthetic_root, 6, compile_cache)
    assert "Starting at step 0" in log
    kill_after_checkpoint(resumed, synthetic_root, compile_cache, 3)
    log = train(resumed, synthetic_root, 6, compile_cache)
    restored = int(log.split("Resuming at step ")[1].split(":")[0])
    assert restored in (3, 6)  # 6 only if the killed run got that far before the kill
    assert (resumed / "config.json").is_file()
    assert json.loads((resumed / "config.json").read_text())["total_steps"] == 10_000
    assert json.loads((resumed / f"config.{restored}.json").read_text())["total_steps"] == 6

    # Step 3 was saved asynchronously while training went on with donated buffers: both
    # runs must still have written the same state.
    assert_trees_equal(restore_numpy(straight / "checkpoints" / "3", "train_state"),
                       restore_numpy(resumed / "checkpoints" / "3", "train_state"))
    a = restore_numpy(straight / "checkpoints" / "6", "train_state")
    b = restore_numpy(resumed / "checkpoints" / "6", "train_state")
    assert int(a["step"]) == int(b["step"]) == 6
    assert_trees_equal(a, b)  # params, optimizer state, counters
    ema_a, config_a = load_ema_params(straight)
    ema_b, _ = load_ema_params(resumed / "checkpoints" / "6")
    assert_trees_equal(ema_a, ema_b)
    assert config_a.total_steps == 6 and config_a.model.band_widths == (16, 32, 64, 128, 256, 529)
    # The data iterators stopped at the same position, so the data order was the same.
    it_a = json.loads((straight / "checkpoints/6/data_iter/process_0-of-1.json").read_text())
    it_b = json.loads((resumed / "checkpoints/6/data_iter/process_0-of-1.json").read_text())
    assert it_a == it_b
    # Metrics: every step once, the replayed ones not doubled, the same losses as straight.
    train_a = [(r["step"], r["train/loss"]) for r in records(straight) if "train/loss" in r]
    train_b = [(r["step"], r["train/loss"]) for r in records(resumed) if "train/loss" in r]
    assert [s for s, _ in train_b] == [1, 2, 3, 4, 5, 6]
    assert train_a == train_b
    val = [r for r in records(straight) if "val/usdr" in r]
    assert len(val) == 1 and np.isfinite(val[0]["val/usdr"]) and val[0]["val/loss"] > 0
    assert "val/usdr_mixture_baseline" in val[0]
    assert (straight / "best_usdr" / "6" / "params").is_dir()
    assert (straight / "best_loss" / "6" / "ema_params").is_dir()

    # A half-written step (a save cut short) is ignored; a damaged newest step is moved aside,
    # training resumes before it and writes that step number again.
    ckpts = resumed / "checkpoints"
    (ckpts / "9.orbax-checkpoint-tmp-1234" / "train_state").mkdir(parents=True)
    (ckpts / "9.orbax-checkpoint-tmp-1234" / "train_state" / "junk").write_bytes(b"\0" * 10)
    (ckpts / "6" / "train_state" / "_METADATA").write_text("{not json")
    log = train(resumed, synthetic_root, 7, compile_cache)
    assert "Checkpoint step 6" in log and "moved it to 6.damaged-1" in log
    assert "Resuming at step 3" in log
    assert_trees_equal(restore_numpy(ckpts / "6", "train_state"), a)  # redone, the same
    assert int(restore_numpy(ckpts / "7", "train_state")["step"]) == 7
    assert (ckpts / "6.damaged-1" / "train_state").is_dir()  # kept

    # An incompatible config: one named error, exit code 2, the workdir untouched.
    before = snapshot(resumed)
    log = train(resumed, synthetic_root, 9, compile_cache, "--config.model.dim=64",
                returncode=2)
    assert re.search(r"model\.dim: 32 \(config\S*\.json, checkpoints/7, checkpoints/6, "
                     r"checkpoints/3\) -> 64 \(this launch\)", log) and "--restart" in log
    assert "Traceback" not in log
    assert snapshot(resumed) == before


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
    # A second launch on the running workdir, training or --restart, is refused by the lock.
    config_json = (workdir / "config.json").read_bytes()
    for extra in ((), ("--restart",)):
        log = train(workdir, synthetic_root, 10_000, compile_cache, *extra, returncode=2)
        assert f"is in use by pid {proc.pid} on host" in log and "Traceback" not in log
    assert not (workdir / "previous_runs").exists()  # --restart moved nothing aside
    assert (workdir / "config.json").read_bytes() == config_json
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-4000:]
    assert "Received signal" in log and "Stopped at step" in log
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 2
    state = restore_numpy(workdir / "checkpoints" / str(max(steps)), "train_state")
    assert int(state["step"]) == max(steps)
