"""Scaling study: examples/s and per-device memory vs device count and (data x fsdp) mesh shape.

    python benchmarks/scaling.py [--config tiny] [--devices 1,2,4,8] [--per-device-batch 1]
                                 [--steps 3] [--seconds 0.5] [--out benchmarks/scaling.png]

On a CPU machine each device count runs in a subprocess with that many virtual CPU devices
(`--xla_force_host_platform_device_count`), so the numbers show the sharding overheads and the
memory split, not real speed-ups (all virtual devices share the same cores). On GPUs/TPUs the
same command uses the first N real devices. For every N and every mesh data x fsdp with
data * fsdp = N: the global batch is per-device-batch * N, and the table gives the step time,
examples/s, per-device bytes of the train state (params + EMA + optimizer) and XLA's per-device
temporaries of the compiled step. Writes a PNG with examples/s and state MiB per device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args) -> list[dict]:
    """Runs inside one process: every mesh shape of jax.device_count() devices."""
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np

    from bsmamba2_jax.train import sharding as shard_lib
    from bsmamba2_jax.train.build import build, shard
    from configs.bsmamba2 import get_config

    n = args.n
    config = get_config("" if args.config == "paper" else args.config)
    samples = int(round(args.seconds * config.data.sample_rate))
    parts = build(config)
    rng = np.random.default_rng(0)
    b = args.per_device_batch * n
    vocals = 0.3 * rng.standard_normal((b, 2, samples)).astype(np.float32)
    host_batch = {"mixture": vocals + 0.3 * rng.standard_normal(vocals.shape, np.float32),
                  "vocals": vocals}
    rows = []
    for fsdp in [f for f in range(1, n + 1) if n % f == 0]:
        mesh = shard_lib.make_mesh(n // fsdp, fsdp, devices=jax.devices()[:n])
        run = shard(parts, mesh, config.mesh.fsdp_min_size)
        step = run.train_step
        state = run.init(jax.random.PRNGKey(0))
        batch = {k: jax.device_put(v, run.data_sharding) for k, v in host_batch.items()}
        compiled = step.lower(state, batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        state, m = step(state, batch)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / args.steps
        state_bytes = max(shard_lib.per_device_bytes(state).values())
        rows.append({"devices": n, "data": n // fsdp, "fsdp": fsdp, "batch": b,
                     "step_s": dt, "examples_per_s": b / dt,
                     "state_mib_per_device": state_bytes / 2**20,
                     "temp_mib_per_device": temp / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="tiny, demo or paper")
    parser.add_argument("--devices", default="1,2,4,8", help="device counts to try")
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mesh")
    parser.add_argument("--seconds", type=float, default=0.5, help="segment length (s)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "scaling.png"))
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.n:
        print("ROWS " + json.dumps(measure(args)))
        return

    import jax

    cpu = jax.default_backend() == "cpu"
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        env = dict(os.environ)
        if cpu:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, __file__, f"--n={n}", f"--config={args.config}",
               f"--per-device-batch={args.per_device_batch}", f"--steps={args.steps}",
               f"--seconds={args.seconds}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{n} devices failed:\n{out.stderr[-3000:]}")
        rows += json.loads(out.stdout.split("ROWS ", 1)[1])
    print(f"config {args.config}, segment {args.seconds} s, per-device batch "
          f"{args.per_device_batch}, backend {jax.default_backend()}"
          + (" (virtual CPU devices share the same cores)" if cpu else ""))
    print("| devices | data x fsdp | batch | step (s) | examples/s | state MiB/device "
          "| temporaries MiB/device |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['devices']} | {r['data']} x {r['fsdp']} | {r['batch']} | {r['step_s']:.3f} "
              f"| {r['examples_per_s']:.2f} | {r['state_mib_per_device']:.1f} "
              f"| {r['temp_mib_per_device']:.1f} |")
    plot(rows, args.out)
    print(f"plot: {args.out}")


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for fsdp in sorted({r["fsdp"] for r in rows}):
        sel = [r for r in rows if r["fsdp"] == fsdp]
        x = [r["devices"] for r in sel]
        ax1.plot(x, [r["examples_per_s"] for r in sel], "o-", label=f"fsdp={fsdp}")
        ax2.plot(x, [r["state_mib_per_device"] for r in sel], "o-", label=f"fsdp={fsdp}")
    for ax, title in ((ax1, "examples/s"), (ax2, "train state MiB per device")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
