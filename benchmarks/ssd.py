"""Times the SSD implementations over a grid of shapes and prints a table (and writes JSON).

    python benchmarks/ssd.py                                  # check shape + sweep, scan and xla
    python benchmarks/ssd.py --shapes check --impls xla,mamba2-jax   # against the peer
    python benchmarks/ssd.py --shapes bsmamba2 --batch 1 --memory_only   # the model's shapes
    python benchmarks/ssd.py --impls xla,pallas_triton,pallas_mosaic --dtypes bfloat16 --json o.json

Columns: median wall time over repeats (ms), tokens/s (b*l / time), achieved GFLOP/s and GB/s
from the counts below, compiled temporary memory (XLA memory analysis, MiB) of the timed
function, "io MiB" (inputs + outputs + chunk states in float32: the memory the SSD cannot
avoid, against which the temporaries are judged), and the relative error
max|y - y_scan| / max|y_scan| of the forward output against the "scan" reference (when scan ran).

Peer: "mamba2-jax" is the chunked SSD (`ssd_forward`) of the pure-JAX `mamba2-jax` package
(PyPI), called at the same shape and chunk with per-head B and C (it has no groups), D = 0,
dt_bias = 0 and no dt clipping. It is not a dependency: install it for measuring only with
    pip install --target .peer mamba2-jax==1.1.2 --no-deps
(.peer/ is ignored by git); the column is skipped when the package is absent.

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
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


PEER = "mamba2-jax"
PEER_DIR = Path(__file__).resolve().parent.parent / ".peer"


def load_peer():
    """mamba2-jax's `ssd_forward`, from the environment or .peer/; None when absent."""
    if PEER_DIR.is_dir() and str(PEER_DIR) not in sys.path:
        sys.path.append(str(PEER_DIR))
    try:
        from mamba2_jax import ssd_forward
    except ImportError:
        return None
    return ssd_forward


def bsmamba2_shapes(batch: int) -> list[Shape]:
    """The model's two SSD calls for `batch` examples of 8 s: along time (b = batch x 62
    bands, l = 801 frames) and along bands (b = batch x 801 frames, l = 62 bands)."""
    return [Shape("time-axis", batch * 62, 801, 256), Shape("band-axis", batch * 801, 62, 64)]


def tiny_shapes() -> list[Shape]:
    """Small shapes of both kinds, for a dry run of the command lines on a CPU."""
    return [Shape("tiny-time", 2, 130, 64, nheads=4, headdim=32, dstate=16),
            Shape("tiny-band", 3, 62, 64, nheads=4, headdim=32, dstate=16)]


def sweep_shapes() -> list[Shape]:
    return [Shape(f"sweep-l{l}", 1, l, 256) for l in (256, 512, 1024, 2048, 4096, 8192, 16384)]


def check_shapes() -> list[Shape]:
    return [Shape("check", 1, 2048, 256)]


def forward_flops(s: Shape) -> float:
    c = math.ceil(s.seqlen / s.chunk)
    q = min(s.chunk, s.seqlen)
    return 2.0 * s.batch * c * (s.ngroups * q * q * s.dstate + s.nheads * q * q * s.headdim
                                + 2 * s.nheads * q * s.headdim * s.dstate)


