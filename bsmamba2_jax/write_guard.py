"""Where a command may write: never over its inputs, never into a run or step directory it reads.

    from bsmamba2_jax.write_guard import OutputGuard, check_output
    check_output("model.msgpack", ["runs/demo"], name="OUT")     # raises OutputPathError if unsafe
    guard = OutputGuard(inputs)                                   # many outputs: resolve once
    guard.check(out_dir / "song" / "vocals.wav", name="its output")

Every command that writes files (`python -m bsmamba2_jax.export`, `python -m bsmamba2_jax.convert`,
`bsmamba2-separate`, `evaluate.py`) calls `check_output` on what it will write before doing any
work. What it protects, for each path the command reads:
  - a file: the file itself (also through symbolic or hard links);
  - a folder inside a train.py run (the workdir itself, a selection folder such as
    `checkpoints/`, or a step directory `checkpoints/<step>/`): the whole run, because reading a
    step reads the run too (its `config.json`), and resuming needs it as train.py left it. The
    run's `eval/` folder is the one exception: evaluation results belong there (evaluate.py
    writes them, `--restart` moves them aside with the run);
  - any other folder: the folder.
An output must not be an input, must not lie inside a protected folder, nor inside any train.py
run that has saved a step (read by this command or not; its `eval/` excepted), and (when it is
written as a whole, a file or a folder the command fills) must not hold an input.

Writing itself: `write_error` turns the OSError of a failed write into a `WriteError` whose one
line names the file, says when the disk is full, and what to do.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterable
from pathlib import Path

# A run's folder for evaluation results (evaluate.py's RUN/eval/<split>/...); outputs may go there.
RESULTS_FOLDER = "eval"
# errno values that mean "no room left" (a full disk, or the user's quota).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class OutputPathError(ValueError):
    """An output that would write over an input, or into a run or step directory being read."""


def _run_layout() -> tuple[str, tuple[str, ...]]:
    """(the run config's file name, the run's folders of step directories)."""
    from bsmamba2_jax.train import checkpoint

    return checkpoint.CONFIG_JSON, (checkpoint.CHECKPOINTS, checkpoint.BEST_USDR,
                                    checkpoint.BEST_LOSS, checkpoint.LEGACY_BEST)


def run_of(folder: str | Path) -> Path | None:
    """The train.py run that `folder` belongs to, or None.

    `folder` (resolved) is a run when it holds the run's config.json or a checkpoints/ folder;
    it belongs to a run when it is a selection folder of one (RUN/checkpoints) or a step
    directory (RUN/checkpoints/<step>), or anything below them.
    """
    folder = Path(folder).resolve()
    config_json, step_folders = _run_layout()
    for candidate in (folder, *folder.parents):
        if not ((candidate / config_json).is_file() or (candidate / step_folders[0]).is_dir()):
            continue
        inside = folder.relative_to(candidate).parts
        if not inside or inside[0] in step_folders:
            return candidate
    return None


def _run_around(path: Path) -> Path | None:
    """The train.py run that a resolved `path` lies in, read or not: the nearest folder above it
    holding both the run's config.json and its checkpoints/ (a run that has saved a step)."""
    config_json, step_folders = _run_layout()
    for candidate in path.parents:
        if (candidate / config_json).is_file() and (candidate / step_folders[0]).is_dir():
            return candidate
    return None


