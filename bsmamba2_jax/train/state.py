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
    nonfinite_run: int32 scalar, consecutive micro-batches skipped for a non-finite loss/gradient.
    nonfinite_total: int32 scalar, all skipped micro-batches of the run.

    No PRNG key is carried: a step that needs randomness (dropout) derives it from the run's
    seed and `step` (`jax.random.fold_in`), so it is a pure function of the state and the batch.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState
    nonfinite_run: jax.Array
    nonfinite_total: jax.Array


def init_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                     example_audio: jax.Array) -> TrainState:
    """Initialises params from `rng` on `example_audio` (batch, 2, samples); EMA starts at params.

    Pure: jit it with `out_shardings` to create the state directly in its sharded layout.
    """
    params = model.init(rng, example_audio)
    return state_from_params(tx, params, jax.tree.map(jnp.copy, params))


def state_from_params(tx: optax.GradientTransformation, params: PyTree,
                      ema_params: PyTree) -> TrainState:
    """A step-0 state around given weights, with a fresh optimizer (fine-tuning starts here)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=ema_params,
        opt_state=tx.init(params),
        nonfinite_run=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )
