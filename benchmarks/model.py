"""Forward speed and memory of the paper BSMamba2, against the machine's matmul rate.

    python benchmarks/model.py [speed] [--seconds 8] [--repeats 2] [--dtype float32] [--breakdown]
    python benchmarks/model.py memory [--seconds 1,2,4,8] [--dtype bfloat16] [--json out.json]
    python benchmarks/model.py compare [--configs configs/bsmamba2.py,configs/bsroformer.py]
        [--seconds 1,8,16] [--dtype float32] [--memory-only] [--json out.json]

Prints a table: compile time, forward time, real-time factor (seconds of compute per second of
audio), forward FLOPs (XLA's cost analysis of the compiled forward, and counted from the model's
matmuls), achieved GFLOP/s and the float32 matmul rate measured in the same run. On a CPU the
forward runs with float32 compute (`--dtype float32`): bf16 matmuls are emulated on most CPUs and
would measure the emulation, not the model. `--breakdown` also times the parts of one dual-path
layer (time-pass block, its SSD, band-pass block) to show where the time goes.

"busy cores" is CPU time / wall time. On the 2-core machine this was written on, XLA:CPU runs a
single matmul on one thread (so does NumPy's BLAS) while the forward keeps ~1.7 cores busy
(parallel elementwise fusions), so the wall ratio compares two cores against one; the per-CPU-second
ratio is the per-core efficiency.

memory: XLA's compiled memory analysis of the forward (nothing runs) at each segment length, batch
1, with the config's dtype (bf16) and `group_tokens`: temporaries of the model, of the model
with the SSD replaced by an elementwise stand-in (so "SSD share" = the difference), and of one
SSD call alone at the shapes of one group of the time pass and of the band pass.

compare: BSMamba2 against BS-RoFormer (or any configs), measured the same way: batch 1, each
segment length compiled on its own, the compiled temporaries (XLA's memory analysis) and the best
forward time, then where the two curves cross. The time pass of BS-RoFormer is attention over all
frames (quadratic in the segment length), BSMamba2's an SSD scan (linear), so the ratio of the two
grows with the length. Default dtype: float32 on a CPU (bf16 matmuls are emulated there), the
config's on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bsmamba2_jax.mamba2
from bsmamba2_jax.audio import num_frames
from bsmamba2_jax.mamba2 import BiMamba2Block, Mamba2Config
from bsmamba2_jax.model import BSMamba2, resolve_dtype, sequence_groups
from configs import load_config
from configs.bsmamba2 import get_config
from kernels.ssd import mamba_chunk_scan

SR = 44100


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(best wall time, CPU time of that same call) over `repeats` calls of fn(*args), seconds.

    The CPU time (all threads of this process) is the steadier number when other jobs share the
    cores: it does not count the time our threads wait for a core.
    """
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best


