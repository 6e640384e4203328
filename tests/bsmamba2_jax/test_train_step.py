"""Train step on one device: gradient accumulation, non-finite skipping, EMA, dropout keys,
fsdp specs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from bsmamba2_jax.train.build import build
from bsmamba2_jax.train.sharding import fsdp_spec
from bsmamba2_jax.train.state import init_train_state
from bsmamba2_jax.train.step import has_train_flag, make_train_step
from tests.bsmamba2_jax.train_helpers import max_abs_diff, random_batch, tiny_config

# Adam eps 1e-3 (not 1e-8): see sharded_step_check.py; it keeps updates smooth in the gradient.
EPS = 1e-3


@pytest.fixture(scope="module")
def accumulating():
    """accum_steps=2 step (batch 4) and its initial state."""
    parts = build(tiny_config(accum_steps=2, eps=EPS))
    state = jax.jit(parts.init_fn)(jax.random.PRNGKey(0))
    return jax.device_get(state), jax.jit(parts.train_step)


def test_accumulation_equals_one_big_batch(accumulating):
    state0, step2 = accumulating
    big = random_batch(7, 8)
    halves = [{k: v[i * 4:(i + 1) * 4] for k, v in big.items()} for i in range(2)]
    state, metrics = step2(state0, halves[0])
    assert int(metrics["updated"]) == 0
    assert max_abs_diff(state.params, state0.params) == 0.0  # only accumulated so far
    assert max_abs_diff(state.ema_params, state0.ema_params) == 0.0  # EMA waits for the update
    state, metrics = step2(state, halves[1])
    assert int(metrics["updated"]) == 1

    ref, ref_metrics = jax.jit(build(tiny_config(accum_steps=1, eps=EPS)).train_step)(state0, big)
    assert int(ref_metrics["updated"]) == 1
    assert max_abs_diff(ref.params, state0.params) > 1e-4
    assert max_abs_diff(state.params, ref.params) < 1e-5
    assert max_abs_diff(state.ema_params, ref.ema_params) < 1e-5
    # EMA moved by (1 - decay) of the update: ema = decay * p0 + (1 - decay) * p1.
    decay = tiny_config().ema_decay
    expected = jax.tree.map(lambda p0, p1: decay * p0 + (1 - decay) * p1,
                            state0.params, ref.params)
    assert max_abs_diff(ref.ema_params, expected) < 1e-6


def test_nonfinite_batch_is_skipped_and_counted(accumulating):
    state0, step2 = accumulating
    batch = random_batch(3, 4)
    batch["mixture"][1, 0, 100] = np.nan
    state, metrics = step2(state0, batch)
    assert int(metrics["nonfinite"]) == 1 and int(metrics["updated"]) == 0
    assert int(state.nonfinite_run) == 1 and int(state.nonfinite_total) == 1
    assert int(state.step) == 1
    assert max_abs_diff(state.params, state0.params) == 0.0
    assert max_abs_diff(state.opt_state, state0.opt_state) == 0.0  # nothing accumulated
    state, metrics = step2(state, random_batch(4, 4))
    assert int(metrics["nonfinite"]) == 0
    assert int(state.nonfinite_run) == 0 and int(state.nonfinite_total) == 1
    # The skipped micro-batch did not count towards the accumulation: one more completes it.
    assert int(metrics["updated"]) == 0
    state, metrics = step2(state, batch)  # non-finite where an update would complete
    assert int(metrics["updated"]) == 0 and int(state.nonfinite_total) == 2
    assert max_abs_diff(state.params, state0.params) == 0.0
    assert max_abs_diff(state.ema_params, state0.ema_params) == 0.0


class DropoutScale(nn.Module):
    """audio * w, with dropout on the product when train=True (a stand-in for a model with
    dropout, as the transformer mixer has)."""

    @nn.compact
    def __call__(self, audio, train: bool = False):
        w = self.param("w", nn.initializers.ones, (audio.shape[-1],))
        return nn.Dropout(0.5, deterministic=not train)(audio * w)


def test_dropout_gets_train_flag_and_a_key_per_step():
    model, seed = DropoutScale(), 1234
    assert has_train_flag(model) and has_train_flag(build(tiny_config()).model)
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=1)
    l1 = lambda e, t: jnp.mean(jnp.abs(e - t))  # noqa: E731
    step = jax.jit(make_train_step(model, tx, l1, 0.9, seed))
    batch = random_batch(5, 2, 64)
    state = init_train_state(model, tx, jax.random.PRNGKey(0), batch["mixture"])
    state = state.replace(step=jnp.int32(7))
    _, metrics = step(state, batch)

    def expected_loss(step_number):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step_number)
        out = model.apply(state.params, batch["mixture"], train=True, rngs={"dropout": key})
        return float(l1(out, batch["vocals"]))

    assert float(metrics["loss"]) == pytest.approx(expected_loss(7), rel=1e-6)
    assert expected_loss(7) != pytest.approx(expected_loss(8), rel=1e-3)  # a new mask per step
    deterministic = float(l1(model.apply(state.params, batch["mixture"]), batch["vocals"]))
    assert float(metrics["loss"]) != pytest.approx(deterministic, rel=1e-3)


@pytest.mark.parametrize(("shape", "fsdp", "expected"), [
    ((512, 256), 4, P("fsdp")),  # largest divisible dimension
    ((6, 1024), 4, P(None, "fsdp")),
    ((1024,), 1, P()),  # no fsdp axis
    ((64,), 4, P()),  # too small to be worth a collective
    ((1023, 4097), 4, P()),  # nothing divisible
])
def test_fsdp_spec(shape, fsdp, expected):
    assert fsdp_spec(shape, fsdp, min_size=1000) == expected
