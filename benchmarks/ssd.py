"""Times the SSD implementations over a grid of shapes and prints a table (and writes JSON).

    python benchmarks/ssd.py                                  # check shape + sweep, scan and xla
    python benchmarks/ssd.py --shapes bsmamba2 --batch 2      # the model's shapes, 2 sequences
    python benchmarks/ssd.py --impls xla,pallas --dtypes bfloat16,float32 --json out.json

Columns: median wall time over repeats (ms), tokens/s (b*l / time), achieved GFLOP/s and GB/s
from the counts below, compiled temporary memory (XLA memory analysis, MiB), and the relative error
max|y - y_scan| / max|y_scan| of the forward output against the "scan" reference (when scan ran).

FLOP count (the chunked SSD algorithm, multiply-adds as 2 FLOPs; the same count is used for every
impl so that GFLOP/s compares like with like), for b sequences of length l, chunk Q, h heads,
head dim p, state n, g groups, c = ceil(l / Q):
    C.B^T per chunk and group   2 b c g Q^2 n
    intra-chunk output          2 b c h Q^2 p
    chunk states                2 b c h Q p n
    state -> output             2 b c h Q p n
Forward+backward is counted as 3x the forward (each matmul has two gradient matmuls).

Byte count (what must cross memory at least once): forward reads x, dt, B, C and writes y and the
final state; forward+backward additionally reads x, dt, B, C and dy and writes dx, ddt, dB, dC.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kernels.ssd import mamba_chunk_scan


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seqlen: int
    chunk: int
    nheads: int = 16
    headdim: int = 64
    dstate: int = 128
    ngroups: int = 1


def bsmamba2_shapes(batch: int | None) -> list[Shape]:
    """The model's two SSD calls per 8 s segment and batch 5: along time and along bands."""
    return [Shape("time-axis", batch or 5 * 62, 801, 256),
            Shape("band-axis", batch or 5 * 801, 62, 64)]


def sweep_shapes() -> list[Shape]:
    return [Shape(f"sweep-l{l}", 1, l, 256) for l in (256, 512, 1024, 2048, 4096, 8192, 16384)]


def check_shapes() -> list[Shape]:
    return [Shape("check", 1, 2048, 256)]


def forward_flops(s: Shape) -> float:
    c = math.ceil(s.seqlen / s.chunk)
    q = min(s.chunk, s.seqlen)
    return 2.0 * s.batch * c * (s.ngroups * q * q * s.dstate + s.nheads * q * q * s.headdim
                                + 2 * s.nheads * q * s.headdim * s.dstate)


def forward_bytes(s: Shape, itemsize: int) -> float:
    b, l, h, p, g, n = s.batch, s.seqlen, s.nheads, s.headdim, s.ngroups, s.dstate
    inputs = itemsize * b * l * (h * p + 2 * g * n) + 4 * b * l * h  # x, B, C; dt float32
    return inputs + itemsize * b * l * h * p + 4 * b * h * p * n  # + y, final state


