"""Validation on the run's fixed windows: loss and uSDR of the model, uSDR of the mixture.

The authors' validation (their Lightning module's validation_step) logs the training loss and
the uSDR of each window, averaged over windows, with the EMA weights swapped in; checkpoint
selection ranks steps by both (docs/DESIGN.md#loss-and-recipe).

A few of the windows are also shown (`choose_examples`, written by `writers.MetricWriter.
write_examples`): chosen once per run from the seed, preferring windows where the vocals come in
after a silence, so that every validation shows the same seconds with the current estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import Mesh

from bsmamba2_jax import excerpts
from bsmamba2_jax.data import musdb
from bsmamba2_jax.data.pipeline import ValidationSet
from bsmamba2_jax.metrics import usdr
from bsmamba2_jax.train.sharding import batch_sharding

EXAMPLE_SECONDS = 4.0  # audio shown per example window (the whole window when shorter)
EXAMPLE_SCAN = 64  # windows looked at, in the seeded order, for an onset after a silence


@dataclasses.dataclass(frozen=True)
class ExampleWindow:
    """A validation window shown at every validation: samples [start, start + length) of window
    `index` of the ValidationSet; `about` says which track and seconds, and the onset."""

    index: int
    start: int
    length: int
    about: str


def choose_examples(windows: ValidationSet, count: int, seed: int,
                    seconds: float = EXAMPLE_SECONDS, scan: int = EXAMPLE_SCAN,
                    rate: int = musdb.SAMPLE_RATE) -> list[ExampleWindow]:
    """`count` validation windows to show, the same for every validation of a run.

    Windows are taken in an order drawn from `seed`; the first `scan` are read (their vocals
    only), and those whose reference vocals come in after at least min(0.5 s, a quarter of the
    clip) without vocals (`excerpts.onsets`) are chosen first, their clip placed around that
    onset (the one after the longest silence); the rest are filled from the scanned windows in
    order, clipped from their start.
    """
    if count <= 0 or not len(windows):
        return []
    length = min(int(round(seconds * rate)), windows.length)
    min_silence = min(0.5 * rate, length / 4)
    order = np.random.default_rng(seed).permutation(len(windows))[:max(scan, count)]
    with_onset, without = [], []
    for i in order.tolist():
        track, start = windows.tracks[windows.windows[i, 0]], int(windows.windows[i, 1])
        vocals = musdb.read_crop(track.paths["vocals"], start, windows.length)
        found = [o for o in excerpts.onsets(vocals, rate) if o.silence >= min_silence]
        where = f"{track.name!r} at {start / rate:.2f} s (window {i})"
        if found:
            onset = max(found, key=lambda o: o.silence)
            first = excerpts.clip_around(onset.at, length, windows.length)
            with_onset.append(ExampleWindow(
                i, first, length, f"{where}, clip from {first / rate:.2f} s: vocals come in at "
                f"{onset.at / rate:.2f} s after {onset.silence / rate:.2f} s without"))
            if len(with_onset) == count:
                break
        else:
            without.append(ExampleWindow(i, 0, length, f"{where}: no vocal onset after a "
                                         "silence in this window"))
    return (with_onset + without)[:count]


def validate(eval_step: Callable, params, windows: ValidationSet, mesh: Mesh,
             batch_size: int, keep: Sequence[int] = ()
             ) -> tuple[dict[str, float], dict[int, dict[str, np.ndarray]]]:
    """Means over the validation windows, and the audio of the windows in `keep`.

    eval_step: jitted `(params, batch) -> (estimate (b, 2, S), loss (b,))` with replicated
      outputs (`build.shard(...).eval_step`).
    windows: the run's ValidationSet; every process reads the same windows.
    batch_size: rounded up to a multiple of the device count; the last batch is zero-padded
      and the padding is not scored.
    keep: indices of windows whose audio to return (`choose_examples`).
    Returns ({"loss", "usdr", "usdr_mixture_baseline", "usdr_gain", "windows"}, {index:
    {"mixture", "vocals", "estimate"}: (2, S) float32 each} for the windows in `keep`); the uSDR
    is the authors' per-window definition (all channels and samples of a window, then the mean).
    """
    n = len(windows)
    if n == 0:
        raise ValueError("No validation windows: config.data.validation_windows is 0")
    n_dev = mesh.size
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = batch_sharding(mesh)
    starts = list(range(0, n, batch_size))

    def read(start: int) -> dict[str, np.ndarray]:
        batch = windows.read(range(start, min(start + batch_size, n)))
        return {k: np.pad(v, [(0, batch_size - len(v)), (0, 0), (0, 0)])
                for k, v in batch.items()}

    keep = set(keep)
    kept: dict[int, dict[str, np.ndarray]] = {}
    losses, model_scores, mixture_scores = [], [], []
    with ThreadPoolExecutor(1) as reader:  # reads batch k + 1 while the devices run batch k
        pending = reader.submit(read, starts[0])
        for k, start in enumerate(starts):
            batch = pending.result()
            if k + 1 < len(starts):
                pending = reader.submit(read, starts[k + 1])
            # Every process holds the whole batch; each device takes its slice of it.
            device_batch = {key: jax.make_array_from_callback(v.shape, sharding, v.__getitem__)
                            for key, v in batch.items()}
            estimates, loss = jax.device_get(eval_step(params, device_batch))
            for j in range(min(batch_size, n - start)):
                losses.append(float(loss[j]))
                model_scores.append(usdr(batch["vocals"][j], estimates[j]))
                mixture_scores.append(usdr(batch["vocals"][j], batch["mixture"][j]))
                if start + j in keep:
                    kept[start + j] = {"mixture": batch["mixture"][j], "vocals": batch["vocals"][j],
                                       "estimate": np.asarray(estimates[j], np.float32)}
    return {"loss": float(np.mean(losses)),
            "usdr": float(np.mean(model_scores)),
            "usdr_mixture_baseline": float(np.mean(mixture_scores)),
            "usdr_gain": float(np.mean(model_scores) - np.mean(mixture_scores)),
            "windows": float(n)}, kept
