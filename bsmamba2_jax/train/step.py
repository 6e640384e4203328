"""Pure train and eval steps; `make_*` close over the model, optimizer and loss."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from bsmamba2_jax.train.state import TrainState

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def make_train_step(model, tx: optax.MultiSteps, loss_fn: LossFn,
                    ema_decay: float) -> Callable:
    """Returns `train_step(state, batch) -> (state, metrics)`.

    batch: {"mixture": (b, 2, samples) float32, "vocals": (b, 2, samples) float32}.
    metrics: float32/int32 scalars loss, grad_norm (of this micro-batch, before clipping),
    updated (1 when this micro-batch completed an optimizer update), nonfinite, nonfinite_run.

    A non-finite loss or gradient leaves params, EMA and optimizer state untouched (the
    micro-batch is dropped, not accumulated) and increments the counters; the host decides when
    too many in a row must stop the run.
    """

    def loss_of(params, batch):
        estimate = model.apply(params, batch["mixture"])
        return loss_fn(estimate.astype(jnp.float32), batch["vocals"])

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, _ = jax.random.split(state.rng)  # the model is deterministic; rng kept for resumes
        loss, grads = jax.value_and_grad(loss_of)(state.params, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA follows the optimizer updates: between two updates (accumulation) params are equal.
        updated = (opt_state.mini_step == 0) & (opt_state.gradient_step > 0)
        ema = jax.tree.map(
            lambda e, p: jnp.where(updated, ema_decay * e + (1.0 - ema_decay) * p, e),
            state.ema_params, params)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        nonfinite = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            ema_params=keep_if_finite(ema, state.ema_params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            rng=rng,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + nonfinite,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "updated": (updated & finite).astype(jnp.int32),
            "nonfinite": nonfinite,
            "nonfinite_run": new_state.nonfinite_run,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model) -> Callable:
    """Returns `eval_step(params, mixture) -> estimate`, both (b, 2, samples) float32."""

    def eval_step(params, mixture: jax.Array) -> jax.Array:
        return model.apply(params, mixture).astype(jnp.float32)

    return eval_step
