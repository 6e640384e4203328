"""Run in a fresh process with 8 virtual CPU devices (see test_train_sharded.py); prints JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/bsmamba2_jax/sharded_step_check.py

Two train steps (accum_steps=2: one optimizer update) on a single device and on
(data, fsdp) meshes 8x1 and 2x4: loss, params, EMA and optimizer state must agree; also the
per-device bytes of the train state for each mesh.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bsmamba2_jax.train import sharding as shard_lib  # noqa: E402
from bsmamba2_jax.train.build import build, shard  # noqa: E402
from tests.bsmamba2_jax.train_helpers import (  # noqa: E402
    max_abs_diff,
    random_batch,
    tiny_config,
)

FSDP_MIN_SIZE = 256  # the tiny model's arrays are small; shard most of them anyway


def run(parts, mesh, init_state, batches):
    sharded = shard(parts, mesh, FSDP_MIN_SIZE)
    state = jax.device_put(init_state, sharded.state_sharding)
    state_bytes = max(shard_lib.per_device_bytes(state).values())
    losses = []
    for b in batches:
        state, metrics = sharded.train_step(
            state, {k: jax.device_put(v, sharded.data_sharding) for k, v in b.items()})
        losses.append(float(metrics["loss"]))
    sharded_leaves = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
    return jax.device_get(state), losses, state_bytes, sharded_leaves


def main():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    # Adam divides by sqrt(v) + eps: with eps = 1e-8 a parameter whose gradient is ~0 up to
    # rounding (different summation order across devices) moves by +-lr either way. A larger
    # eps makes the update a smooth function of the gradient, so 1e-5 is a fair tolerance.
    parts = build(tiny_config(accum_steps=2, eps=1e-3))
    init_state = jax.device_get(jax.jit(parts.init_fn)(jax.random.PRNGKey(0)))
    batches = [random_batch(seed, 8) for seed in (1, 2)]  # 2 micro-batches = 1 update
    ref_state, ref_losses, ref_bytes, _ = run(
        parts, shard_lib.make_mesh(1, 1, devices=jax.devices()[:1]), init_state, batches)
    out = {"single": {"losses": ref_losses, "state_bytes": ref_bytes}}
    for data, fsdp in ((8, 1), (2, 4)):
        state, losses, nbytes, n_sharded = run(
            parts, shard_lib.make_mesh(data, fsdp), init_state, batches)
        out[f"{data}x{fsdp}"] = {
            "losses": losses, "state_bytes": nbytes, "sharded_leaves": n_sharded,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "params_diff": max_abs_diff(state.params, ref_state.params),
            "params_moved": max_abs_diff(state.params, init_state.params),
            "ema_diff": max_abs_diff(state.ema_params, ref_state.ema_params),
            "opt_diff": max_abs_diff(state.opt_state, ref_state.opt_state),
            "step": int(state.step),
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
