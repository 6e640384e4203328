"""What a training run costs: FLOPs of one train step and the whole schedule, as GPU hours.

    python benchmarks/train_cost.py [--variant ""] [--tflops 989] [--utilization 1.0,0.3]
                                    [--seconds 8] [--json]

Counts the floating-point operations of one jitted train step (forward, backward, optimizer,
EMA) of the config's global micro-batch at `--seconds` per example with XLA's cost analysis of
the lowered step (no compilation, no execution: runs on a CPU in seconds), multiplies by
config.total_steps, and divides by a device rate times each utilization. The default rate is an
H100 SXM's dense bf16 peak (989 TFLOP/s). The hours are an ESTIMATE: real step times depend on
how well the kernels use the device (measure them with `benchmarks/train_step.py speed` on it).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from bsmamba2_jax.train.build import build
from configs.bsmamba2 import get_config


def step_flops(config, seconds: float) -> float:
    """FLOPs of one train step on a (batch_size, 2, seconds * rate) micro-batch."""
    parts = build(config)
    samples = int(round(seconds * config.data.sample_rate))
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, 2, samples), np.float32)
             for k in ("mixture", "vocals")}
    lowered = jax.jit(parts.train_step).lower(parts.abstract_state(), batch)
    return float(lowered.cost_analysis()["flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="", help='config variant; "" = the paper config')
    parser.add_argument("--seconds", type=float, default=None,
                        help="segment length (default: the config's)")
    parser.add_argument("--tflops", type=float, default=989.0,
                        help="device peak in TFLOP/s (H100 SXM dense bf16: 989)")
    parser.add_argument("--utilization", default="1.0,0.3",
                        help="fractions of the peak to project at, comma separated")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()
    config = get_config(args.variant)
    seconds = config.data.segment_seconds if args.seconds is None else args.seconds
    flops = step_flops(config, seconds)
    total = flops * config.total_steps
    updates = config.total_steps // config.optim.accum_steps
    hours = {u: total / (args.tflops * 1e12 * u) / 3600
             for u in (float(x) for x in args.utilization.split(","))}
    result = {"variant": args.variant or "paper", "batch": config.data.batch_size,
              "seconds": seconds, "step_tflop": flops / 1e12,
              "total_steps": config.total_steps, "updates": updates,
              "examples": config.total_steps * config.data.batch_size,
              "total_eflop": total / 1e18, "device_tflops": args.tflops,
              "hours_at_utilization": hours}
    if args.json:
        print(json.dumps(result))
        return
    print(f"config {result['variant']}: micro-batch {config.data.batch_size} x {seconds:g} s, "
          f"{config.total_steps:,} micro-batches = {updates:,} updates of "
          f"{config.data.batch_size * config.optim.accum_steps} examples")
    print(f"one train step: {flops / 1e12:.2f} TFLOP (XLA cost analysis of the lowered step); "
          f"the run: {total / 1e18:.1f} EFLOP")
    print("| device rate | utilization | hours (ESTIMATE) | days |")
    print("|---:|---:|---:|---:|")
    for u, h in hours.items():
        print(f"| {args.tflops:g} TFLOP/s | {u:.0%} | {h:,.0f} | {h / 24:.1f} |")


if __name__ == "__main__":
    main()
