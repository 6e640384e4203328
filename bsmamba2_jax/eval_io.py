"""Evaluation files: a track's stems in, estimates out, results tied to the weights that made them.

Layout of one evaluation run (evaluate.py writes it):

    WORKDIR/eval/<split>/<model key>/seg<S>_ov<O>_shifts<N>/
        tracks/<name>.json          every score of the track and its producer (model + settings)
        tracks/<name>.museval.json  full museval (SDR/ISR/SIR/SAR per frame) when asked
        audio/<name>/{vocals,accompaniment}.wav   estimates, when asked
        excerpts/<name>/            the estimate's clips for the HTML report (bsmamba2_jax.excerpts)
        scores.csv, summary.json, onset.json, onset.csv   (bsmamba2_jax.reports)
        report/report.html, report/media/   the HTML report (bsmamba2_jax.html_report)

The model key (`model_identity`) names the weights by step, kind and a digest of the parameters and
the model config, so the results of other weights never share a folder; each per-track file also
carries its producer, and a file whose producer differs from the current one is scored again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax import audio_files
from bsmamba2_jax.data.musdb import SAMPLE_RATE, STEMS

ACCOMPANIMENT_STEMS = tuple(s for s in STEMS if s != "vocals")


# ----------------------------------------------------------------------------- tracks and audio


def track_name(track: Any) -> str:
    """Name of a track from `bsmamba2_jax.data.list_tracks` (or a track folder path)."""
    if isinstance(track, (str, Path)):
        return Path(track).name
    return str(track.name)


def stem_path(track: Any, stem: str) -> Path:
    """Path of one stem's wav for a `bsmamba2_jax.data.Track` or a MUSDB18-HQ track folder."""
    if isinstance(track, (str, Path)):
        return Path(track) / f"{stem}.wav"
    paths = getattr(track, "paths", None)  # bsmamba2_jax.data.Track
    if isinstance(paths, Mapping) and stem in paths:
        return Path(paths[stem])
    raise ValueError(f"Track {track!r} has no {stem} file")


