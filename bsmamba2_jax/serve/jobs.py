"""The separation jobs of `bsmamba2-serve`: a queue run one job at a time on one model.

A job is one uploaded file in its own folder, `ROOT/<job id>/`, named by a random id that the
server makes (`secrets.token_urlsafe`): the folder holds the upload and, once separated, the two
stems, and nothing a client sends ever becomes part of a path. Its life:

    new_job -> (the caller writes job.upload) -> start: the CLI's input checks, then "queued"
    -> "running" (segments counted by the CLI's streaming separator) -> "done" | "failed"
    -> removed `ttl` seconds after it ended, on `delete`, or with everything on `close`.

One worker thread runs the jobs in order, so there is only ever one separation (and one batch
of model memory) at a time; the web server's threads only read job states and add jobs. A crash
inside one job fails that job, with its message, and the worker goes on with the next.

This module needs no web library: the tests drive it directly with a stand-in model.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bsmamba2_jax.separate_cli import (
    FORMATS,
    NONFINITE,
    STEMS,
    InputInfo,
    OutputPlan,
    SeparationError,
    Separator,
    scan_input,
    segment_plan,
    separate_file,
)

STATES = ("queued", "running", "done", "failed")
MAX_NAME = 200  # characters of a client's file name kept for display


class JobCancelled(Exception):
    """Raised in the worker to stop a job that was deleted while it ran."""


def display_name(raw: str | None) -> str:
    """A client's file name made safe to show and to offer as a download name: its last path
    component, without control characters, at most MAX_NAME characters ("upload" if empty).
    It is never used as a path on the server."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:MAX_NAME] or "upload"


def _base(name: str) -> str:
    """The download stem of a display name: "My song.flac" -> "My song"."""
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return stem.strip(". ") or "upload"


@dataclasses.dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One file's separation. Fields are written by the queue only (under its lock)."""

    id: str  # random, url-safe; the only handle a client has
    name: str  # the client's file name (display_name), for messages and download names
    fmt: str  # a key of separate_cli.FORMATS
    folder: Path  # ROOT/<id>: everything of this job, and nothing else
    state: str = "receiving"  # then one of STATES
    info: InputInfo | None = None  # what the input check found
    segments_done: int = 0
    segments_total: int = 0
    error: str | None = None  # in words, naming the file by `name`
    warnings: list[str] = dataclasses.field(default_factory=list)
    ended: float | None = None  # time.monotonic() when done or failed
    deleted: bool = False  # asked to stop (deleted or shut down) while it ran

    @property
    def upload(self) -> Path:
        return self.folder / "upload"  # no extension: the reader decides what the bytes are

    def output(self, stem: str) -> Path:
        return self.folder / f"{stem}.{FORMATS[self.fmt][2]}"

    def download_name(self, stem: str) -> str:
        return f"{_base(self.name)}_{stem}.{FORMATS[self.fmt][2]}"

    def in_words(self, text: str) -> str:
        """A message of the CLI's with this job's server paths replaced by what the client
        knows: the upload by its file name, an output by "<name> <stem>"."""
        for stem in STEMS:
            text = text.replace(str(self.output(stem)), f"{self.name} {stem}")
        return text.replace(str(self.upload), self.name).replace(str(self.folder), self.name)


