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
from tests.bsmamba2_jax.train_helpers import (  # noqa: E402
    build,
    max_abs_diff,
    random_batch,
    tiny_config,
)

FSDP_MIN_SIZE = 256  # the tiny model's arrays are small; shard most of them anyway


def run(mesh, step_fn, init_state, batches):
    state_sh = shard_lib.state_shardings(mesh, init_state, FSDP_MIN_SIZE)
    data_sh = shard_lib.batch_sharding(mesh)
    state = jax.device_put(init_state, state_sh)
    step = jax.jit(step_fn, in_shardings=(state_sh, data_sh),
                   out_shardings=(state_sh, shard_lib.replicated(mesh)), donate_argnums=0)
    state_bytes = max(shard_lib.per_device_bytes(state).values())
    losses = []
    for b in batches:
        state, metrics = step(state, {k: jax.device_put(v, data_sh) for k, v in b.items()})
        losses.append(float(metrics["loss"]))
    sharded_leaves = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
    return jax.device_get(state), losses, state_bytes, sharded_leaves


def main():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    # Adam divides by sqrt(v) + eps: with eps = 1e-8 a parameter whose gradient is ~0 up to
    # rounding (different summation order across devices) moves by +-lr either way. A larger
    # eps makes the update a smooth function of the gradient, so 1e-5 is a fair tolerance.
    config = tiny_config(accum_steps=2, eps=1e-3)
    _, _, init_fn, step_fn = build(config)
    init_state = jax.device_get(jax.jit(init_fn)(jax.random.PRNGKey(0)))
    batches = [random_batch(seed, 8) for seed in (1, 2)]  # 2 micro-batches = 1 update
    ref_state, ref_losses, ref_bytes, _ = run(
        shard_lib.make_mesh(1, 1, devices=jax.devices()[:1]), step_fn, init_state, batches)
    out = {"single": {"losses": ref_losses, "state_bytes": ref_bytes}}
    for data, fsdp in ((8, 1), (2, 4)):
        state, losses, nbytes, n_sharded = run(
            shard_lib.make_mesh(data, fsdp), step_fn, init_state, batches)
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