def read_audio(path: str | Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A wav at `rate` -> (channels, samples) float32, checked (`audio_files.read_checked`: an
    error names a truncated, short-read or NaN/Inf file and the first bad sample's time)."""
    audio, sr = audio_files.read_checked(path)
    if sr != rate:
        raise ValueError(f"{path} is sampled at {sr} Hz; evaluation needs {rate} Hz "
                         "(resample the dataset, or use bsmamba2-separate which resamples)")
    return audio


def accompaniment_paths(track: Any) -> list[Path] | None:
    """The other stems' files, or None when none exists (the accompaniment is then mixture -
    vocals); ValueError naming the missing ones when only some exist."""
    paths = [stem_path(track, s) for s in ACCOMPANIMENT_STEMS]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = [p.name for p, ok in zip(paths, present, strict=True) if not ok]
        raise ValueError(f"{track_name(track)}: {', '.join(missing)} missing; the accompaniment "
                         f"reference needs all of {', '.join(ACCOMPANIMENT_STEMS)} (or none of "
                         "them)")
    return paths


def load_track(track: Any, rate: int = SAMPLE_RATE) -> dict[str, np.ndarray]:
    """mixture, vocals and accompaniment, each (2, samples) float32.

    The accompaniment reference is the sum of the other stems (musdb's "accompaniment"); only when
    none of their files exists is it mixture - vocals.
    """
    name = track_name(track)
    mixture = read_audio(stem_path(track, "mixture"), rate)
    vocals = read_audio(stem_path(track, "vocals"), rate)
    if vocals.shape != mixture.shape:
        raise ValueError(f"{name}: vocals has shape {vocals.shape} but the mixture "
                         f"{mixture.shape}; a truncated or mismatched file?")
    paths = accompaniment_paths(track)
    if paths is None:
        return {"mixture": mixture, "vocals": vocals, "accompaniment": mixture - vocals}
    accompaniment = np.zeros_like(mixture)
    for stem, path in zip(ACCOMPANIMENT_STEMS, paths, strict=True):
        audio = read_audio(path, rate)
        if audio.shape != mixture.shape:
            raise ValueError(f"{name}: {stem} has shape {audio.shape} but the mixture "
                             f"{mixture.shape}; a truncated or mismatched file?")
        accompaniment += audio
    return {"mixture": mixture, "vocals": vocals, "accompaniment": accompaniment}


# A MUSDB18-HQ mixture.wav is the sum of its four stems up to the quantisation of the five 16-bit
# files: at most 2.5 steps of 2^-15 per sample, about -94 dBFS RMS, which is more than 50 dB under
# any music mixture (one at -40 dBFS RMS leaves 14 dB of margin). A mixture that is not the sum of
# its stems (another track's mixture, a stem shifted by one sample or rescaled by 1 dB) leaves a
# residual within about 20 dB of the mixture itself. The tolerance sits between the two.
MIXTURE_TOLERANCE_DB = -40.0  # residual energy relative to the mixture's


def mixture_residual_db(mixture: np.ndarray, vocals: np.ndarray,
                        accompaniment: np.ndarray) -> float:
    """10 log10(sum (mixture - vocals - accompaniment)^2 / sum mixture^2) in dB.

    Args: (channels, samples) each. Returns -inf for an exact sum, +inf for a silent mixture
    whose stems are not, NaN when everything is silent.
    """
    residual = mixture - vocals - accompaniment
    num = float(np.sum(np.square(residual, dtype=np.float64)))
    den = float(np.sum(np.square(mixture, dtype=np.float64)))
    if den == 0.0:
        return float("nan") if num == 0.0 else float("inf")
    return float("-inf") if num == 0.0 else float(10.0 * np.log10(num / den))


def write_audio(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE,
                subtype: str = "FLOAT") -> None:
    """(channels, samples) -> wav/flac file (format from the suffix), written whole or not at all
    (a temporary file of this process in the same folder, then renamed)."""
    import soundfile as sf

    with _temporary_beside(path) as tmp:
        sf.write(str(tmp), np.asarray(audio, dtype=np.float32).T, rate, subtype=subtype,
                 format=path.suffix.lstrip(".").upper())


# ----------------------------------------------------------------------------- what made a result


def params_digest(params: Any) -> str:
    """sha256 (hex) of a parameter pytree: every leaf's path, dtype, shape and bytes, in order."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.data)
    return h.hexdigest()


def model_identity(params: Any, config: Mapping[str, Any], model_config: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """What produced a result: the weights and the model config they ran with.

    Args:
      params: the parameter pytree that is evaluated.
      config: `bsmamba2_jax.loading.read_weights`'s config ("source", "step", "weights", ...).
      model_config: the model's keyword arguments as run (execution overrides applied).
    Returns:
      {"key": folder name, "source", "step", "weights", "params_sha256", "model"}; the key is
      `step<N>-<weights>-<dtype>-<12 hex digits>` (no step part for a model file without one),
      the digits a sha256 of the params digest and the model config.
    """
    plain = json.loads(json.dumps(dict(model_config), default=str))  # tuples -> lists
    digest = params_digest(params)
    both = hashlib.sha256((digest + json.dumps(plain, sort_keys=True)).encode()).hexdigest()
    step = config.get("step")
    weights = str(config.get("weights"))
    parts = ([] if step is None else [f"step{int(step)}"]) + [weights, str(plain.get("dtype")),
                                                              both[:12]]
    return {"key": "-".join(parts), "source": str(config.get("source")),
            "step": None if step is None else int(step), "weights": weights,
            "params_sha256": digest, "model": plain}


def run_tag(segment_seconds: float, overlap: float, shifts: int) -> str:
    """Folder name of one evaluation setting."""
    return f"seg{segment_seconds:g}_ov{overlap:g}_shifts{shifts}"


# ----------------------------------------------------------------------------- result files


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary file name in `path`'s folder, renamed onto `path` when the block ends.

    The name holds this process's id and a random part, so two evaluations writing the same
    results never write into each other's temporary file; readers see the old file or the new
    one, never a partial one. On an error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """A text file written whole or not at all (see `_temporary_beside`)."""
    with _temporary_beside(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Strict JSON (no NaN), written whole or not at all (see `_temporary_beside`)."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


def _comparable(producer: Mapping[str, Any]) -> Any:
    """A producer as compared for reuse: the model by its key (weights + config), not by path."""
    plain = json.loads(json.dumps(producer))
    if isinstance(plain.get("model"), dict) and "key" in plain["model"]:
        plain["model"] = plain["model"]["key"]
    return plain


def read_result(path: Path, producer: Mapping[str, Any]) -> dict | None:
    """A stored per-track result if it was made by `producer`, else None (score it again).

    A result whose producer differs (other weights, settings or scoring version) or a file that
    does not parse is never reused. The same weights read from another path (a step directory and
    its exported file) are the same producer.
    """
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("producer"), dict):
        return None
    return result if _comparable(result["producer"]) == _comparable(producer) else None
