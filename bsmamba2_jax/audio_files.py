"""Reading audio files with the checks that keep a damaged file from being used without a word.

One home for what every reader of audio checks: the data pipeline (training and validation stems,
`bsmamba2_jax.data`), evaluation (test tracks, `bsmamba2_jax.eval_io`) and `bsmamba2-separate`
(its inputs, `bsmamba2_jax.separate_cli`). Each check raises `AudioFileError` naming the file,
what is wrong with it and the fix.

- Truncation: libsndfile clamps a WAV's length to the bytes present, so a cut-off copy reads as
  a shorter file, and a track whose five files were cut the same way still has equal lengths.
  `check_complete` compares the frames the RIFF `data` chunk promises with those present.
- Short reads: a decode that ends before the frames the file's header gives (a damaged FLAC).
- Non-finite samples: one NaN or Inf in a float WAV spreads through every sum it enters (an
  activity index, a batch's loss, a track's score); `check_finite` names the first one's time.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np


class AudioFileError(ValueError):
    """An audio file that cannot be used as it is; the message names the file and the fix."""


def wav_header_frames(path: str | os.PathLike) -> int | None:
    """Frames that a RIFF/WAVE file's `data` chunk header promises, or None if not a plain WAV.

    None also for a streamed WAV whose writer left the size unset (0 or 0xFFFFFFFF).
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(size)
                if len(fmt) < 14:
                    return None
                block_align = struct.unpack("<H", fmt[12:14])[0]
                if size % 2:
                    f.seek(1, os.SEEK_CUR)
            elif cid == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                f.seek(size + size % 2, os.SEEK_CUR)


def check_complete(path: str | os.PathLike, frames: int, rate: int,
                   file_format: str | None = None) -> None:
    """AudioFileError if `path` is a WAV whose header promises more than the `frames` it holds.

    Args:
      path: the file. frames, rate: what libsndfile reports for it (`soundfile.info`).
      file_format: libsndfile's major format ("WAV", "FLAC", ...); None = look at the bytes.
        Only WAV has a header that states its length; other formats are checked on reading.
    """
    if file_format not in (None, "WAV"):
        return
    promised = wav_header_frames(path)
    if promised is not None and promised > frames:
        raise AudioFileError(
            f"{path}: truncated: its header promises {promised} frames "
            f"({promised / rate:.2f} s) but the file holds {frames} ({frames / rate:.2f} s); "
            "get a complete copy of the file")


def first_nonfinite(audio: np.ndarray) -> tuple[int, int]:
    """(number of NaN/Inf samples, sample index of the first one or -1) of (channels, samples)."""
    finite = np.isfinite(audio)
    bad = int(finite.size - np.count_nonzero(finite))
    if not bad:
        return 0, -1
    return bad, int(np.argmin(finite.all(axis=0)))


def check_finite(path: str | os.PathLike, audio: np.ndarray, rate: int) -> None:
    """AudioFileError naming the file and the first bad sample's time if `audio` holds NaN/Inf.

    Args:
      audio: (channels, samples), the file's content.
    """
    bad, first = first_nonfinite(audio)
    if bad:
        raise AudioFileError(
            f"{path}: {bad} non-finite sample(s) (NaN or Inf), the first at {first / rate:.3f} s "
            f"(sample {first}); repair the file or replace it with a clean copy")


def read_checked(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Reads a whole audio file, checked for truncation, a short read and NaN/Inf samples.

    Returns:
      ((channels, samples) float32 C-contiguous, sample rate). Raises AudioFileError naming the
      file for an unreadable, truncated, short-read or non-finite one.
    """
    import soundfile as sf

    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            frames, rate = int(f.frames), int(f.samplerate)
            check_complete(path, frames, rate, f.format)
            audio = f.read(dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:
        raise AudioFileError(f"{path}: cannot read it as audio ({e}); the file is damaged, "
                             "truncated or not audio: replace it with a complete copy") from e
    if len(audio) != frames:
        raise AudioFileError(f"{path}: short read: {len(audio)} of the {frames} frames its "
                             "header gives; the file is truncated or damaged: replace it")
    audio = np.ascontiguousarray(audio.T)
    check_finite(path, audio, rate)
    return audio, rate
