"""Train-step speed and memory of BSMamba2 on the default backend (GPU, TPU or CPU).

    python benchmarks/train_step.py speed --config=configs/bsmamba2.py --seconds 8 \
        --batches 1,2,4,8 --remat none,layer,block --impls xla,pallas --dtype bfloat16 \
        [--group-tokens 0] [--steps 3] [--peak-tflops X] [--isolate] [--json out.json]
    python benchmarks/train_step.py memory --config=configs/bsmamba2.py --seconds 1,2,4,8 \
        --remat none,layer,block [--batch 1] [--json out.json]
    # a dry run in seconds on a CPU:
    python benchmarks/train_step.py speed --config=configs/bsmamba2.py:tiny --seconds 0.5 \
        --batches 1,2 --remat none,block --impls xla --dtype float32

The step is the real one (`make_train_step`: loss, backward, clip, AdamW, accumulation, EMA,
donated state), jitted for one device. Options left out keep the config's value (`--config`
is a config file with an optional `:variant`, as for train.py).

speed: for each impl and remat mode, batches in increasing order: compile time, step time (the
mean of `--steps` timed steps after one untimed, and the best one: with gradient accumulation
only one micro-batch in `optim.accum_steps` updates the weights and the EMA, so time a multiple
of it), examples/s (from the mean), model FLOPs per step, MFU and the
device's peak memory. A batch that runs out of memory (RESOURCE_EXHAUSTED, at compile or run
time) ends that sweep; "largest batch that fits" is the last one before it. Model FLOPs are
XLA's cost analysis of the same step without remat and without sequence groups (recomputation
is not model work, and XLA counts a loop body once); MFU = model FLOPs / step time / peak, with
`--peak-tflops` (per device, for the dtype used) or a known card's dense bf16 peak. Peak memory
is `device.memory_stats()["peak_bytes_in_use"]`, the high-water mark of the process: rows run in
increasing order, or give `--isolate` to run each row in a fresh process for a clean peak.
On a CPU, the "xla" SSD loops over chunk groups, so XLA's FLOPs and the MFU are too low there.

memory: XLA's compiled memory analysis of one train step (nothing runs; any backend): arguments
(train state + batch), temporaries (activations, gradients), output, and temporaries per
example-second, for each segment length and remat mode. Run it with `JAX_PLATFORMS=cuda` for the
GPU's buffer assignment; the CPU's is larger (its default scheduler favours concurrency).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from bsmamba2_jax.train.build import build
from configs import load_config

MIB = 2.0**20
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of cards this benchmark is run on.
KNOWN_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def configure(config: ml_collections.ConfigDict, *, remat: str | None = None,
              impl: str | None = None, dtype: str | None = None,
              group_tokens: int | None = None) -> ml_collections.ConfigDict:
    """A copy of config with the given model fields replaced (None or "" keeps the config's)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for field, value in (("remat", remat), ("ssd_impl", impl), ("dtype", dtype),
                         ("group_tokens", group_tokens)):
        if value is not None and value != "":
            config.model[field] = value
    return config


def make_step(config: ml_collections.ConfigDict):
    """(init_fn(rng) -> state, jitted train step) from the wiring train.py uses (the parameter
    shapes do not depend on the segment length)."""
    parts = build(config)
    return parts.init_fn, jax.jit(parts.train_step, donate_argnums=0)


def make_batch(batch: int, samples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocals = 0.3 * rng.standard_normal((batch, 2, samples)).astype(np.float32)
    noise = 0.3 * rng.standard_normal((batch, 2, samples)).astype(np.float32)
    return {"mixture": vocals + noise, "vocals": vocals}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def xla_flops(lowered_or_compiled) -> float:
    """FLOPs of XLA's cost analysis (nan when the backend gives none)."""
    cost = lowered_or_compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def model_flops(config: ml_collections.ConfigDict, batch: int, samples: int) -> float:
    """XLA's FLOPs of one train step without remat and sequence groups (lowered, not compiled)."""
    init_fn, step = make_step(configure(config, remat="none", group_tokens=0))
    state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    return xla_flops(step.lower(state, abstract(make_batch(batch, samples))))


def is_oom(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err)


def peak_tflops(arg: float | None) -> float | None:
    if arg:
        return arg
    kind = jax.devices()[0].device_kind
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in kind), None)


