"""Source activity detection: which windows of each stem are worth training on.

See docs/DESIGN.md#data. A window (8 s with a 4 s step for the paper) is split into 10
chunks; per channel, the chunk RMS values are compared with a threshold max(15th percentile of
the window's chunk RMS, 1e-3); the window is kept when more than 50% of its chunks exceed the
threshold on every channel. As in the authors' code the percentile is taken over the chunks of
one window (linear interpolation, like torch.quantile), not over the whole track. Their code
first replaces exact-zero RMS values by 1e-5; that cannot change the outcome (the threshold is
never below 1e-3), so it is left out.

The index (start samples of the active windows, per split, stem and track) is computed once, from
one checked full read of every stem (a truncated file or a NaN/Inf sample is an error naming the
file and the sample's time, `bsmamba2_jax.audio_files`), and cached as a small JSON file, keyed
by the root, the detection parameters and every file's size and modification time, so editing
the dataset or the parameters recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tempfile

import ml_collections
import numpy as np

from bsmamba2_jax import audio_files
from bsmamba2_jax.data import musdb as musdb_lib


@dataclasses.dataclass(frozen=True)
class ActivityParams:
    """Detection parameters. window, step in samples."""

    window: int  # window length (= training segment length)
    step: int  # hop between window starts
    chunks: int = 10  # chunks per window
    quantile: float = 0.15  # per-window chunk-RMS percentile used as the threshold
    rms_floor: float = 1e-3  # the threshold is never below this RMS (about -60 dBFS)
    min_fraction: float = 0.5  # keep the window if more than this fraction of chunks is loud

    def __post_init__(self):
        if self.window < self.chunks or self.step < 1:
            raise ValueError(f"window={self.window} must be >= chunks={self.chunks} and "
                             f"step={self.step} >= 1")


def segment_samples(data_config: ml_collections.ConfigDict) -> int:
    """Training/validation segment length in samples (`config.data` seconds x rate)."""
    return int(round(data_config.segment_seconds * data_config.sample_rate))


def params_from_config(data_config: ml_collections.ConfigDict) -> ActivityParams:
    """ActivityParams from `config.data` (segment length in seconds -> samples)."""
    window = segment_samples(data_config)
    return ActivityParams(
        window=window,
        step=max(1, int(round(window * data_config.activity_step_fraction))),
        chunks=data_config.activity_chunks,
        quantile=data_config.activity_quantile,
        rms_floor=data_config.activity_rms_floor,
        min_fraction=data_config.activity_min_fraction)


def chunk_rms(audio: np.ndarray, params: ActivityParams) -> np.ndarray:
    """RMS of every chunk of every window.

    Args:
      audio: (channels, samples) float.
    Returns:
      (channels, windows, chunks) float64, windows = 1 + (samples - window) // step (0 if the
      audio is shorter than one window). Chunk j of a window covers samples
      [round(j * window / chunks), round((j + 1) * window / chunks)) of it (equal chunks when
      window % chunks == 0, as for every config here).

    Every chunk's energy is a sum over its own samples, never a difference of running sums: a
    NaN or Inf sample reaches only the chunks (and windows) that contain it. (A cumulative sum
    carried one bad sample into every later window of the stem.)
    """
    channels, samples = audio.shape
    if samples < params.window:
        return np.zeros((channels, 0, params.chunks))
    starts = np.arange(0, samples - params.window + 1, params.step)
    bounds = np.round(np.arange(params.chunks + 1) * params.window / params.chunks).astype(np.int64)
    # Every window start and chunk edge lies on a grid of `grid` samples: sum the energy of each
    # grid block once (float64), then each chunk is the sum of its own blocks.
    grid = math.gcd(params.step, *(int(b) for b in bounds))
    covered = int(starts[-1]) + params.window  # a multiple of grid
    blocks = np.square(audio[:, :covered], dtype=np.float64).reshape(channels, -1, grid).sum(-1)
    first = bounds[:-1] // grid  # each chunk's first block within its window
    sums = np.empty((channels, len(starts), params.chunks))
    for w, start in enumerate(starts // grid):
        window_blocks = blocks[:, start:start + params.window // grid]
        sums[:, w] = np.add.reduceat(window_blocks, first, axis=-1)
    return np.sqrt(sums / np.diff(bounds))


def active_window_starts(audio: np.ndarray, params: ActivityParams) -> np.ndarray:
    """Start samples of the active windows of one stem.

    Args:
      audio: (channels, samples) float.
    Returns:
      (n_active,) int64, ascending multiples of params.step. A window holding a NaN or Inf
      sample is never active; the others are unaffected by it. (The readers refuse such files
      before this: `activity_index` reads with `audio_files.read_checked`.)
    """
    rms = chunk_rms(audio, params)  # (c, w, k)
    if rms.shape[1] == 0:
        return np.zeros(0, np.int64)
    finite = np.all(np.isfinite(rms), axis=(0, 2))  # (w,)
    rms = np.where(finite[None, :, None], rms, 0.0)  # keeps the quantile free of NaN warnings
    threshold = np.maximum(np.quantile(rms, params.quantile, axis=-1, keepdims=True),
                           params.rms_floor)
    loud = np.mean(rms > threshold, axis=-1)  # (c, w)
    keep = np.all(loud > params.min_fraction, axis=0) & finite
    return (np.flatnonzero(keep) * params.step).astype(np.int64)


def _read_all(path: pathlib.Path) -> np.ndarray:
    """(channels, samples) float32 of a whole stem, checked: the one full read of each training
    and validation file (an error names a truncated, short-read or NaN/Inf file)."""
    return audio_files.read_checked(path)[0]


def _cache_key(root: pathlib.Path, split: str, tracks: list[musdb_lib.Track],
               params: ActivityParams) -> str:
    files = []
    for t in tracks:
        for stem in musdb_lib.STEMS:
            st = t.paths[stem].stat()
            files.append([t.name, stem, st.st_size, st.st_mtime_ns])
    # version 2: the stems are checked on reading (an index of version 1 may hold a stem
    # poisoned by one NaN sample, so it is not reused).
    blob = json.dumps({"root": str(root.resolve()), "split": split,
                       "params": dataclasses.asdict(params), "files": files, "version": 2},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


CACHE_ENV = "BSMAMBA2_JAX_CACHE"  # overrides the default cache folder (the tests set it)


def default_cache_dir() -> pathlib.Path:
    """Used when no cache_dir is given: $BSMAMBA2_JAX_CACHE, else $XDG_CACHE_HOME/bsmamba2_jax
    (~/.cache/bsmamba2_jax)."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "bsmamba2_jax"


