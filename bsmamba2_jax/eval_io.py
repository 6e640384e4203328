"""Evaluation files: a track's stems in, estimates out, results tied to the weights that made them.

Layout of one evaluation run (evaluate.py writes it):

    WORKDIR/eval/<split>/<model key>/seg<S>_ov<O>_shifts<N>/
        tracks/<name>.json          every score of the track and its producer (model + settings)
        tracks/<name>.museval.json  full museval (SDR/ISR/SIR/SAR per frame) when asked
        audio/<name>/{vocals,accompaniment}.wav   estimates, when asked
        scores.csv, summary.json, onset.json, onset.csv   (bsmamba2_jax.reports)

The model key (`model_identity`) names the weights by step, kind and a digest of the parameters and
the model config, so the results of other weights never share a folder; each per-track file also
carries its producer, and a file whose producer differs from the current one is scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

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
    """A wav at `rate` -> (channels, samples) float32; a clear error for wrong files."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != rate:
        raise ValueError(f"{path} is sampled at {sr} Hz; evaluation needs {rate} Hz "
                         "(resample the dataset, or use bsmamba2-separate which resamples)")
    return audio.T.copy()


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
    paths = [stem_path(track, s) for s in ACCOMPANIMENT_STEMS]
    present = [p.is_file() for p in paths]
    if not any(present):
        return {"mixture": mixture, "vocals": vocals, "accompaniment": mixture - vocals}
    if not all(present):
        missing = [p.name for p, ok in zip(paths, present, strict=True) if not ok]
        raise ValueError(f"{name}: {', '.join(missing)} missing; the accompaniment reference "
                         f"needs all of {', '.join(ACCOMPANIMENT_STEMS)} (or none of them)")
    accompaniment = np.zeros_like(mixture)
    for stem, path in zip(ACCOMPANIMENT_STEMS, paths, strict=True):
        audio = read_audio(path, rate)
        if audio.shape != mixture.shape:
            raise ValueError(f"{name}: {stem} has shape {audio.shape} but the mixture "
                             f"{mixture.shape}; a truncated or mismatched file?")
        accompaniment += audio
    return {"mixture": mixture, "vocals": vocals, "accompaniment": accompaniment}


def write_audio(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE,
                subtype: str = "FLOAT") -> None:
    """(channels, samples) -> wav/flac file (format from the suffix)."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(audio, dtype=np.float32).T, rate, subtype=subtype)


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


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Strict JSON (no NaN), written whole or not at all (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, allow_nan=False))
    os.replace(tmp, path)


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
