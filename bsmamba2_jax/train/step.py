"""Pure train and eval steps; `make_*` close over the model, optimizer and loss."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from bsmamba2_jax.train.state import TrainState

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def has_train_flag(model) -> bool:
    """True when the model's `__call__` takes `train` (models with dropout do)."""
    return "train" in inspect.signature(type(model).__call__).parameters


def make_train_step(model, tx: optax.MultiSteps, loss_fn: LossFn, ema_decay: float,
                    seed: int = 0) -> Callable:
    """Returns `train_step(state, batch) -> (state, metrics)`.

    batch: {"mixture": (b, 2, samples) float32, "vocals": (b, 2, samples) float32}.
    metrics: float32/int32 scalars loss, grad_norm (of this micro-batch, before clipping),
    updated (1 when this micro-batch completed an optimizer update), nonfinite, nonfinite_run.
    seed: a model with a `train` flag gets `train=True` and the dropout key
    `fold_in(PRNGKey(seed), state.step)`, so a resumed run draws the same masks.

    A non-finite loss or gradient leaves params, EMA and optimizer state untouched (the
    micro-batch is dropped, not accumulated) and increments the counters; the host decides when
    too many in a row must stop the run. Both that skip and the EMA (which moves only when an
    accumulation completes an optimizer update) are `lax.cond`s, so the micro-batches that only
    accumulate pass params and EMA through untouched instead of recomputing and discarding them.
    """
    with_dropout = has_train_flag(model)

    def loss_of(params, batch, step):
        if with_dropout:
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
            estimate = model.apply(params, batch["mixture"], train=True, rngs={"dropout": rng})
        else:
            estimate = model.apply(params, batch["mixture"])
        return loss_fn(estimate.astype(jnp.float32), batch["vocals"])

    def apply_gradient(grads, params, ema, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        completed = opt_state.mini_step == 0  # MultiSteps emitted the accumulated update

        def finish():
            new = optax.apply_updates(params, updates)
            return new, jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, new)

        params, ema = jax.lax.cond(completed, finish, lambda: (params, ema))
        return params, ema, opt_state, completed

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, grads = jax.value_and_grad(loss_of)(state.params, batch, state.step)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, ema, opt_state, updated = jax.lax.cond(
            finite,
            lambda: apply_gradient(grads, state.params, state.ema_params, state.opt_state),
            lambda: (state.params, state.ema_params, state.opt_state, jnp.zeros((), bool)))
        nonfinite = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + nonfinite,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "updated": updated.astype(jnp.int32),
            "nonfinite": nonfinite,
            "nonfinite_run": new_state.nonfinite_run,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model, loss_fn: LossFn) -> Callable:
    """Returns `eval_step(params, batch) -> (estimate, loss)`.

    batch: {"mixture", "vocals"}: (b, 2, samples) float32. estimate: (b, 2, samples) float32,
    the model in inference mode. loss: (b,) float32, `loss_fn` of each example alone (the mean
    over examples equals the loss of the whole batch: every term is a mean over equal sizes).
    """

    def eval_step(params, batch: dict) -> tuple[jax.Array, jax.Array]:
        estimate = model.apply(params, batch["mixture"]).astype(jnp.float32)
        loss = jax.vmap(lambda e, t: loss_fn(e[None], t[None]))(estimate, batch["vocals"])
        return estimate, loss

    return eval_step