def io_bytes(s: Shape) -> float:
    """Float32 inputs, output and the state entering each chunk: the SSD's unavoidable memory."""
    b, l, h, p, g, n = s.batch, s.seqlen, s.nheads, s.headdim, s.ngroups, s.dstate
    return 4.0 * (b * l * (2 * h * p + h + 2 * g * n) + b * math.ceil(l / s.chunk) * h * p * n)


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
    if impl == PEER:
        peer_ssd = load_peer()

        def forward(x, dt, A, B, C):
            h, g = x.shape[2], B.shape[2]
            B, C = (jnp.repeat(t, h // g, axis=2) for t in (B, C))  # per-head B and C
            zeros = jnp.zeros((h,), jnp.float32)
            return peer_ssd(x, dt, A, B, C, chunk, zeros, zeros, 0.0, float("inf"))[0]
    else:
        def forward(x, dt, A, B, C):
            return mamba_chunk_scan(x, dt, A, B, C, chunk, dt_softplus=True, impl=impl)

    if mode == "fwd":
        return jax.jit(forward)

    def loss(x, dt, A, B, C):
        return jnp.sum(forward(x, dt, A, B, C).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def time_calls(fs: dict, args, repeats: int) -> dict:
    """Median wall seconds per call of each function, the calls interleaved round-robin so that
    a change in machine load hits every function alike. Each timed call follows an untimed call
    of the same function: right after a slow, memory-hungry neighbour (the scan reference at
    2 GB of temporaries) a fast call pays for cold caches and fresh pages (measured: the xla
    fwd+bwd at the check shape took 148 ms after the scan, 75 ms after the peer)."""
    for f in fs.values():
        jax.block_until_ready(f(*args))  # compile and warm up
    times = {name: [] for name in fs}
    for _ in range(repeats):
        for name, f in fs.items():
            jax.block_until_ready(f(*args))
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def temp_mib(f, args) -> float:
    analysis = f.lower(*args).compile().memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def rel_err(y, y_ref) -> float:
    y = np.asarray(y, np.float64)
    y_ref = np.asarray(y_ref, np.float64)
    return float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))


def run(shapes: list[Shape], impls: list[str], dtypes: list[str], modes: list[str],
        repeats: int, max_scan_tokens: int, memory_only: bool,
        max_temp_mib: float) -> list[dict]:
    """One row per (shape, dtype, mode, impl). Calls whose compiled temporaries exceed
    max_temp_mib (and all, with memory_only) are compiled for their memory but not run."""
    rows = []
    for s in shapes:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            tokens = s.batch * s.seqlen
            run_impls = [i for i in impls if i != "scan" or tokens <= max_scan_tokens]
            shapes_only = jax.eval_shape(functools.partial(make_inputs, s, dtype))
            args = shapes_only if memory_only else make_inputs(s, dtype)
            y_ref = None
            if "scan" in run_impls and not memory_only:
                y_ref = build("scan", "fwd", s.chunk)(*args)
            for mode in modes:
                fs = {impl: build(impl, mode, s.chunk) for impl in run_impls}
                temps = {impl: temp_mib(f, shapes_only) for impl, f in fs.items()}
                timed = {} if memory_only else time_calls(
                    {impl: f for impl, f in fs.items() if temps[impl] <= max_temp_mib}, args,
                    repeats)
                for impl, f in fs.items():
                    row = dict(**asdict(s), dtype=dtype_name, mode=mode, impl=impl, ms=None,
                               tokens_per_s=None, gflops=None, gbps=None,
                               temp_mib=temps[impl], io_mib=io_bytes(s) / 2**20,
                               rel_err_vs_scan=None)
                    if impl in timed:
                        seconds = timed[impl]
                        flops = forward_flops(s) * (3 if mode == "fwdbwd" else 1)
                        nbytes = forward_bytes(s, dtype.itemsize)
                        if mode == "fwdbwd":
                            nbytes += nbytes + dtype.itemsize * tokens * s.nheads * s.headdim
                        if y_ref is not None and mode == "fwd":
                            row["rel_err_vs_scan"] = rel_err(f(*args), y_ref)
                        row.update(ms=seconds * 1e3, tokens_per_s=tokens / seconds,
                                   gflops=flops / seconds / 1e9, gbps=nbytes / seconds / 1e9)
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


HEADER = (f"{'shape':<12} {'b':>6} {'l':>6} {'Q':>4} {'dtype':<9} {'mode':<7} {'impl':<10} "
          f"{'ms':>10} {'tokens/s':>10} {'GFLOP/s':>8} {'GB/s':>7} {'temp MiB':>9} "
          f"{'io MiB':>8} {'temp/io':>7} {'err vs scan':>11}")


def format_row(r: dict) -> str:
    err = "-" if r["rel_err_vs_scan"] is None else f"{r['rel_err_vs_scan']:.1e}"
    cell = lambda key, fmt: "-" if r["ms"] is None else format(r[key], fmt)
    return (f"{r['name']:<12} {r['batch']:>6} {r['seqlen']:>6} {r['chunk']:>4} "
            f"{r['dtype']:<9} {r['mode']:<7} {r['impl']:<10} {cell('ms', '.2f'):>10} "
            f"{cell('tokens_per_s', '.3g'):>10} {cell('gflops', '.1f'):>8} "
            f"{cell('gbps', '.2f'):>7} {r['temp_mib']:>9.1f} {r['io_mib']:>8.1f} "
            f"{r['temp_mib'] / r['io_mib']:>7.2f} {err:>11}")


def speedups(rows: list[dict]) -> list[str]:
    """Time of a baseline (scan, the peer) / time of each other impl, where both ran."""
    lines = []
    by_key = {}
    for r in rows:
        if r["ms"] is not None:
            by_key.setdefault((r["name"], r["dtype"], r["mode"]), {})[r["impl"]] = r["ms"]
    for (name, dtype, mode), times in by_key.items():
        for base in ("scan", PEER, "xla"):
            for impl, ms in times.items():
                if impl in (base, "scan") or base not in times or (base, impl) == ("xla", PEER):
                    continue
                ratio = times[base] / ms
                how = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
                lines.append(f"{name} {dtype} {mode}: {impl} is {how} than {base} "
                             f"({ms:.1f} vs {times[base]:.1f} ms)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="check,sweep",
                        help="comma list of: check, bsmamba2, sweep, tiny")
    parser.add_argument("--batch", type=int, default=1,
                        help="examples of 8 s for the bsmamba2 shapes (the authors train 5 per "
                             "device; b = batch x 62 sequences along time, x 801 along bands)")
    default_impls = ("xla,pallas_triton,pallas_mosaic" if jax.default_backend() == "gpu"
                     else "scan,xla")
    if load_peer() is not None:
        default_impls += f",{PEER}"
    parser.add_argument("--impls", default=default_impls,
                        help=f"comma list of scan, xla, pallas_triton, pallas_mosaic, pallas (the "
                             f"default Pallas backend), {PEER} (the peer, when "
                             "installed; default: with it when it is)")
    parser.add_argument("--dtypes", default="float32", help="comma list, e.g. float32,bfloat16")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_scan_tokens", type=int, default=4096,
                        help="skip 'scan' above this many b*l tokens (its backward keeps every "
                             "state: b*l*h*p*n*4 bytes)")
    parser.add_argument("--memory_only", action="store_true",
                        help="compile for the memory analysis only; run nothing")
    parser.add_argument("--max_temp_mib", type=float, default=4096,
                        help="do not run calls whose compiled temporaries exceed this (MiB); "
                             "their memory is still reported")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    impls = args.impls.split(",")
    if PEER in impls and load_peer() is None:
        print(f"{PEER} is not installed, its column is skipped (to measure against it: "
              "pip install --target .peer mamba2-jax==1.1.2 --no-deps)")
        impls.remove(PEER)

    shape_sets = {"check": check_shapes, "sweep": sweep_shapes, "tiny": tiny_shapes,
                  "bsmamba2": lambda: bsmamba2_shapes(args.batch)}
    shapes = []
    for name in args.shapes.split(","):
        if name not in shape_sets:
            raise SystemExit(f"Unknown shape set {name!r}; choose from {sorted(shape_sets)}")
        shapes += shape_sets[name]()
    load = os.getloadavg()
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
          f"jax={jax.__version__} cpus={os.cpu_count()} "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(HEADER)
    rows = run(shapes, impls, args.dtypes.split(","), args.modes.split(","), args.repeats,
               args.max_scan_tokens, args.memory_only, args.max_temp_mib)
    print()
    for line in speedups(rows):
        print(line)
    load_end = os.getloadavg()
    print(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                           jax=jax.__version__, load_start=load, load_end=load_end,
                           argv=sys.argv[1:], rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