def device_peak_bytes() -> float | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def speed_row(config: ml_collections.ConfigDict, seconds: float, batch: int, steps: int,
              peak: float | None) -> dict:
    """One (config, batch) measurement; raises on failure (OOM included)."""
    samples = int(round(seconds * config.data.sample_rate))
    init_fn, step = make_step(config)
    data = jax.device_put(make_batch(batch, samples))
    state = jax.jit(init_fn)(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    mean, best = float(np.mean(times)), min(times)
    flops = model_flops(config, batch, samples)
    n_dev = 1  # the step is jitted for one device
    return {
        "compile_s": compile_s, "step_s": mean, "best_step_s": best,
        "examples_per_s": batch / mean, "model_flops": flops,
        "mfu": flops / mean / (peak * 1e12 * n_dev) if peak else None,
        "temp_mib": mem.temp_size_in_bytes / MIB if mem else None,
        "peak_device_mib": (p / MIB) if (p := device_peak_bytes()) is not None else None,
        "loss": float(metrics["loss"]),
    }


def isolated_row(args: argparse.Namespace, impl: str, remat: str, group_tokens: int | None,
                 batch: int) -> dict:
    """speed_row in a fresh process (clean peak memory); {"oom": True} or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "speed", f"--config={args.config}",
               "--seconds", str(args.seconds), "--batches", str(batch), "--remat", remat,
               "--impls", impl, "--steps", str(args.steps), "--json", str(out)]
        cmd += ["--dtype", args.dtype] if args.dtype else []
        cmd += ["--group-tokens", str(group_tokens)] if group_tokens is not None else []
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())["rows"][0]
        return {"oom": True} if is_oom(Exception(proc.stderr)) else {"error": proc.stderr[-2000:]}


def speed(args: argparse.Namespace) -> list[dict]:
    base = load_config(args.config)
    seconds = args.seconds or base.data.segment_seconds
    peak = peak_tflops(args.peak_tflops)
    dev = jax.devices()[0]
    print(f"# train step, {args.config}, {seconds:g} s segments, backend {dev.platform} "
          f"({dev.device_kind}), peak {peak or '?'} TFLOP/s, jax {jax.__version__}")
    print("| impl | remat | group tokens | batch | compile s | step s (mean) | best s | examples/s "
          "| model TFLOP | MFU | temp MiB | device peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for impl in args.impls.split(","):
        for remat in args.remat.split(","):
            for gt in parse_ints(args.group_tokens) if args.group_tokens else [None]:
                config = configure(base, remat=remat, impl=impl, dtype=args.dtype,
                                   group_tokens=gt)
                for batch in parse_ints(args.batches):
                    row = {"impl": impl, "remat": remat, "dtype": config.model.dtype,
                           "group_tokens": config.model.group_tokens, "seconds": seconds,
                           "batch": batch}
                    if args.isolate:
                        row.update(isolated_row(args, impl, remat, gt, batch))
                    else:
                        try:
                            row.update(speed_row(config, seconds, batch, args.steps, peak))
                        except Exception as err:  # noqa: BLE001 - OOM ends a sweep, else re-raise
                            if not is_oom(err):
                                raise
                            row["oom"] = True
                    rows.append(row)
                    print(format_speed(row), flush=True)
                    if row.get("oom") or row.get("error"):
                        break  # larger batches will not fit either
    for impl in args.impls.split(","):
        for remat in args.remat.split(","):
            fits = [r["batch"] for r in rows if r["impl"] == impl and r["remat"] == remat
                    and "step_s" in r]
            print(f"# largest batch that fits, {impl}, remat {remat}: "
                  f"{max(fits) if fits else 'none'}")
    return rows


def format_speed(r: dict) -> str:
    head = f"| {r['impl']} | {r['remat']} | {r['group_tokens']} | {r['batch']} |"
    if r.get("oom"):
        return head + " out of memory |"
    if r.get("error"):
        return head + " error: " + r["error"].strip().splitlines()[-1][:100] + " |"
    fmt = lambda v, f: "-" if v is None or v != v else format(v, f)  # noqa: E731
    return (head + f" {r['compile_s']:.1f} | {r['step_s']:.3f} | "
            f"{fmt(r.get('best_step_s'), '.3f')} | {r['examples_per_s']:.2f} | "
            f"{fmt(r['model_flops'] / 1e12, '.2f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['temp_mib'], ',.0f')} | {fmt(r['peak_device_mib'], ',.0f')} |")


def memory(args: argparse.Namespace) -> list[dict]:
    base = load_config(args.config)
    print(f"# train step memory (compiled, not run), {args.config}, backend "
          f"{jax.default_backend()}, batch {args.batch}, MiB")
    print("| impl | remat | group tokens | segment s | arguments | temporaries | output "
          "| temporaries per example-second | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for impl in args.impls.split(",") if args.impls else [None]:
        for gt in parse_ints(args.group_tokens) if args.group_tokens else [None]:
            for seconds in [float(s) for s in args.seconds.split(",")]:
                for remat in args.remat.split(","):
                    config = configure(base, remat=remat, impl=impl, dtype=args.dtype,
                                       group_tokens=gt)
                    samples = int(round(seconds * config.data.sample_rate))
                    init_fn, step = make_step(config)
                    state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
                    t0 = time.perf_counter()
                    mem = step.lower(state, abstract(make_batch(args.batch, samples))
                                     ).compile().memory_analysis()
                    row = {"impl": config.model.ssd_impl, "remat": remat,
                           "dtype": config.model.dtype,
                           "group_tokens": config.model.group_tokens, "seconds": seconds,
                           "batch": args.batch,
                           "argument_mib": mem.argument_size_in_bytes / MIB,
                           "temp_mib": mem.temp_size_in_bytes / MIB,
                           "output_mib": mem.output_size_in_bytes / MIB,
                           "alias_mib": mem.alias_size_in_bytes / MIB,
                           "compile_s": time.perf_counter() - t0}
                    row["temp_gib_per_example_s"] = row["temp_mib"] / 1024 / args.batch / seconds
                    rows.append(row)
                    print(f"| {row['impl']} | {remat} | {row['group_tokens']} | {seconds:g} | "
                          f"{row['argument_mib']:,.0f} | {row['temp_mib']:,.0f} | "
                          f"{row['output_mib']:,.0f} | "
                          f"{row['temp_gib_per_example_s']:.2f} GiB | {row['compile_s']:.0f} |",
                          flush=True)
    return rows


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("speed", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--config", default="configs/bsmamba2.py",
                       help="config file[:variant] (default: the paper config)")
        p.add_argument("--remat", default="none,layer,block", help="comma list of remat modes")
        p.add_argument("--impls", default="", help="comma list of SSD impls (default: config's)")
        p.add_argument("--dtype", default="", help="compute dtype (default: config's)")
        p.add_argument("--group-tokens", default="",
                       help="comma list of model.group_tokens values (default: config's)")
        p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p = sub.choices["speed"]
    p.add_argument("--seconds", type=float, default=0.0,
                   help="segment length (default: config's)")
    p.add_argument("--batches", default="1", help="comma list of batch sizes, increasing")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak for MFU (default: a known card's bf16 peak)")
    p.add_argument("--isolate", action="store_true", help="each row in a fresh process")
    p = sub.choices["memory"]
    p.add_argument("--seconds", default="1,2,4,8", help="comma list of segment lengths")
    p.add_argument("--batch", type=int, default=1, help="examples per step")
    args = parser.parse_args()
    if args.mode == "speed" and not args.impls:
        args.impls = load_config(args.config).model.ssd_impl
    rows = speed(args) if args.mode == "speed" else memory(args)
    if args.json:
        meta = {"mode": args.mode, "config": args.config, "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
