"""Validation on the run's fixed windows: loss and uSDR of the model, uSDR of the mixture.

The authors' validation (their Lightning module's validation_step) logs the training loss and
the uSDR of each window, averaged over windows, with the EMA weights swapped in; checkpoint
selection ranks steps by both (docs/DESIGN.md#loss-and-recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import Mesh

from bsmamba2_jax.data.pipeline import ValidationSet
from bsmamba2_jax.metrics import usdr
from bsmamba2_jax.train.sharding import batch_sharding


def validate(eval_step: Callable, params, windows: ValidationSet, mesh: Mesh,
             batch_size: int) -> dict[str, float]:
    """Means over the validation windows.

    eval_step: jitted `(params, batch) -> (estimate (b, 2, S), loss (b,))` with replicated
      outputs (`build.shard(...).eval_step`).
    windows: the run's ValidationSet; every process reads the same windows.
    batch_size: rounded up to a multiple of the device count; the last batch is zero-padded
      and the padding is not scored.
    Returns {"loss", "usdr", "usdr_mixture_baseline", "usdr_gain", "windows"}; the uSDR is the
    authors' per-window definition (all channels and samples of a window, then the mean).
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
    return {"loss": float(np.mean(losses)),
            "usdr": float(np.mean(model_scores)),
            "usdr_mixture_baseline": float(np.mean(mixture_scores)),
            "usdr_gain": float(np.mean(model_scores) - np.mean(mixture_scores)),
            "windows": float(n)}