class JobQueue:
    """Jobs in ROOT, run one at a time with `separator` on a worker thread.

    ttl: seconds a finished (done or failed) job and its files are kept.
    nonfinite: the CLI's --nonfinite ("error" fails a file with NaN/Inf samples, "zero" zeroes
      them with a warning).
    """

    def __init__(self, separator: Separator, root: str | Path, *, ttl: float = 3600.0,
                 nonfinite: str = "error"):
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE}")
        if not ttl > 0:
            raise ValueError(f"ttl={ttl} must be a positive number of seconds")
        self.separator, self.ttl, self.nonfinite = separator, float(ttl), nonfinite
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._closed = False
        self._stop = threading.Event()  # set by close: ends the sweeps
        self._worker = threading.Thread(target=self._work, name="serve-jobs", daemon=True)
        self._janitor = threading.Thread(target=self._sweep, name="serve-ttl", daemon=True)
        self._worker.start()
        self._janitor.start()

    # ------------------------------------------------------------------------- the web side

    def new_job(self, name: str, fmt: str) -> Job:
        """A job with an empty folder, to receive the upload at `job.upload`; not yet visible
        to `get` (the caller then `start`s or `discard`s it)."""
        if fmt not in FORMATS:
            raise ValueError(f"format={fmt!r} is not one of {sorted(FORMATS)}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            while (job_id := secrets.token_urlsafe(16)) in self._jobs:
                pass  # 128 random bits: never in practice
            job = Job(job_id, display_name(name), fmt, self.root / job_id)
            job.folder.mkdir()
            return job

    def start(self, job: Job) -> Job:
        """Checks the received upload with the CLI's reader and queues the job.

        Raises SeparationError, in words naming the client's file, when the upload is not audio
        the model can take (not decodable, empty, truncated, > 2 channels, NaN/Inf with
        nonfinite="error"); the job is then discarded. May take a second per minute of audio:
        call it off the server's event loop.
        """
        try:
            info = scan_input(job.upload, self.nonfinite)
        except SeparationError as e:
            self.discard(job)
            raise SeparationError(job.in_words(str(e))) from None
        total = segment_plan(self.separator, info).count
        with self._lock:
            if self._closed:
                self.discard(job)
                raise RuntimeError("the server is shutting down")
            job.info, job.segments_total, job.state = info, total, "queued"
            if info.nonfinite:
                job.warnings.append(f"{job.name}: {info.nonfinite} non-finite samples (NaN or "
                                    "Inf) replaced by zeros (the server runs with --nonfinite "
                                    "zero)")
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def discard(self, job: Job) -> None:
        """Removes a job that never started (an upload refused or cut off) and its folder."""
        shutil.rmtree(job.folder, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Removes a job and its files; a running one stops after its current batch (its files
        go when it has stopped). False if there is no such job."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return False
            if job is self._running:
                job.deleted = True  # the worker removes the folder once the job has stopped
                return True
            if job in self._waiting:
                self._waiting.remove(job)
        shutil.rmtree(job.folder, ignore_errors=True)
        return True

    def view(self, job: Job) -> dict[str, Any]:
        """A JSON-able snapshot of one job: its state, place in the queue (`ahead`: jobs to
        run before it, the running one included; None unless queued), progress in segments,
        the error or warnings in words, and `expires_in` seconds once it has ended."""
        with self._lock:
            ahead = None
            if job.state == "queued" and job in self._waiting:
                ahead = list(self._waiting).index(job) + (self._running is not None)
            info = job.info
            return {
                "id": job.id,
                "name": job.name,
                "format": job.fmt,
                "state": job.state,
                "ahead": ahead,
                "segments_done": job.segments_done,
                "segments_total": job.segments_total,
                "seconds": None if info is None else info.frames / info.rate,
                "sample_rate": None if info is None else info.rate,
                "channels": None if info is None else info.channels,
                "error": job.error,
                "warnings": list(job.warnings),
                "expires_in": (None if job.ended is None else
                               max(0.0, job.ended + self.ttl - time.monotonic())),
            }

    def close(self) -> None:
        """Stops the worker (a running job after its current batch) and removes every job and
        ROOT itself. Idempotent."""
        with self._lock:
            self._closed = True
            if self._running is not None:
                self._running.deleted = True
            self._waiting.clear()
            self._jobs.clear()
            self._lock.notify_all()
        self._stop.set()
        for thread in (self._worker, self._janitor):
            if thread is not threading.current_thread():
                thread.join(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------- the worker

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
                job.state = "running"
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    gone = job.deleted
                if gone:
                    shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: Job) -> None:
        def progress(real: int) -> None:
            job.segments_done += real
            if job.deleted:
                raise JobCancelled

        outputs = {stem: job.output(stem) for stem in STEMS}
        try:
            result = separate_file(self.separator, job.info, OutputPlan(outputs), job.fmt,
                                   on_batch=progress)
        except JobCancelled:
            return
        except Exception as e:  # noqa: BLE001 - one job's failure, whatever it is, is its own
            if not isinstance(e, SeparationError):
                print(f"error in job {job.id} ({job.name}):", file=sys.stderr)
                traceback.print_exc()
                e = f"{job.name}: separation failed: {type(e).__name__}: {e}"
            self._end(job, "failed", error=job.in_words(str(e)))
            return
        self._end(job, "done", warnings=[job.in_words(w) for w in result.warnings])

    def _end(self, job: Job, state: str, *, error: str | None = None,
             warnings: list[str] = ()) -> None:
        job.upload.unlink(missing_ok=True)  # the stems are all that is served
        with self._lock:
            job.error = error
            job.warnings += warnings
            job.state, job.ended = state, time.monotonic()

    # ------------------------------------------------------------------------- time to live

    def expire(self) -> list[str]:
        """Removes the jobs that ended more than `ttl` seconds ago; returns their ids."""
        now = time.monotonic()
        with self._lock:
            old = [j for j in self._jobs.values()
                   if j.ended is not None and now - j.ended >= self.ttl]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            shutil.rmtree(job.folder, ignore_errors=True)
        return [job.id for job in old]

    def _sweep(self) -> None:
        while not self._stop.wait(timeout=min(30.0, self.ttl / 4)):
            self.expire()