def activity_index(root: str | os.PathLike, split: str, params: ActivityParams, *,
                   tracks: list[musdb_lib.Track] | None = None,
                   cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, list[int]]]:
    """Active window starts per stem and track of one split, cached.

    Args:
      root: dataset root. split: "train", "valid" or "test".
      params: detection parameters.
      tracks: the split's tracks if already listed (saves a listing).
      cache_dir: folder for the cache file `activity-<split>-<key>.json` (the training code passes
        its workdir); None = `default_cache_dir()`.
    Returns:
      {stem: {track name: [start, ...]}} for every stem in STEMS and every track of the split.
    """
    root = musdb_lib.check_root(root)
    tracks = musdb_lib.list_tracks(root, split) if tracks is None else tracks
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f"activity-{split}-{_cache_key(root, split, tracks, params)}.json"
    if cache.is_file():
        try:
            with open(cache) as f:
                return json.load(f)["windows"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache (e.g. truncated by a crash): recompute
    windows: dict[str, dict[str, list[int]]] = {stem: {} for stem in musdb_lib.STEMS}
    for t in tracks:
        for stem in musdb_lib.STEMS:
            starts = active_window_starts(_read_all(t.paths[stem]), params)
            windows[stem][t.name] = [int(s) for s in starts]
    blob = {"root": str(root.resolve()), "split": split, "params": dataclasses.asdict(params),
            "windows": windows}
    # Write-then-rename: concurrent processes (multi-host) never see a half-written cache.
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache.name, dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(blob, f)
    os.replace(tmp, cache)
    return windows
