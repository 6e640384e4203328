"""What a training run costs: FLOPs of one train step and the whole schedule, as GPU hours.

    python benchmarks/train_cost.py [--variant ""] [--tflops 989] [--utilization 1.0,0.3]
                                    [--seconds 8] [--json]

Counts the floating-point operations of one train step of the config's global micro-batch at
`--seconds` per example as 3x the forward's matmul FLOPs (`benchmarks/model.py`'s count: each
matmul has two gradient matmuls of its size; elementwise work, the optimizer and the EMA left
out), multiplies by config.total_steps, and divides by a device rate times each utilization.
XLA's cost analysis of the lowered step is printed beside it but not used: it counts the body
of a loop once, and the SSD's chunks and the dual-path passes' sequence groups are loops. The
default rate is an H100 SXM's dense bf16 peak (989 TFLOP/s). The hours are an ESTIMATE: real step
times depend on how well the kernels use the device (measure them with
`benchmarks/train_step.py speed` on it).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from model import counted_flops  # benchmarks/model.py

from bsmamba2_jax.train.build import build
from configs.bsmamba2 import get_config


def xla_step_flops(config, parts, seconds: float) -> float:
    """XLA's cost analysis of one lowered train step (loop bodies counted once)."""
    samples = int(round(seconds * config.data.sample_rate))
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, 2, samples), np.float32)
             for k in ("mixture", "vocals")}
    lowered = jax.jit(parts.train_step).lower(parts.abstract_state(), batch)
    return float(lowered.cost_analysis()["flops"])


def step_flops(config, model, seconds: float) -> float:
    """3x the forward's matmul FLOPs for a (batch_size, 2, seconds * rate) micro-batch."""
    samples = int(round(seconds * config.data.sample_rate))
    return 3.0 * sum(counted_flops(model, samples, config.data.batch_size).values())


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
    parts = build(config)
    flops = step_flops(config, parts.model, seconds)
    xla_flops = xla_step_flops(config, parts, seconds)
    total = flops * config.total_steps
    updates = config.total_steps // config.optim.accum_steps
    hours = {u: total / (args.tflops * 1e12 * u) / 3600
             for u in (float(x) for x in args.utilization.split(","))}
    result = {"variant": args.variant or "paper", "batch": config.data.batch_size,
              "seconds": seconds, "step_tflop": flops / 1e12,
              "xla_cost_analysis_step_tflop": xla_flops / 1e12,
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
    print(f"one train step: {flops / 1e12:.2f} TFLOP (3x the forward's matmuls; XLA's cost "
          f"analysis, loops counted once: {xla_flops / 1e12:.2f}); the run: "
          f"{total / 1e18:.1f} EFLOP")
    print("| device rate | utilization | hours (ESTIMATE) | days |")
    print("|---:|---:|---:|---:|")
    for u, h in hours.items():
        print(f"| {args.tflops:g} TFLOP/s | {u:.0%} | {h:,.0f} | {h / 24:.1f} |")


if __name__ == "__main__":
    main()
