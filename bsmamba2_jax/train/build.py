"""One place that turns a config into the model, optimizer, train state and jitted steps.

    parts = build(config)                          # pure functions, no devices touched
    state = jax.jit(parts.init_fn)(jax.random.PRNGKey(config.seed))
    state, metrics = jax.jit(parts.train_step, donate_argnums=0)(state, batch)

    run = shard(parts, mesh, config.mesh.fsdp_min_size)   # the same, laid out on a mesh
    state = run.init(jax.random.PRNGKey(config.seed))
    state, metrics = run.train_step(state, batch)          # batch sharded by run.data_sharding

train.py, the training benchmarks and the tests all build their steps here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from bsmamba2_jax.losses import separation_loss
from bsmamba2_jax.model import BSMamba2
from bsmamba2_jax.train import sharding as shard_lib
from bsmamba2_jax.train.optim import make_optimizer
from bsmamba2_jax.train.state import TrainState, init_train_state, state_from_params
from bsmamba2_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainParts:
    """The pure pieces of training for one config.

    init_fn: rng -> TrainState (params from `model.init`, EMA = params, fresh optimizer).
    train_step: (state, batch) -> (state, metrics); see `step.make_train_step`.
    eval_step: (params, batch) -> (estimate (b, 2, S), loss (b,)); see `step.make_eval_step`.
    """

    model: Any
    tx: optax.MultiSteps
    init_fn: Callable[[jax.Array], TrainState]
    train_step: Callable
    eval_step: Callable

    def abstract_state(self) -> TrainState:
        """Shapes and dtypes of the train state, without computing it."""
        return jax.eval_shape(self.init_fn, jax.random.PRNGKey(0))

    def state_from_params(self, params: Any, ema_params: Any) -> TrainState:
        """A step-0 state around given weights with a fresh optimizer (pure; jit it)."""
        return state_from_params(self.tx, params, ema_params)


def make_model(model_config: ml_collections.ConfigDict | dict) -> BSMamba2:
    """`BSMamba2(**config.model)`."""
    return BSMamba2(**model_config)


def build(config: ml_collections.ConfigDict) -> TrainParts:
    """Model, optimizer and pure steps from a run config (uses model, optim, ema_decay, seed)."""
    model = make_model(config.model)
    tx = make_optimizer(config)
    # The parameter shapes do not depend on the audio length: init on a short example (a few
    # STFT frames) instead of a whole training segment.
    example = jnp.zeros((1, 2, 4 * config.model.n_fft), jnp.float32)

    def init_fn(rng: jax.Array) -> TrainState:
        return init_train_state(model, tx, rng, example)

    return TrainParts(
        model=model, tx=tx, init_fn=init_fn,
        train_step=make_train_step(model, tx, separation_loss, config.ema_decay, config.seed),
        eval_step=make_eval_step(model, separation_loss))


@dataclasses.dataclass(frozen=True)
class ShardedParts:
    """TrainParts jitted for a mesh: state laid out by `sharding.state_shardings`, batches split
    over every device, metrics replicated. train_step donates the state it is given."""

    mesh: Mesh
    state_sharding: Any  # a TrainState of NamedShardings
    data_sharding: NamedSharding
    init: Callable[[jax.Array], TrainState]
    from_params: Callable[[Any, Any], TrainState]
    train_step: Callable
    eval_step: Callable

    def abstract_state(self, parts: TrainParts) -> TrainState:
        """ShapeDtypeStructs with this layout (the target of a checkpoint restore)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            parts.abstract_state(), self.state_sharding)


def shard(parts: TrainParts, mesh: Mesh, fsdp_min_size: int = 2**14) -> ShardedParts:
    """Jits `parts` for `mesh`; fsdp_min_size: arrays smaller than this stay replicated."""
    state_sharding = shard_lib.state_shardings(mesh, parts.abstract_state(), fsdp_min_size)
    data_sharding = shard_lib.batch_sharding(mesh)
    replicated = shard_lib.replicated(mesh)
    return ShardedParts(
        mesh=mesh, state_sharding=state_sharding, data_sharding=data_sharding,
        init=jax.jit(parts.init_fn, out_shardings=state_sharding),
        from_params=jax.jit(parts.state_from_params, out_shardings=state_sharding),
        train_step=jax.jit(parts.train_step, in_shardings=(state_sharding, data_sharding),
                           out_shardings=(state_sharding, replicated), donate_argnums=0),
        eval_step=jax.jit(parts.eval_step,
                          in_shardings=(state_sharding.ema_params, data_sharding),
                          out_shardings=replicated))
