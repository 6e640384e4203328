"""Data: MUSDB18-HQ (or the synthetic stand-in) -> Grain batches and validation windows.

    root = prepare_dataset_root(config, workdir)
    ds = make_train_dataset(config, root, seed=config.seed, shard_index=jax.process_index(),
                            shard_count=jax.process_count(), cache_dir=workdir)
    it = iter(ds)              # it.get_state() / it.set_state(state) for checkpoints
    batch = next(it)           # {"mixture": (b, 2, samples), "vocals": (b, 2, samples)} float32
    val = make_validation_set(config, root, seed=config.seed, cache_dir=workdir)
    batch = val.read([0, 1])   # {"mixture", "vocals"}: (2, 2, samples) float32
    tracks = list_tracks(root, "test")   # Track(name, subset, paths, num_samples)

Nothing here imports jax; musdb is imported lazily (it needs ffmpeg on PATH).
"""

from bsmamba2_jax.data.activity import (
    ActivityParams,
    active_window_starts,
    activity_index,
    segment_samples,
)
from bsmamba2_jax.data.musdb import (
    SAMPLE_RATE,
    SPLITS,
    STEMS,
    Track,
    check_split_disjoint,
    list_tracks,
    read_crop,
)
from bsmamba2_jax.data.pipeline import (
    RandomMix,
    ValidationSet,
    make_train_dataset,
    make_validation_set,
    prepare_dataset_root,
)

__all__ = [
    "SAMPLE_RATE", "SPLITS", "STEMS", "ActivityParams", "RandomMix", "Track", "ValidationSet",
    "activity_index", "active_window_starts", "check_split_disjoint", "list_tracks",
    "make_train_dataset", "make_validation_set", "prepare_dataset_root", "read_crop",
    "segment_samples",
]