def make_inputs(s: Shape, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    k = jax.random.split(jax.random.key(seed), 5)
    b, l, h, p, g, n = s.batch, s.seqlen, s.nheads, s.headdim, s.ngroups, s.dstate
    x = jax.random.normal(k[0], (b, l, h, p), dtype)
    dt = jax.random.uniform(k[1], (b, l, h), jnp.float32, -4.0, 0.0)  # softplus -> ~[0.02, 0.7]
    A = -jax.random.uniform(k[2], (h,), jnp.float32, 1.0, 16.0)
    B = jax.random.normal(k[3], (b, l, g, n), dtype)
    C = jax.random.normal(k[4], (b, l, g, n), dtype)
    return x, dt, A, B, C


def build(impl: str, mode: str, chunk: int):
    def forward(x, dt, A, B, C):
        return mamba_chunk_scan(x, dt, A, B, C, chunk, dt_softplus=True, impl=impl)

    if mode == "fwd":
        return jax.jit(forward)

    def loss(x, dt, A, B, C):
        return jnp.sum(forward(x, dt, A, B, C).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def time_call(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def temp_mib(f, args) -> float:
    analysis = f.lower(*args).compile().memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def rel_err(y, y_ref) -> float:
    y = np.asarray(y, np.float64)
    y_ref = np.asarray(y_ref, np.float64)
    return float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))


def run(shapes: list[Shape], impls: list[str], dtypes: list[str], modes: list[str],
        repeats: int, max_scan_tokens: int) -> list[dict]:
    rows = []
    for s in shapes:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            args = make_inputs(s, dtype)
            y_ref = None
            tokens = s.batch * s.seqlen
            run_impls = [i for i in impls if i != "scan" or tokens <= max_scan_tokens]
            if "scan" in run_impls:
                y_ref = build("scan", "fwd", s.chunk)(*args)
            for mode in modes:
                for impl in run_impls:
                    f = build(impl, mode, s.chunk)
                    seconds = time_call(f, args, repeats)
                    flops = forward_flops(s) * (3 if mode == "fwdbwd" else 1)
                    nbytes = forward_bytes(s, dtype.itemsize)
                    if mode == "fwdbwd":
                        nbytes += nbytes + dtype.itemsize * tokens * s.nheads * s.headdim
                    err = None
                    if y_ref is not None and mode == "fwd":
                        err = rel_err(f(*args), y_ref)
                    rows.append(dict(
                        **asdict(s), dtype=dtype_name, mode=mode, impl=impl,
                        ms=seconds * 1e3, tokens_per_s=tokens / seconds,
                        gflops=flops / seconds / 1e9, gbps=nbytes / seconds / 1e9,
                        temp_mib=temp_mib(f, args), rel_err_vs_scan=err))
                    print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'shape':<12} {'b':>5} {'l':>6} {'Q':>4} {'dtype':<9} {'mode':<7} {'impl':<7} "
          f"{'ms':>10} {'tokens/s':>10} {'GFLOP/s':>8} {'GB/s':>7} {'temp MiB':>9} "
          f"{'err vs scan':>11}")


def format_row(r: dict) -> str:
    err = "-" if r["rel_err_vs_scan"] is None else f"{r['rel_err_vs_scan']:.1e}"
    return (f"{r['name']:<12} {r['batch']:>5} {r['seqlen']:>6} {r['chunk']:>4} {r['dtype']:<9} "
            f"{r['mode']:<7} {r['impl']:<7} {r['ms']:>10.2f} {r['tokens_per_s']:>10.3g} "
            f"{r['gflops']:>8.1f} {r['gbps']:>7.2f} {r['temp_mib']:>9.1f} {err:>11}")


def speedups(rows: list[dict]) -> list[str]:
    """'scan' time / other impl's time for each (shape, dtype, mode) where both ran."""
    lines = []
    by_key = {}
    for r in rows:
        by_key.setdefault((r["name"], r["dtype"], r["mode"]), {})[r["impl"]] = r["ms"]
    for (name, dtype, mode), times in by_key.items():
        for base in ("scan", "xla"):
            for impl, ms in times.items():
                if impl != base and base in times and not (base == "xla" and impl == "scan"):
                    lines.append(f"{name} {dtype} {mode}: {impl} is {times[base] / ms:.2f}x "
                                 f"faster than {base}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="check,sweep",
                        help="comma list of: check, bsmamba2, sweep")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences per call for the bsmamba2 shapes (default: the model's "
                             "5*62 and 5*801; use 1-4 on a CPU)")
    default_impls = "xla,pallas" if jax.default_backend() == "gpu" else "scan,xla"
    parser.add_argument("--impls", default=default_impls, help="comma list of scan, xla, pallas")
    parser.add_argument("--dtypes", default="float32", help="comma list, e.g. float32,bfloat16")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_scan_tokens", type=int, default=4096,
                        help="skip 'scan' above this many b*l tokens (its backward keeps every "
                             "state: b*l*h*p*n*4 bytes)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()

    shape_sets = {"check": check_shapes, "sweep": sweep_shapes,
                  "bsmamba2": lambda: bsmamba2_shapes(args.batch)}
    shapes = []
    for name in args.shapes.split(","):
        if name not in shape_sets:
            raise SystemExit(f"Unknown shape set {name!r}; choose from {sorted(shape_sets)}")
        shapes += shape_sets[name]()
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
          f"jax={jax.__version__}")
    print(HEADER)
    rows = run(shapes, args.impls.split(","), args.dtypes.split(","), args.modes.split(","),
               args.repeats, args.max_scan_tokens)
    print()
    for line in speedups(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                           jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
