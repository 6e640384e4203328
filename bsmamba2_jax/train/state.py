"""The train state: everything a resumed run needs besides the data iterator."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Carried from step to step by `train_step`; a pytree, so it can be sharded and saved.

    step: int32 scalar, micro-batches done (train-step calls; updates = step // accum_steps).
    params, ema_params: the model's float32 variables (`model.init` output).
    opt_state: `optax.MultiSteps` state (holds the accumulated gradient and AdamW moments).
    rng: PRNG key (uint32 (2,)) split once per step.
    nonfinite_run: int32 scalar, consecutive micro-batches skipped for a non-finite loss/gradient.
    nonfinite_total: int32 scalar, all skipped micro-batches of the run.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    nonfinite_run: jax.Array
    nonfinite_total: jax.Array


def init_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                     example_audio: jax.Array) -> TrainState:
    """Initialises params from `rng` on `example_audio` (batch, 2, samples); EMA starts at params.

    Pure: jit it with `out_shardings` to create the state directly in its sharded layout.
    """
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, example_audio)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=state_rng,
        nonfinite_run=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )
