"""Grain input pipeline: random-mix training batches and validation windows.

See docs/DESIGN.md#data.

Training pipeline (one per process):

    MapDataset.range(examples_per_epoch).repeat()      # example indices, forever
      .random_map(RandomMix)                           # rng = f(seed, global example index)
      [shard_index::shard_count]                       # this process's examples
      .batch(batch_size // shard_count)                # (b, 2, samples) numpy batches
      .to_iter_dataset(ReadOptions)                    # threads reading ahead
      .mp_prefetch(...)                                # worker processes, if num_workers > 0

Every example is a pure function of (seed, global index), so the stream is deterministic, the
iterator state is just a position (get_state/set_state resume bit-identically), and the shards
of batch k together hold exactly the examples of the unsharded batch k. Batching happens before
`to_iter_dataset`, so mp_prefetch's workers each produce whole batches and the output does not
depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from bsmamba2_jax.data import activity as activity_lib
from bsmamba2_jax.data import musdb as musdb_lib

if TYPE_CHECKING:
    import grain

_MAX_SEED = 2**32 - 1  # Grain's random_map seed range


def _synthetic_info(data_config: ml_collections.ConfigDict) -> dict:
    from bsmamba2_jax.data import synthetic

    return synthetic.generation_info(
        tracks=data_config.synthetic_tracks, valid_tracks=data_config.synthetic_valid_tracks,
        test_tracks=data_config.synthetic_test_tracks, seconds=data_config.synthetic_seconds,
        seed=data_config.synthetic_seed, subtype="FLOAT")


def prepare_dataset_root(config: ml_collections.ConfigDict,
                         workdir: str | os.PathLike) -> pathlib.Path:
    """The dataset root: `config.data.root`, or the synthetic set in `workdir/synthetic`.

    The synthetic set is generated on first use (sizes from config.data.synthetic_*); an existing
    one generated with other parameters is an error rather than silently reused.
    """
    # Imported here so that `python -m bsmamba2_jax.data.synthetic` does not find the module
    # already imported by this package (runpy warns about that).
    from bsmamba2_jax.data import synthetic

    d = config.data
    if d.sample_rate != musdb_lib.SAMPLE_RATE:
        raise ValueError(f"config.data.sample_rate={d.sample_rate}; only "
                         f"{musdb_lib.SAMPLE_RATE} Hz (MUSDB18-HQ) is supported")
    if d.root:
        return musdb_lib.check_root(d.root)
    root = pathlib.Path(workdir) / "synthetic"
    want = _synthetic_info(d)
    if (root / synthetic.INFO_FILE).is_file():
        have = json.loads((root / synthetic.INFO_FILE).read_text())
        if have != want:
            raise ValueError(f"{root} holds a synthetic set generated with {have}, but the config "
                             f"asks for {want}; delete {root} or use another --workdir")
        return root
    if root.exists():  # a folder without the info file: not ours or left by a crash
        raise ValueError(f"{root} exists but is not a complete synthetic dataset (no "
                         f"{synthetic.INFO_FILE}); delete it and rerun")
    logging.info("Generating the synthetic dataset in %s", root)
    try:
        synthetic.generate_dataset(root, tracks=want["tracks"], seconds=want["seconds"],
                                   valid_tracks=want["valid_tracks"],
                                   test_tracks=want["test_tracks"], seed=want["seed"])
    except (OSError, ValueError):
        # Another process (multi-host, shared workdir) put its copy in place first; the content
        # is identical (a pure function of the same parameters), so use it.
        if not (root / synthetic.INFO_FILE).is_file():
            raise
    return root


@dataclasses.dataclass(frozen=True)
class StemWindows:
    """Where one stem may be drawn from: track t's file is paths[t]; windows (n, 2) int64 rows
    of (track index, start sample)."""

    paths: tuple[str, ...]
    windows: np.ndarray


def stem_windows(tracks: Sequence[musdb_lib.Track], index: dict[str, dict[str, list[int]]]
                 ) -> dict[str, StemWindows]:
    """Flattens an activity index into per-stem (track, start) tables over `tracks`."""
    out = {}
    for stem in musdb_lib.STEMS:
        rows = [(i, s) for i, t in enumerate(tracks) for s in index[stem].get(t.name, [])]
        if not rows:
            raise ValueError(f"no active {stem!r} window in {len(tracks)} training tracks; the "
                             "tracks are shorter than one segment or silent (lower "
                             "config.data.segment_seconds or config.data.activity_rms_floor)")
        out[stem] = StemWindows(tuple(str(t.paths[stem]) for t in tracks),
                                np.asarray(rows, np.int64))
    return out


class RandomMix:
    """The paper's random mix as a Grain random_map transform (picklable for worker processes).

    For each stem independently: a random (track, active window), silence with probability
    `silence_prob`, a gain uniform in [gain_min, gain_max]. mixture = sum of the scaled stems,
    target = the scaled vocals (silent too when the vocals were silenced).
    """

    def __init__(self, tables: dict[str, StemWindows], segment: int, silence_prob: float,
                 gain_min: float, gain_max: float, with_metadata: bool = False):
        self.tables = tables
        self.segment = segment
        self.silence_prob = silence_prob
        self.gain_min = gain_min
        self.gain_max = gain_max
        self.with_metadata = with_metadata

    def __call__(self, _: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Returns {"mixture", "vocals"}: (2, segment) float32, plus with_metadata the per-stem
        draws "track" (4,) int32, "start" (4,) int64, "gain" (4,) float32, "silent" (4,) bool,
        in STEMS order."""
        n = len(musdb_lib.STEMS)
        tracks, starts = np.zeros(n, np.int32), np.zeros(n, np.int64)
        gains, silent = np.zeros(n, np.float32), np.zeros(n, bool)
        mixture = np.zeros((musdb_lib.CHANNELS, self.segment), np.float32)
        vocals = mixture
        for i, stem in enumerate(musdb_lib.STEMS):
            table = self.tables[stem]
            # Draw every number whether or not the stem is silenced: the stream of draws keeps
            # one layout, which keeps the examples easy to reason about.
            track, start = table.windows[rng.integers(len(table.windows))]
            silent[i] = rng.random() < self.silence_prob
            gains[i] = rng.uniform(self.gain_min, self.gain_max)
            tracks[i], starts[i] = track, start
            if silent[i]:
                audio = np.zeros_like(mixture)
            else:
                audio = musdb_lib.read_crop(table.paths[track], int(start), self.segment)
                audio = audio * gains[i]
            mixture = mixture + audio
            if stem == "vocals":
                vocals = audio
        out = {"mixture": mixture, "vocals": vocals}
        if self.with_metadata:
            out.update(track=tracks, start=starts, gain=gains, silent=silent)
        return out


def make_train_dataset(config: ml_collections.ConfigDict, root: str | os.PathLike, *, seed: int,
                       shard_index: int = 0, shard_count: int = 1,
                       cache_dir: str | os.PathLike | None = None,
                       with_metadata: bool = False) -> grain.IterDataset:
    """The training stream of random-mix batches for one process.

    Args:
      config: the experiment config (uses config.data).
      root: dataset root (from `prepare_dataset_root`).
      seed: random_map seed in [0, 2**32 - 1]; the same seed gives the same stream.
      shard_index, shard_count: this process's share (jax.process_index(), process_count()).
      cache_dir: where the activity index is cached (pass the workdir); None = user cache.
      with_metadata: also yield each example's draws (see RandomMix), for tests and debugging.
    Returns:
      grain.IterDataset of {"mixture": (b, 2, samples) float32, "vocals": (b, 2, samples)
      float32} with b = config.data.batch_size // shard_count and samples = segment length; it
      repeats forever. Its iterator has get_state()/set_state() for checkpoints.
    """
    import grain

    d = config.data
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed} must be in [0, 2**32 - 1]")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"{shard_index=} must be in [0, {shard_count=})")
    if d.batch_size % shard_count:
        raise ValueError(f"config.data.batch_size={d.batch_size} must be divisible by the "
                         f"{shard_count} processes (shards)")
    if not 0.0 <= d.silence_prob <= 1.0 or not 0.0 <= d.gain_min <= d.gain_max:
        raise ValueError(f"need 0 <= silence_prob={d.silence_prob} <= 1 and 0 <= gain_min="
                         f"{d.gain_min} <= gain_max={d.gain_max}")
    tracks = musdb_lib.list_tracks(root, "train")
    musdb_lib.check_split_disjoint(root, tracks)
    params = activity_lib.params_from_config(d)
    index = activity_lib.activity_index(root, "train", params, tracks=tracks, cache_dir=cache_dir)
    mix = RandomMix(stem_windows(tracks, index), params.window, d.silence_prob, d.gain_min,
                    d.gain_max, with_metadata)
    ds = grain.MapDataset.range(d.examples_per_epoch).repeat()
    ds = ds.random_map(mix, seed=seed)
    ds = ds.slice(slice(shard_index, None, shard_count))
    ds = ds.batch(d.batch_size // shard_count, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, d.read_threads),
                                              prefetch_buffer_size=d.prefetch_batches))
    if d.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=d.num_workers, per_worker_buffer_size=d.worker_buffer_batches))
    return it


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """Validation windows, read on demand (1200 windows of 8 s would be ~7 GB in memory).

    Window i covers samples [start, start + length) of track `tracks[windows[i, 0]]`, start =
    windows[i, 1]: vocals = that track's vocals.wav, mixture = the sum of its four stems there
    (the authors' validation mixes aligned stems; mixture.wav is not read).
    """

    tracks: tuple[musdb_lib.Track, ...]
    windows: np.ndarray  # (n, 2) int64 rows (track index, start sample)
    length: int  # samples per window

    def __len__(self) -> int:
        return len(self.windows)

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """{"mixture", "vocals"}: (len(indices), 2, length) float32 of those windows."""
        out = {k: np.zeros((len(indices), musdb_lib.CHANNELS, self.length), np.float32)
               for k in ("mixture", "vocals")}
        for row, i in enumerate(indices):
            track, start = self.tracks[self.windows[i, 0]], int(self.windows[i, 1])
            for stem in musdb_lib.STEMS:
                audio = musdb_lib.read_crop(track.paths[stem], start, self.length)
                out["mixture"][row] += audio
                if stem == "vocals":
                    out["vocals"][row] = audio
        return out


def make_validation_set(config: ml_collections.ConfigDict, root: str | os.PathLike, *,
                        seed: int, cache_dir: str | os.PathLike | None = None) -> ValidationSet:
    """`config.data.validation_windows` windows drawn from the vocal-active windows of the
    validation tracks.

    Draws are uniform with replacement (the authors' `random.choice` over their vocals filelist)
    from a NumPy generator seeded with `seed`, once: every validation of a run scores the same
    windows, so scores of different steps compare. Windows are sorted by (track, start) for
    reading.

    Args:
      config: the experiment config (uses config.data: segment length, activity parameters,
        validation_windows).
      root: dataset root.
      seed: the draw's seed (train.py passes config.seed).
      cache_dir: where the activity index is cached, as for make_train_dataset.
    """
    d = config.data
    tracks = musdb_lib.list_tracks(root, "valid")
    params = activity_lib.params_from_config(d)
    index = activity_lib.activity_index(root, "valid", params, tracks=tracks, cache_dir=cache_dir)
    spots = np.asarray([(i, s) for i, t in enumerate(tracks) for s in index["vocals"][t.name]],
                       np.int64).reshape(-1, 2)
    if not len(spots):
        raise ValueError(f"no validation track of {root} has an active vocal window of "
                         f"{d.segment_seconds} s; lower config.data.segment_seconds")
    picks = np.random.default_rng(seed).integers(len(spots), size=d.validation_windows)
    windows = spots[np.sort(picks)]  # spots are sorted by (track, start): so are the windows
    return ValidationSet(tuple(tracks), windows, params.window)
