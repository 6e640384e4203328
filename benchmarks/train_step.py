"""Train-step speed and memory of BSMamba2.

    python benchmarks/train_step.py speed [--configs tiny,demo] [--steps 5]
    python benchmarks/train_step.py memory [--seconds 1,2,4,8] [--batch 1] [--variant ""]

speed: examples/s of the jitted train step (clip + AdamW + accumulation + EMA, donated state) at
each config's segment length and global batch, on the default device(s); the first call
(compilation) is not timed. On a GPU run `--configs paper` for the paper config.

memory: XLA's compiled memory analysis of one train step (no execution, works on any backend)
for the paper model at each segment length, with remat off and on: argument bytes (state +
batch), temporaries (activations, gradients) and their sum per example. Run it on the target
backend (`JAX_PLATFORMS=cuda`) for exact numbers; CPU numbers are close to the GPU's as the same
buffers are live, but fusion differs.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bsmamba2_jax.losses import separation_loss
from bsmamba2_jax.model import BSMamba2
from bsmamba2_jax.train.optim import make_optimizer
from bsmamba2_jax.train.state import init_train_state
from bsmamba2_jax.train.step import make_train_step
from configs.bsmamba2 import get_config


def make(config, samples: int):
    model = BSMamba2(**config.model)
    tx = make_optimizer(config)
    init_fn = functools.partial(init_train_state, model, tx,
                                example_audio=jnp.zeros((1, 2, samples), jnp.float32))
    step = jax.jit(make_train_step(model, tx, separation_loss, config.ema_decay),
                   donate_argnums=0)
    return init_fn, step


def batch(b: int, samples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocals = 0.3 * rng.standard_normal((b, 2, samples)).astype(np.float32)
    return {"mixture": vocals + 0.3 * rng.standard_normal((b, 2, samples)).astype(np.float32),
            "vocals": vocals}


def speed(variants: list[str], steps: int) -> None:
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"{jax.device_count()} device(s)")
    print("| config | params | segment (s) | batch | compile (s) | step (s) | examples/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        config = get_config("" if v == "paper" else v)
        samples = int(round(config.data.segment_seconds * config.data.sample_rate))
        b = config.data.batch_size
        init_fn, step = make(config, samples)
        state = jax.jit(init_fn)(jax.random.PRNGKey(0))
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        data = batch(b, samples)
        t = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, data)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
        print(f"| {v} | {n_params:,} | {config.data.segment_seconds:g} | {b} | {compile_s:.1f} "
              f"| {dt:.3f} | {b / dt:.2f} |", flush=True)


def memory(seconds: list[float], b: int, variant: str) -> None:
    print(f"backend: {jax.default_backend()}, config {variant or 'paper'}, batch {b}, "
          "MiB from compiled.memory_analysis()")
    print("| segment (s) | remat | arguments | temporaries | total | total per example |")
    print("|---:|---|---:|---:|---:|---:|")
    mib = 2.0**20
    for s in seconds:
        for remat in (False, True):
            config = get_config(variant)
            config.model.remat = remat
            samples = int(round(s * config.data.sample_rate))
            init_fn, step = make(config, samples)
            state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
            data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                batch(b, samples))
            mem = step.lower(state, data).compile().memory_analysis()
            args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
            total = args + temp + mem.output_size_in_bytes - mem.alias_size_in_bytes
            print(f"| {s:g} | {'on' if remat else 'off'} | {args / mib:,.0f} | {temp / mib:,.0f} "
                  f"| {total / mib:,.0f} | {total / b / mib:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--configs", default="tiny,demo", help="comma list of tiny, demo, paper")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the compiling one")
    p = sub.add_parser("memory")
    p.add_argument("--seconds", default="1,2,4,8", help="comma list of segment lengths (s)")
    p.add_argument("--batch", type=int, default=1, help="examples per step (per device)")
    p.add_argument("--variant", default="", help='config variant; "" = the paper model')
    args = parser.parse_args()
    if args.mode == "speed":
        speed(args.configs.split(","), args.steps)
    else:
        memory([float(x) for x in args.seconds.split(",")], args.batch, args.variant)


if __name__ == "__main__":
    main()
