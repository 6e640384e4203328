"""The optimizer of the recipe: global-norm clip, AdamW, gradient accumulation.

See docs/DESIGN.md#loss-and-recipe.
"""

from __future__ import annotations

import ml_collections
import optax


def make_optimizer(config: ml_collections.ConfigDict) -> optax.MultiSteps:
    """clip_by_global_norm -> AdamW, wrapped in `optax.MultiSteps` for accumulation.

    `config.optim.accum_steps` micro-batches (train-step calls) make one optimizer update: their
    gradients are averaged, then clipped, so clipping sees the gradient of the effective batch
    (as in PyTorch Lightning, which clips after accumulating).
    """
    o = config.optim
    if o.accum_steps < 1:
        raise ValueError(f"config.optim.accum_steps={o.accum_steps} must be >= 1")
    if o.lr <= 0:
        raise ValueError(f"config.optim.lr={o.lr} must be > 0")
    inner = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
    return optax.MultiSteps(inner, every_k_schedule=o.accum_steps)