def best_time(fn, *args, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn(*args) (already compiled), in seconds."""
    return timed(fn, *args, repeats=repeats)[0]


def matmul_rate(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Measured float32 (n, n) @ (n, n) rate: (GFLOP per wall second, per CPU second)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    wall, cpu = timed(f, a, b, repeats=repeats)
    return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


def xla_flops(compiled) -> float:
    """FLOPs reported by XLA's cost analysis of a compiled computation (nan if unavailable)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def ssd_flops(seqs: int, length: int, chunk: int, h: int, p: int, g: int, n: int) -> float:
    """Matmul FLOPs of the chunked SSD (kernels/ssd/xla.py), padding included."""
    q = min(chunk, length)
    lp = seqs * -(-length // q) * q  # padded tokens
    return 2.0 * lp * q * (g * n + h * p) + 4.0 * lp * h * p * n


def counted_flops(m, samples: int, batch: int = 1) -> dict[str, float]:
    """Matmul/conv FLOPs (multiply-add = 2) of one forward, by part; elementwise ops left out."""
    t = num_frames(samples, m.hop_length)
    k, d = len(m.band_widths), m.dim
    f4 = 4 * sum(m.band_widths)
    e = m.expand * d
    h = e // m.headdim
    gn = m.ngroups * m.d_state

    def mixer(tokens: int, seqs: int, length: int, chunk: int) -> tuple[float, float]:
        proj = 2.0 * tokens * d * (2 * e + 2 * gn + h) + 2.0 * tokens * e * d
        proj += 2.0 * tokens * m.d_conv * (e + 2 * gn)
        return proj, ssd_flops(seqs, length, chunk, h, m.headdim, m.ngroups, m.d_state)

    tokens = batch * t * k
    tp, ts = mixer(tokens, batch * k, t, m.chunk_size)
    bp, bs = mixer(tokens, batch * t, k, m.band_chunk_size)
    merge = 2.0 * tokens * 2 * d * d
    fft = 2 * batch * 2 * t * 2.5 * m.n_fft * np.log2(m.n_fft)  # rfft + irfft, ~2.5 N log N
    return {
        "stft+istft": fft,
        "band split": 2.0 * batch * t * f4 * d,
        "mixer projections+conv": m.depth * 2 * (tp + bp),
        "SSD (time pass)": m.depth * 2 * ts,
        "SSD (band pass)": m.depth * 2 * bs,
        "block merge": m.depth * 2 * merge,
        "mask estimator": 2.0 * tokens * d * m.mask_hidden_mult * d
        + 2.0 * batch * t * m.mask_hidden_mult * d * 2 * f4,
    }


def breakdown(m: BSMamba2, samples: int, repeats: int) -> list[tuple[str, float]]:
    """Times the parts of one dual-path layer on the shapes of the full forward."""
    dtype = resolve_dtype(m.dtype)
    t, k, d = num_frames(samples, m.hop_length), len(m.band_widths), m.dim
    rng = np.random.default_rng(1)
    rows = []
    for name, seqs, length, chunk in [("time-pass block", k, t, m.chunk_size),
                                      ("band-pass block", t, k, m.band_chunk_size)]:
        cfg = Mamba2Config(d_model=d, expand=m.expand, d_state=m.d_state, headdim=m.headdim,
                           ngroups=m.ngroups, d_conv=m.d_conv, chunk_size=chunk,
                           ssd_impl=m.ssd_impl, dtype=dtype)
        block = BiMamba2Block(cfg)
        u = jnp.asarray(rng.standard_normal((seqs, length, d), np.float32))
        params = jax.jit(block.init)(jax.random.key(0), u)
        f = jax.jit(block.apply)
        jax.block_until_ready(f(params, u))
        rows.append((f"{name} ({m.depth} per forward)", best_time(f, params, u,
                                                                   repeats=repeats)))
        e = m.expand * d
        h = e // m.headdim
        x = jnp.asarray(rng.standard_normal((seqs, length, h, m.headdim), np.float32), dtype)
        dt = jnp.asarray(rng.uniform(-4, 0, (seqs, length, h)), jnp.float32)
        A = -jnp.asarray(rng.uniform(1, 16, (h,)), jnp.float32)
        B = jnp.asarray(rng.standard_normal((seqs, length, m.ngroups, m.d_state)), dtype)
        ssd = jax.jit(lambda x, dt, A, B, C, q=chunk: mamba_chunk_scan(
            x, dt, A, B, C, q, dt_softplus=True, impl=m.ssd_impl))
        jax.block_until_ready(ssd(x, dt, A, B, B))
        rows.append(("  its SSD, one direction (2 per block)",
                     best_time(ssd, x, dt, A, B, B, repeats=repeats)))
    return rows


@contextlib.contextmanager
def ssd_stand_in():
    """Replaces the mixers' SSD call by an elementwise function of the same inputs and shape."""
    def stand_in(x, dt, A, B, C, chunk_size, **kwargs):
        del A, chunk_size, kwargs
        j = x.shape[2] // B.shape[2]
        bc = jnp.repeat(jnp.sum(B.astype(jnp.float32) * C.astype(jnp.float32), -1), j, axis=2)
        return (x.astype(jnp.float32) * (dt + bc)[..., None]).astype(x.dtype)

    original = bsmamba2_jax.mamba2.mamba_chunk_scan
    bsmamba2_jax.mamba2.mamba_chunk_scan = stand_in
    try:
        yield
    finally:
        bsmamba2_jax.mamba2.mamba_chunk_scan = original


def temp_bytes(fn, *args) -> float:
    """Temporary bytes of XLA's compiled memory analysis of jit(fn)(*args)."""
    return float(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def ssd_alone_bytes(m: BSMamba2, seqs: int, length: int, chunk: int) -> float:
    """Temporaries of one forward SSD call (one direction) on `seqs` sequences of `length`."""
    dtype = resolve_dtype(m.dtype)
    h = m.expand * m.dim // m.headdim
    x = jax.ShapeDtypeStruct((seqs, length, h, m.headdim), dtype)
    dt = jax.ShapeDtypeStruct((seqs, length, h), jnp.float32)
    a = jax.ShapeDtypeStruct((h,), jnp.float32)
    bc = jax.ShapeDtypeStruct((seqs, length, m.ngroups, m.d_state), dtype)
    return temp_bytes(lambda x, dt, a, b, c: mamba_chunk_scan(
        x, dt, a, b, c, chunk, D=jnp.ones_like(a), dt_bias=a, dt_softplus=True,
        impl=m.ssd_impl), x, dt, a, bc, bc)


def memory(args: argparse.Namespace) -> list[dict]:
    cfg = get_config().model
    cfg.dtype = args.dtype or cfg.dtype
    cfg.ssd_impl = args.ssd_impl
    if args.group_tokens is not None:
        cfg.group_tokens = args.group_tokens
    model = BSMamba2(**cfg)
    gib = 2.0**30
    print(f"# BSMamba2 paper config forward memory (compiled, not run), batch 1, "
          f"dtype={model.dtype}, ssd_impl={model.ssd_impl}, group_tokens={model.group_tokens}, "
          f"backend {jax.default_backend()}, jax {jax.__version__}, GiB")
    print("| segment s | temporaries | without SSD | SSD share | SSD alone: time pass group "
          "| SSD alone: band pass group |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for seconds in [float(x) for x in args.seconds.split(",")]:
        samples = int(round(seconds * SR))
        audio = jax.ShapeDtypeStruct((1, 2, samples), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), audio)
        full = temp_bytes(model.apply, params, audio)
        with ssd_stand_in():
            no_ssd = temp_bytes(lambda p, a: model.apply(p, a), params, audio)
        t, k = num_frames(samples, model.hop_length), len(model.band_widths)
        time_seqs = sequence_groups(k, t, model.group_tokens)[1]
        band_seqs = sequence_groups(t, k, model.group_tokens)[1]
        row = {"seconds": seconds, "temp_gib": full / gib, "without_ssd_gib": no_ssd / gib,
               "ssd_time_group_gib": ssd_alone_bytes(model, time_seqs, t, model.chunk_size) / gib,
               "ssd_band_group_gib": ssd_alone_bytes(model, band_seqs, k,
                                                     model.band_chunk_size) / gib,
               "time_group": [time_seqs, t], "band_group": [band_seqs, k]}
        rows.append(row)
        print(f"| {seconds:g} | {row['temp_gib']:.2f} | {row['without_ssd_gib']:.2f} | "
              f"{row['temp_gib'] - row['without_ssd_gib']:.2f} | "
              f"{row['ssd_time_group_gib']:.2f} ({time_seqs} x {t}) | "
              f"{row['ssd_band_group_gib']:.2f} ({band_seqs} x {k}) |", flush=True)
    return rows


def compare(args: argparse.Namespace) -> list[dict]:
    """Compile time, compiled temporaries and forward time of each config at each length."""
    gib = 2.0**30
    on_cpu = jax.default_backend() == "cpu"
    print(f"# forward, batch 1, stereo, {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print("| config | mixer | params | segment s | compile s | forward s | s per s of audio "
          "| temporaries GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for spec in args.configs.split(","):
        cfg = load_config(spec).model
        cfg.dtype = args.dtype or ("float32" if on_cpu else cfg.dtype)
        if args.ssd_impl:
            cfg.ssd_impl = args.ssd_impl
        if args.attn_impl:
            cfg.attn_impl = args.attn_impl
        model = BSMamba2(**cfg)
        rng = np.random.default_rng(0)
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2, SR), jnp.float32))
        n_params = sum(int(x.size) for x in jax.tree.leaves(params))
        for seconds in [float(x) for x in args.seconds.split(",")]:
            samples = int(round(seconds * SR))
            audio = jnp.asarray(0.1 * rng.standard_normal((1, 2, samples)).astype(np.float32))
            t0 = time.perf_counter()
            compiled = jax.jit(model.apply).lower(params, audio).compile()
            row = {"config": spec, "mixer": model.mixer, "params": n_params, "seconds": seconds,
                   "dtype": str(cfg.dtype), "compile_s": time.perf_counter() - t0,
                   "temp_gib": compiled.memory_analysis().temp_size_in_bytes / gib,
                   "forward_s": float("nan"), "forward_cpu_s": float("nan")}
            if not args.memory_only:
                jax.block_until_ready(compiled(params, audio))  # allocations, page faults
                row["forward_s"], row["forward_cpu_s"] = timed(compiled, params, audio,
                                                               repeats=args.repeats)
            del compiled
            rows.append(row)
            print(f"| {spec} | {row['mixer']} | {n_params:,} | {seconds:g} | "
                  f"{row['compile_s']:.1f} | {row['forward_s']:.2f} | "
                  f"{row['forward_s'] / seconds:.3f} | {row['temp_gib']:.2f} |", flush=True)
    for line in crossings(rows):
        print(line)
    return rows


def crossings(rows: list[dict]) -> list[str]:
    """Where the second config's forward time and temporaries overtake the first's: the
    ratio second / first at each length and the length where it passes 1 (linear between the
    measured lengths), for exactly two configs measured at the same lengths."""
    specs = list(dict.fromkeys(r["config"] for r in rows))
    if len(specs) != 2:
        return []
    first = {r["seconds"]: r for r in rows if r["config"] == specs[0]}
    second = {r["seconds"]: r for r in rows if r["config"] == specs[1]}
    lengths = sorted(set(first) & set(second))
    out = [f"\n# {specs[1]} / {specs[0]} at each length"]
    for key, name in (("forward_s", "forward time"), ("temp_gib", "temporaries")):
        ratios = [second[s][key] / first[s][key] for s in lengths]
        if not all(np.isfinite(ratios)):
            continue
        out.append(f"{name}: " + ", ".join(f"{s:g} s {r:.2f}x" for s, r in
                                            zip(lengths, ratios, strict=True)))
        cross = [s0 + (1 - r0) / (r1 - r0) * (s1 - s0) for s0, s1, r0, r1 in
                 zip(lengths, lengths[1:], ratios, ratios[1:], strict=False)
                 if (r0 - 1) * (r1 - 1) < 0]
        if cross:
            out.append(f"  {name} curves cross at ~{', '.join(f'{c:.1f}' for c in cross)} s")
        else:
            lower = specs[1] if ratios[0] < 1 else specs[0]
            out.append(f"  no crossing between {lengths[0]:g} and {lengths[-1]:g} s: {lower} "
                       "is lower at every measured length")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        ap = argparse.ArgumentParser(description="BSMamba2 against BS-RoFormer, same measure")
        ap.add_argument("mode")
        ap.add_argument("--configs", default="configs/bsmamba2.py,configs/bsroformer.py",
                        help="comma list of config files (with an optional :variant)")
        ap.add_argument("--seconds", default="1,8,16", help="comma list of segment lengths")
        ap.add_argument("--dtype", default="", help="compute dtype (default: float32 on a "
                        "CPU, the config's elsewhere)")
        ap.add_argument("--ssd-impl", default="", help="SSD implementation (default: config's)")
        ap.add_argument("--attn-impl", default="", help="attention (default: config's)")
        ap.add_argument("--repeats", type=int, default=2, help="timed forward runs (best kept)")
        ap.add_argument("--memory-only", action="store_true", help="compile only, no timing")
        ap.add_argument("--json", default="", help="also write the rows to this JSON file")
        args = ap.parse_args()
        rows = compare(args)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__,
                 "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
                 "rows": rows}, indent=1))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "memory":
        ap = argparse.ArgumentParser(description="Compiled forward memory of the paper config")
        ap.add_argument("mode")
        ap.add_argument("--seconds", default="1,2,4,8", help="comma list of segment lengths")
        ap.add_argument("--dtype", default="", help="compute dtype (default: config's)")
        ap.add_argument("--ssd-impl", default="xla", help="SSD implementation")
        ap.add_argument("--group-tokens", type=int, default=None,
                        help="model.group_tokens (default: config's)")
        ap.add_argument("--json", default="", help="also write the rows to this JSON file")
        args = ap.parse_args()
        rows = memory(args)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"backend": jax.default_backend(), "jax": jax.__version__,
                 "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
                 "rows": rows}, indent=1))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "speed":
        sys.argv.pop(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="segment length")
    ap.add_argument("--repeats", type=int, default=2, help="timed forward runs (best is kept)")
    ap.add_argument("--dtype", default="float32", help="compute dtype of matmuls/convs")
    ap.add_argument("--ssd-impl", default="xla", help="SSD implementation")
    ap.add_argument("--chunk-size", type=int, default=0,
                    help="SSD chunk along time (0: the config's 256); the output does not depend "
                    "on it, only the cost")
    ap.add_argument("--breakdown", action="store_true", help="also time one layer's parts")
    args = ap.parse_args()

    cfg = get_config().model
    cfg.dtype = args.dtype
    cfg.ssd_impl = args.ssd_impl
    cfg.chunk_size = args.chunk_size or cfg.chunk_size
    model = BSMamba2(**cfg)
    samples = int(round(args.seconds * SR))
    rng = np.random.default_rng(0)
    audio = jnp.asarray(0.1 * rng.standard_normal((1, 2, samples)).astype(np.float32))

    mm_before, mm_cpu_before = matmul_rate()
    params = jax.jit(model.init)(jax.random.key(0), audio[..., :SR])  # params: length-free
    t0 = time.perf_counter()
    compiled = jax.jit(model.apply).lower(params, audio).compile()
    compile_s = time.perf_counter() - t0
    flops_xla = xla_flops(compiled)
    jax.block_until_ready(compiled(params, audio))  # first run: allocations, page faults
    fwd_s, fwd_cpu = timed(compiled, params, audio, repeats=args.repeats)
    mm_after, mm_cpu_after = matmul_rate()
    mm, mm_cpu = max(mm_before, mm_after), max(mm_cpu_before, mm_cpu_after)
    parts = counted_flops(model, samples)
    flops_counted = sum(parts.values())

    print(f"# BSMamba2 paper config forward, {args.seconds:g} s stereo, batch 1, "
          f"dtype={args.dtype}, ssd_impl={args.ssd_impl}, chunk_size={model.chunk_size}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    rows = [
        ("compile time", f"{compile_s:.1f} s"),
        ("forward time (best)", f"{fwd_s:.2f} s wall, {fwd_cpu:.2f} s CPU "
                                f"(busy cores ~{fwd_cpu / fwd_s:.1f})"),
        ("real-time factor", f"{fwd_s / args.seconds:.3f} s per s of audio"),
        ("FLOPs, XLA cost analysis", f"{flops_xla / 1e9:.0f} GFLOP"),
        ("FLOPs, counted (matmuls)", f"{flops_counted / 1e9:.0f} GFLOP"),
        ("achieved (XLA FLOPs)", f"{flops_xla / fwd_s / 1e9:.1f} GFLOP/s"),
        ("achieved (counted FLOPs)", f"{flops_counted / fwd_s / 1e9:.1f} GFLOP/s"),
        ("f32 matmul 2048^3 before/after", f"{mm_before:.1f} / {mm_after:.1f} GFLOP/s "
                                           f"(busy cores ~{mm / mm_cpu:.1f})"),
        ("achieved / matmul rate (wall)", f"{flops_counted / fwd_s / 1e9 / mm:.0%} (counted), "
                                          f"{flops_xla / fwd_s / 1e9 / mm:.0%} (XLA)"),
        ("per CPU s: forward / matmul", f"{flops_xla / fwd_cpu / 1e9:.1f} / {mm_cpu:.1f} "
                                        f"GFLOP per CPU s = "
                                        f"{flops_xla / fwd_cpu / 1e9 / mm_cpu:.0%} (XLA FLOPs)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"| {name:<{width}} | {value}")
    print("\n| part | GFLOP | share")
    for name, f in parts.items():
        print(f"| {name:<{width}} | {f / 1e9:8.1f} | {f / flops_counted:.0%}")
    if args.breakdown:
        print("\n| one layer's part (same shapes) | best time")
        for name, s in breakdown(model, samples, args.repeats):
            print(f"| {name:<38} | {s:.2f} s")


if __name__ == "__main__":
    main()
