"""Where to listen in a track: its vocal onsets and its silent stretch, and short clips of them.

The paper argues with the places where a vocal model is hard to judge by one number: the moment
the vocals come in after a silence (its Table III scores stretches by their length) and the
stretches where the reference vocals are silent and any output is leakage (its Fig. 3). Both are
found on the reference vocals with the definitions the tables use (docs/DESIGN.md#evaluation):

- an onset is the first sample of a vocal-active stretch (`metrics.active_stretches`: 100 ms
  frames within 40 dB of the loudest one and above -60 dBFS) that does not start the signal;
  its silence is the inactive time before it;
- the silent stretch is the longest run of 1 s frames where the reference vocals are silent
  (`metrics.vocal_silent_frames`): where the silent-region leakage is measured.

A clip of an onset starts `ONSET_LEAD` of its length before the onset (silence, then the
vocals); a clip of a silent stretch is centred on it. Clips stay inside the signal.

Evaluation keeps each track's clips of the estimate (`save`), since the estimate of a whole track
is not stored by default; the HTML report (`bsmamba2_jax.html_report`) reads them back (`load`)
beside the same clips of the mixture and the reference. Training's TensorBoard examples pick
validation windows with an onset after a silence (`bsmamba2_jax.train.validate`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax import eval_io, metrics

EXCERPT_SECONDS = 4.0  # length of one clip
ONSET_LEAD = 0.375  # fraction of an onset's clip before the onset: 1.5 s of a 4 s clip
VERSION = 1  # of the stored excerpts.json; another version is stored again
INDEX_FILE = "excerpts.json"


@dataclasses.dataclass(frozen=True)
class Onset:
    """A vocal onset: the stretch starts at sample `at` after `silence` inactive samples (counted
    from the signal's start for the first stretch)."""

    at: int
    silence: int


@dataclasses.dataclass(frozen=True)
class Excerpt:
    """A clip [start, stop) in samples; kind "onset" (at = the onset, seconds = the silence
    before it) or "silence" (at = the silent stretch's first sample, seconds = its length)."""

    kind: str
    start: int
    stop: int
    at: int
    seconds: float

    def describe(self, rate: int) -> str:
        """One line for a reader: what the clip shows and where."""
        span = f"{clock(self.start / rate)}-{clock(self.stop / rate)}"
        if self.kind == "onset":
            return (f"vocal onset at {clock(self.at / rate)} after {self.seconds:.1f} s without "
                    f"vocals (clip {span})")
        return (f"silent reference vocals for {self.seconds:.0f} s from {clock(self.at / rate)} "
                f"(clip {span})")


def clock(seconds: float) -> str:
    """seconds -> m:ss.s"""
    minutes, rest = divmod(max(float(seconds), 0.0), 60.0)
    return f"{int(minutes)}:{rest:04.1f}"


def onsets(vocals: np.ndarray, rate: int) -> list[Onset]:
    """The onsets of a reference's vocal-active stretches, in time order.

    Args: vocals (channels, samples). A stretch starting at sample 0 is not an onset.
    """
    out, previous_stop = [], 0
    for start, stop in metrics.active_stretches(vocals, rate):
        if start > 0:
            out.append(Onset(start, start - previous_stop))
        previous_stop = stop
    return out


def clip_around(at: int, length: int, total: int, lead: float = ONSET_LEAD) -> int:
    """First sample of a `length`-sample clip with `lead` of it before `at`, inside [0, total)."""
    return int(min(max(at - int(round(lead * length)), 0), max(total - length, 0)))


def silent_stretch(vocals: np.ndarray, rate: int) -> tuple[int, int] | None:
    """[start, stop) samples of the longest run of silent 1 s frames of the reference vocals (the
    first of equal runs), or None when no frame is silent. Args: vocals (channels, samples)."""
    silent = metrics.vocal_silent_frames(vocals, rate)
    edges = np.diff(np.concatenate([[0], silent.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return None
    longest = int(np.argmax(stops - starts))
    return int(starts[longest]) * rate, int(stops[longest]) * rate


def choose(vocals: np.ndarray, rate: int, count: int,
           seconds: float = EXCERPT_SECONDS) -> list[Excerpt]:
    """Up to `count` clips of a track, in time order: its silent stretch (when it has one) and
    the onsets after the longest silences, no two onset clips overlapping.

    Args:
      vocals: the reference vocals, (channels, samples).
      count: clips wanted (>= 0); fewer when the track has fewer onsets.
      seconds: clip length (the whole track when shorter).
    """
    total = vocals.shape[-1]
    length = min(int(round(seconds * rate)), total)
    chosen: list[Excerpt] = []
    silence = silent_stretch(vocals, rate) if count > 0 else None
    if silence is not None:
        a, b = silence
        start = min(max((a + b - length) // 2, 0), total - length)
        chosen.append(Excerpt("silence", start, start + length, a, (b - a) / rate))
    for onset in sorted(onsets(vocals, rate), key=lambda o: (-o.silence, o.at)):
        if len(chosen) >= count:
            break
        start = clip_around(onset.at, length, total)
        if any(c.kind == "onset" and start < c.stop and c.start < start + length
               for c in chosen):
            continue
        chosen.append(Excerpt("onset", start, start + length, onset.at, onset.silence / rate))
    return sorted(chosen, key=lambda c: (c.start, c.kind))


# ----------------------------------------------------------------------------- stored clips


def _spec(count: int, seconds: float) -> dict[str, Any]:
    return {"version": VERSION, "count": int(count), "seconds": float(seconds)}


def clip_file(folder: Path, i: int) -> Path:
    """The estimate's clip of excerpt `i` (16-bit FLAC: for listening, not for scoring)."""
    return folder / f"{i}.flac"


def save(folder: str | Path, vocals: np.ndarray, estimate: np.ndarray, rate: int, count: int,
         seconds: float = EXCERPT_SECONDS) -> list[Excerpt]:
    """Chooses a track's excerpts from its reference vocals and stores the estimate's clips.

    Writes folder/<i>.flac for each excerpt, then folder/excerpts.json (last: it marks the set
    complete). Args: vocals, estimate (channels, samples).
    """
    folder = Path(folder)
    chosen = choose(vocals, rate, count, seconds)
    for i, c in enumerate(chosen):
        clip = np.clip(estimate[:, c.start:c.stop], -1.0, 1.0)  # 16 bits clip at full scale
        eval_io.write_audio(clip_file(folder, i), clip, rate, subtype="PCM_16")
    eval_io.write_json(folder / INDEX_FILE, {**_spec(count, seconds),
                                             "excerpts": [dataclasses.asdict(c) for c in chosen]},
                       indent=1)
    return chosen


def load(folder: str | Path, count: int | None = None,
         seconds: float = EXCERPT_SECONDS) -> list[Excerpt] | None:
    """The stored excerpts of a track, or None when there is no complete set (or, given `count`,
    none made for `count` clips of `seconds`)."""
    folder = Path(folder)
    try:
        stored = json.loads((folder / INDEX_FILE).read_text())
        chosen = [Excerpt(**c) for c in stored["excerpts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    want = _spec(stored.get("count", -1) if count is None else count,
                 stored.get("seconds", seconds) if count is None else seconds)
    if {k: stored.get(k) for k in want} != want:
        return None
    if not all(clip_file(folder, i).is_file() for i in range(len(chosen))):
        return None
    return chosen
