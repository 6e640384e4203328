"""Measures the card's two ceilings and sets SSD benchmark rows against them.

    python benchmarks/roofline.py --json roofline.json                 # measure, print
    python benchmarks/roofline.py --json roofline.json --ssd ssd.json  # ... and the SSD table
    python benchmarks/roofline.py --ceilings roofline.json --ssd ssd.json  # table, no re-measure

Ceilings (measured, not datasheet):
  copy bandwidth   y = x + 1 over a large float32 array (bytes read + bytes written) / time
  bf16 matmul rate a large bf16 x bf16 -> bf16 product, 2 M N K / time
The table gives, per SSD row (from benchmarks/ssd.py --json): ms, achieved TB/s and TFLOP/s (with
ssd.py's byte and FLOP counts), their share of the measured ceilings, and the memory floor
(bytes / copy bandwidth) with the row's time over it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def _median_seconds(f, args_list, repeats: int) -> float:
    """Median wall time of f, rotating over several argument sets (no cache-resident reruns)."""
    for args in args_list:
        jax.block_until_ready(f(*args))
    times = []
    for i in range(repeats):
        args = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0, repeats: int = 20) -> float:
    """Bytes/s of an elementwise pass: reads and writes `gib` GiB each."""
    n = int(gib * 2**30) // 4
    keys = jax.random.split(jax.random.key(0), 2)
    arrays = [(jax.random.normal(k, (n,), jnp.float32),) for k in keys]  # random, never zeros
    f = jax.jit(lambda x: x + 1.0)
    return 2 * n * 4 / _median_seconds(f, arrays, repeats)


def bf16_matmul_rate(size: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a (size x size) @ (size x size) bf16 product."""
    keys = jax.random.split(jax.random.key(1), 4)
    mats = [(jax.random.normal(keys[i], (size, size), jnp.bfloat16),
             jax.random.normal(keys[i + 1], (size, size), jnp.bfloat16)) for i in (0, 2)]
    f = jax.jit(lambda a, b: a @ b)
    return 2 * size**3 / _median_seconds(f, mats, repeats)


def ssd_table(rows: list[dict], bandwidth: float, matmul: float) -> list[str]:
    """One line per SSD benchmark row; ssd.py's gbps/gflops are recomputed into bytes/FLOPs."""
    head = (f"{'shape':<12} {'dtype':<9} {'mode':<7} {'impl':<7} {'ms':>9} {'TB/s':>6} "
            f"{'%copy':>6} {'TFLOP/s':>8} {'%mma':>6} {'floor ms':>9} {'x floor':>8}")
    lines = [head]
    for r in rows:
        seconds = r["ms"] / 1e3
        nbytes = r["gbps"] * 1e9 * seconds
        flops = r["gflops"] * 1e9 * seconds
        floor = nbytes / bandwidth
        lines.append(
            f"{r['name']:<12} {r['dtype']:<9} {r['mode']:<7} {r['impl']:<7} {r['ms']:>9.3f} "
            f"{nbytes / seconds / 1e12:>6.2f} {100 * nbytes / seconds / bandwidth:>5.1f}% "
            f"{flops / seconds / 1e12:>8.1f} {100 * flops / seconds / matmul:>5.1f}% "
            f"{floor * 1e3:>9.3f} {seconds / floor:>8.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the measured ceilings here")
    parser.add_argument("--ssd", default=None, help="benchmarks/ssd.py --json output to tabulate")
    parser.add_argument("--ceilings", default=None,
                        help="read the ceilings from an earlier --json instead of measuring")
    parser.add_argument("--copy_gib", type=float, default=1.0)
    parser.add_argument("--matmul_size", type=int, default=8192)
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    if args.ceilings:
        with open(args.ceilings) as f:
            measured = json.load(f)
        bandwidth, matmul = measured["copy_bytes_per_s"], measured["bf16_matmul_flops_per_s"]
    else:
        bandwidth = copy_bandwidth(args.copy_gib)
        matmul = bf16_matmul_rate(args.matmul_size)
    print(f"device={device} backend={jax.default_backend()} jax={jax.__version__}")
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s, bf16 matmul {matmul / 1e12:.1f} TFLOP/s")
    if args.json and not args.ceilings:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, copy_bytes_per_s=bandwidth,
                           bf16_matmul_flops_per_s=matmul), f, indent=1)
    if args.ssd:
        with open(args.ssd) as f:
            rows = json.load(f)["rows"]
        print()
        print("\n".join(ssd_table(rows, bandwidth, matmul)))


if __name__ == "__main__":
    main()
