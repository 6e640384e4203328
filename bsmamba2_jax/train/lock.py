"""One process writes into a run at a time: an advisory lock on WORKDIR/run.lock.

    lock = WorkdirLock(workdir).acquire()   # WorkdirInUse names the holder's pid and host
    try:
        ...                                 # train, move the run aside (--restart)
    finally:
        lock.release()

The lock is a POSIX record lock (`fcntl.lockf`). The kernel drops it when the holding process
ends, however it ends (SIGKILL, a crash, a lost host on NFS once its lease runs out), so a dead
holder is never in the way; forked children (data-loader workers) do not inherit it; NFS honours
it across hosts. While held, the file names the holder (pid, host, start time, command) so a
second launch can say who it is; release empties it, so a file that still names a holder the
lock no longer has was left by a process that was killed. Readers (evaluation writing under
RUN/eval/, export) take no lock: they may run beside training.

A record lock belongs to the process, not to this object: a second WorkdirLock on the same
workdir in the same process succeeds, and releasing either releases both. One process takes it
once (train.py's process 0).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class WorkdirInUse(ValueError):
    """Another process holds the workdir's lock (the message names it and the ways out)."""


def _read_holder(fd: int) -> dict:
    """The holder the lock file names; {} if it names none (or is not ours to read)."""
    text = os.pread(fd, 65536, 0)
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    """'pid 123 on host gpu7 since 2024-12-01 10:00:00 (python train.py ...)'."""
    if not holder:
        return "a process that has not written its pid yet (it is starting)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("since"):
        text += f" since {holder['since']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


class WorkdirLock:
    """The lock of one workdir; `acquire` creates the workdir and the lock file if needed."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock without waiting. Raises WorkdirInUse when another process holds it,
        and ValueError naming the path when the workdir cannot be written."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"--workdir={self.workdir} cannot be written ({e.strerror}: "
                             f"{e.filename}); make it writable or pass another --workdir"
                             ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                # No record locks on this file system (some FUSE and object-store mounts).
                os.close(fd)
                logging.warning("%s cannot be locked on this file system (%s): make sure no "
                                "other process trains in %s", self.path, e.strerror,
                                self.workdir)
                return self
            holder = _read_holder(fd)
            os.close(fd)
            pid = holder.get("pid", "PID")
            raise WorkdirInUse(
                f"--workdir={self.workdir} is in use by {describe(holder)}: two processes on "
                "one run would write the same checkpoint steps and metrics. Nothing was "
                "changed. Wait for it to end, stop it (`kill "
                f"{pid}` on {holder.get('host', 'its host')}: SIGTERM saves a checkpoint), or "
                "pass another --workdir") from None
        previous = _read_holder(fd)
        if previous:
            logging.info("%s named %s, which no longer holds it (killed or crashed); taking "
                         "it over", self.path, describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as e:  # e.g. a full disk
            os.close(fd)
            raise ValueError(f"--workdir={self.workdir} cannot be written ({e.strerror}: "
                             f"{self.path}); free space or pass another --workdir") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file (it names no holder) and releases the lock; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the record lock
