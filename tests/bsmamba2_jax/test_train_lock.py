"""One process per workdir: a second launch (training or --restart) is refused naming the
holder's pid and host; a killed holder's lock is free again."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bsmamba2_jax.train import workdir as workdir_lib
from bsmamba2_jax.train.lock import LOCK_FILE, WorkdirInUse, WorkdirLock
from tests.bsmamba2_jax.train_helpers import tiny_config
from train import train_and_evaluate

REPO = Path(__file__).resolve().parents[2]
# Another process that takes the lock and holds it until its stdin closes (or it is killed).
HOLDER = """
import sys
from bsmamba2_jax.train.lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


class Holder:
    """A process holding `workdir`'s lock for the duration of a `with` block."""

    def __init__(self, workdir: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> subprocess.Popen:
        assert self.proc.stdout.readline().strip() == "locked"
        return self.proc

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=60)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_second_process_is_refused_and_a_killed_holders_lock_is_free(tmp_path, caplog):
    with Holder(tmp_path) as holder:
        with pytest.raises(WorkdirInUse) as e:
            WorkdirLock(tmp_path).acquire()
        message = str(e.value)
        assert f"--workdir={tmp_path} is in use by pid {holder.pid} on host " \
               f"{socket.gethostname()}" in message
        assert f"kill {holder.pid}" in message and "another --workdir" in message
        assert "\n" not in message
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock
        holder.wait(timeout=60)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level(logging.INFO):
        lock = WorkdirLock(tmp_path).acquire()
    assert f"pid {holder.pid}" in caplog.text and "no longer holds it" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # names no holder once released
    lock.release()  # idempotent


def test_train_and_restart_refuse_a_locked_workdir_and_change_nothing(tmp_path):
    config = tiny_config()
    config.data.root = str(tmp_path / "no-data-needed")  # the lock is taken before any data
    workdir_lib.record_config(tmp_path, config, workdir_lib.LaunchPlan(False, {}), 0)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    with Holder(tmp_path) as holder:
        before = snapshot(tmp_path)
        for restart in (False, True):
            with pytest.raises(WorkdirInUse, match=f"in use by pid {holder.pid}"):
                train_and_evaluate(config, tmp_path, restart=restart)
            assert snapshot(tmp_path) == before  # --restart moved nothing aside


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_lock_in_a_read_only_workdir_is_named(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"cannot be written \(Permission denied"):
            WorkdirLock(tmp_path).acquire()
    finally:
        tmp_path.chmod(0o755)
