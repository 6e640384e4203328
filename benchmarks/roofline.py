"""Measures the card's two ceilings and sets SSD benchmark rows against them.

    python benchmarks/roofline.py --json roofline.json                 # measure, print
    python benchmarks/roofline.py --json roofline.json --ssd ssd.json  # ... and the SSD table
    python benchmarks/roofline.py --ceilings roofline.json --ssd ssd*.json --peers peers*.json \
        --markdown table.md                                            # table, no re-measure

Ceilings (measured, not datasheet):
  copy bandwidth   y = x + 1 over a large float32 array (bytes read + bytes written) / time
  bf16 matmul rate a large bf16 x bf16 -> bf16 product, 2 M N K / time
The table (Markdown) gives, per SSD row (benchmarks/ssd.py --json; benchmarks/peers.py --json
for mamba_ssm's Triton kernels): ms; speed-up over "xla" and over mamba_ssm at the same shape,
dtype and mode (their ms / this row's ms: > 1 is faster); achieved TB/s and TFLOP/s (ssd.py's
byte and FLOP counts, the same for every impl) and their share of the measured ceilings; the
memory floor (bytes / copy bandwidth) and the row's time over it.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _ratio(times: dict, key: tuple, impl: str, ms: float) -> str:
    other = times.get((*key, impl))
    return "-" if other is None else f"{other / ms:.2f}x"


def ssd_table(rows: list[dict], bandwidth: float, matmul: float) -> list[str]:
    """Markdown lines, one row per SSD benchmark row; ssd.py's gbps/gflops are turned back into
    bytes/FLOPs."""
    times = {(r["name"], r["dtype"], r["mode"], r["impl"]): r["ms"] for r in rows}
    lines = ["| shape | b | dtype | mode | impl | ms | xla ms / ms | mamba_ssm ms / ms | TB/s "
             "| % copy | TFLOP/s | % mma | floor ms | x floor |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds = r["ms"] / 1e3
        nbytes = r["gbps"] * 1e9 * seconds
        flops = r["gflops"] * 1e9 * seconds
        floor = nbytes / bandwidth
        key = (r["name"], r["dtype"], r["mode"])
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['dtype']} | {r['mode']} | {r['impl']} "
            f"| {r['ms']:.3f} | {_ratio(times, key, 'xla', r['ms'])} "
            f"| {_ratio(times, key, 'mamba_ssm', r['ms'])} | {nbytes / seconds / 1e12:.2f} "
            f"| {100 * nbytes / seconds / bandwidth:.1f} | {flops / seconds / 1e12:.1f} "
            f"| {100 * flops / seconds / matmul:.1f} | {floor * 1e3:.3f} | {seconds / floor:.2f} |")
    return lines


def goals(rows: list[dict], bandwidth: float) -> list[str]:
    """The Pallas kernels' goals at the BSMamba2 time axis, forward+backward, per dtype and
    Pallas impl ("pallas_triton", "pallas_mosaic", or the older rows' "pallas")."""
    times = {(r["name"], r["dtype"], r["mode"], r["impl"]): r for r in rows}
    lines = []
    impls = sorted({r["impl"] for r in rows if r["impl"].startswith("pallas")})
    for dtype, impl in ((d, i) for d in sorted({r["dtype"] for r in rows}) for i in impls):
        key = ("time-axis", dtype, "fwdbwd")
        pallas = times.get((*key, impl))
        if pallas is None:
            continue
        ms = pallas["ms"]
        floor_ms = pallas["gbps"] * 1e9 * ms / bandwidth  # bytes / (bytes/s), in ms
        parts = [f"x floor {ms / floor_ms:.2f} (goal <= 3)"]
        if (xla := times.get((*key, "xla"))) is not None:
            parts.insert(0, f"{xla['ms'] / ms:.2f}x xla (goal >= 2)")
        if (peer := times.get((*key, "mamba_ssm"))) is not None:
            parts.insert(1, f"{ms / peer['ms']:.2f}x mamba_ssm's time (goal <= 1.5)")
        lines.append(f"- time axis, {dtype}, fwd+bwd: {impl} " + ", ".join(parts))
    return lines


def _rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths or []:
        if os.path.exists(path):
            with open(path) as f:
                rows += json.load(f)["rows"]
        else:
            print(f"(no {path}: its rows are missing)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the measured ceilings here")
    parser.add_argument("--ssd", nargs="*", default=None,
                        help="benchmarks/ssd.py --json outputs to tabulate")
    parser.add_argument("--peers", nargs="*", default=None,
                        help="benchmarks/peers.py --json outputs (mamba_ssm rows)")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    parser.add_argument("--ceilings", default=None,
                        help="read the ceilings from an earlier --json instead of measuring")
    parser.add_argument("--copy_gib", type=float, default=1.0)
    parser.add_argument("--matmul_size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    if args.ceilings:
        with open(args.ceilings) as f:
            measured = json.load(f)
        bandwidth, matmul = measured["copy_bytes_per_s"], measured["bf16_matmul_flops_per_s"]
        device = measured.get("device", device)
    else:
        bandwidth = copy_bandwidth(args.copy_gib, args.repeats)
        matmul = bf16_matmul_rate(args.matmul_size, args.repeats)
    head = (f"device={device} backend={jax.default_backend()} jax={jax.__version__}\n"
            f"copy bandwidth {bandwidth / 1e12:.3f} TB/s, bf16 matmul {matmul / 1e12:.1f} TFLOP/s")
    print(head)
    if args.json and not args.ceilings:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, copy_bytes_per_s=bandwidth,
                           bf16_matmul_flops_per_s=matmul), f, indent=1)
    if args.ssd is not None or args.peers is not None:
        rows = _rows(args.ssd) + _rows(args.peers)
        lines = ssd_table(rows, bandwidth, matmul) + [""] + goals(rows, bandwidth)
        print()
        print("\n".join(lines))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(head.replace("\n", "; ") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