@dataclasses.dataclass(frozen=True)
class _Area:
    """A folder that reading `given` protects."""

    folder: Path  # resolved
    what: str  # "the train.py run" or "the input folder"
    allowed: Path | None  # the part of it outputs may go to (a run's eval/)
    given: Path | None  # the read path as the user gave it; None: a run the output lands in


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class OutputGuard:
    """What a command reads, resolved once; `check(out)` for each thing it will write.

    `check_output(out, reads)` is `OutputGuard(reads).check(out)`; a command with many outputs
    (bsmamba2-separate) builds one guard, so checking costs O(outputs + inputs) path lookups.
    """

    def __init__(self, reads: Iterable[str | Path]):
        self._files: dict[Path, Path] = {}  # resolved file -> as given
        self._inodes: dict[tuple[int, int], Path] = {}  # (device, inode) of a file -> as given
        self._areas: list[_Area] = []
        self._held: dict[Path, Path] = {}  # every read and each of its folders -> a read there
        for read in reads:
            given = Path(read)
            if not given.exists():
                continue  # nothing there to protect (the command reports it missing)
            path = given.resolve()
            if path.is_dir():
                run = run_of(path)
                self._areas.append(_Area(path, "the input folder", None, given) if run is None
                                   else _Area(run, "the train.py run", run / RESULTS_FOLDER,
                                              given))
            else:
                self._files[path] = given
                stat = path.stat()
                self._inodes[(stat.st_dev, stat.st_ino)] = given
            for folder in (path, *path.parents):
                self._held.setdefault(folder, given)

    def _same_file(self, out: Path) -> Path | None:
        try:
            stat = out.stat()
        except OSError:
            return None
        return self._inodes.get((stat.st_dev, stat.st_ino))

    def check(self, out: str | Path, *, name: str = "the output", whole: bool = True,
              fix: str | None = None) -> None:
        """Raises OutputPathError unless writing `out` leaves every read path intact.

        Args:
          out: a file or folder the command will write (it need not exist yet).
          name: how the message names `out`: its flag ("OUT", "-o") or a phrase.
          whole: `out` is written as a whole (a file, or a folder the command fills or
            replaces), so no input may lie inside it. False for a folder that only receives new
            entries beside what it holds (bsmamba2-separate's -o, whose OUT/<name>/ files are
            checked one by one).
          fix: what to do when `out` lies inside a folder that is read, if not "write outside
            it, e.g. <a path beside it>" (evaluate.py: pass the run itself as --workdir).
        """
        out_path = Path(out)
        target = out_path.resolve()
        same = self._files.get(target) or self._same_file(out_path)
        if same is not None:
            raise OutputPathError(f"{name} {out} is the input {same}: inputs are never "
                                  "overwritten; write the output elsewhere")
        # Any run's config and checkpoints are train.py's alone, whether this command reads
        # them or not (`convert IN.ckpt RUN/config.json` would end that run too).
        around = _run_around(target)
        landed = [] if around is None else [_Area(around, "the train.py run",
                                                  around / RESULTS_FOLDER, None)]
        for area in (*self._areas, *landed):
            if _within(target, area.folder) and not (area.allowed and
                                                      _within(target, area.allowed)):
                why = (f"its config, checkpoints and metrics must stay as train.py wrote them "
                       f"(only its {RESULTS_FOLDER}/ folder takes results)" if area.allowed else
                       "a command never writes into what it reads")
                read = "" if area.given is None else f" that this command reads ({area.given})"
                example = area.folder.parent / f"{area.folder.name}-{out_path.name}"
                raise OutputPathError(
                    f"{name} {out} lies inside {area.what} {area.folder}{read}: {why}; "
                    f"{fix or f'write outside it, e.g. {example}'}")
        if whole and target in self._held:
            raise OutputPathError(f"{name} {out} holds the input {self._held[target]}, which the "
                                  "output could replace (inputs are never overwritten); write "
                                  "the output elsewhere")


def check_output(out: str | Path, reads: Iterable[str | Path], *, name: str = "the output",
                 whole: bool = True, fix: str | None = None) -> None:
    """Raises OutputPathError (naming `out`, the input and the fix) unless writing `out` leaves
    everything in `reads` intact; see `OutputGuard.check` for the arguments."""
    OutputGuard(reads).check(out, name=name, whole=whole, fix=fix)


class WriteError(OSError):
    """A write that failed; the message names the file, the cause and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: str | Path, error: OSError, fix: str) -> WriteError:
    """The WriteError for a failed write of `path` (the caller has removed what it left): the
    file, the cause (a full disk named as such) and `fix`, e.g. "or choose another -o folder"."""
    if error.errno in DISK_FULL:
        cause = f"the disk is full ({os.strerror(error.errno)})"
        todo = f"free some space there {fix}"
    else:
        cause = error.strerror or str(error)
        todo = f"check that folder {fix}"
    return WriteError(error.errno, f"cannot write {path}: {cause}; nothing was left behind: "
                                   f"{todo}")
