"""cSDR + uSDR of one stereo track: this project's metrics against museval and a plain NumPy pass.

    python benchmarks/metrics.py [--seconds 60] [--repeats 7] [--json OUT.json]

Two workloads, each timed three ways:
  vocals         the paper's scores: `metrics.sdr_scores(vocals, estimate)` (cSDR frames of the
                 vocals alone, uSDR); museval: `museval.metrics.bss_eval` on the vocals alone.
  vocals + acc.  what evaluate.py scores per track: the vocals as above and the accompaniment
                 (mixture - estimate) alone; museval: bss_eval on each alone.
The plain pass is `x.sum()` over every input array of the workload, once each: the time a
memory-bound pass needs, so `ours / plain` says how far from that floor the metrics are.

Ours and the plain pass: best of --repeats; museval once (seconds per source-minute). CPU time
(process time) is the fairer number on a shared machine; wall time is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bsmamba2_jax import metrics
from bsmamba2_jax.data.musdb import SAMPLE_RATE as RATE


def make_track(seconds: float, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 (2, n) vocals with silent stretches, accompaniment, mixture and a leaky estimate."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    vocals = 0.2 * rng.standard_normal((2, n)).astype(np.float32)
    for start in range(0, int(seconds), 20):  # 5 s of silence every 20 s
        vocals[:, start * RATE:(start + 5) * RATE] = 0.0
    accompaniment = 0.3 * rng.standard_normal((2, n)).astype(np.float32)
    estimate = vocals + 0.1 * accompaniment + 0.05 * rng.standard_normal((2, n)).astype(np.float32)
    return {"vocals": vocals, "accompaniment": accompaniment, "mixture": vocals + accompaniment,
            "estimate": estimate}


def ours_vocals(t: dict) -> list[tuple[float, np.ndarray]]:
    return [metrics.sdr_scores(t["vocals"], t["estimate"])]


def ours_both(t: dict) -> list[tuple[float, np.ndarray]]:
    return [metrics.sdr_scores(t["vocals"], t["estimate"]),
            metrics.sdr_scores(t["accompaniment"], t["mixture"] - t["estimate"])]


def museval_one(reference: np.ndarray, estimate: np.ndarray) -> tuple[float, np.ndarray]:
    from museval.metrics import bss_eval

    frames = bss_eval(reference.T[None], estimate.T[None], window=RATE, hop=RATE)[0][0]
    r, e = reference.astype(np.float64), estimate.astype(np.float64)
    usdr = 10 * np.log10((np.sum(r**2) + 1e-7) / (np.sum((e - r) ** 2) + 1e-7))
    return float(usdr), frames


def plain(arrays: list[np.ndarray]) -> float:
    return float(sum(float(x.sum()) for x in arrays))


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall s, best CPU s, last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="track length")
    parser.add_argument("--repeats", type=int, default=7, help="runs of ours and the plain pass")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    t = make_track(args.seconds)
    sources = {"vocals": ["vocals"], "vocals + acc.": ["vocals", "accompaniment"]}
    inputs = {"vocals": [t["vocals"], t["estimate"]],
              "vocals + acc.": [t["vocals"], t["estimate"], t["accompaniment"], t["mixture"]]}
    fns = {"vocals": ours_vocals, "vocals + acc.": ours_both}

    museval_runs = {}  # one museval call per source, shared by the two workloads
    for name, ref, est in (("vocals", t["vocals"], t["estimate"]),
                           ("accompaniment", t["accompaniment"], t["mixture"] - t["estimate"])):
        wall, cpu, out = timed(lambda r=ref, e=est: museval_one(r, e), 1)
        museval_runs[name] = (wall, cpu, out)

    rows = []
    for work in ("vocals", "vocals + acc."):
        wall, cpu, got = timed(lambda w=work: fns[w](t), args.repeats)
        p_wall, p_cpu, _ = timed(lambda w=work: plain(inputs[w]), args.repeats)
        m_wall = sum(museval_runs[s][0] for s in sources[work])
        m_cpu = sum(museval_runs[s][1] for s in sources[work])
        frame_diff, usdr_diff, same_nan = 0.0, 0.0, True
        for (u, frames), s in zip(got, sources[work], strict=True):
            ref_u, ref_frames = museval_runs[s][2]
            same_nan &= bool(np.array_equal(np.isnan(frames), np.isnan(ref_frames)))
            frame_diff = max(frame_diff, float(np.nanmax(np.abs(frames - ref_frames))))
            usdr_diff = max(usdr_diff, abs(u - ref_u))
        rows.append({"workload": work, "ours_wall_s": wall, "ours_cpu_s": cpu,
                     "plain_wall_s": p_wall, "plain_cpu_s": p_cpu, "museval_wall_s": m_wall,
                     "museval_cpu_s": m_cpu, "speedup_cpu": m_cpu / cpu,
                     "speedup_wall": m_wall / wall, "over_plain_cpu": cpu / p_cpu,
                     "max_frame_diff_db": frame_diff, "usdr_diff_db": usdr_diff,
                     "same_nan": same_nan})

    mb = sum(x.nbytes for x in inputs["vocals + acc."]) / 1e6
    print(f"track: {args.seconds:g} s stereo float32 at {RATE} Hz ({mb:.0f} MB of inputs for "
          f"vocals + acc.); load average {os.getloadavg()[0]:.2f}")
    print("| workload | ours CPU (ms) | ours wall (ms) | plain pass CPU (ms) | ours / plain | "
          "museval CPU (s) | speed-up vs museval (CPU / wall) | max frame diff (dB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {1e3 * r['ours_cpu_s']:.1f} | {1e3 * r['ours_wall_s']:.1f} | "
              f"{1e3 * r['plain_cpu_s']:.1f} | {r['over_plain_cpu']:.1f}x | "
              f"{r['museval_cpu_s']:.2f} | {r['speedup_cpu']:.0f}x / {r['speedup_wall']:.0f}x | "
              f"{r['max_frame_diff_db']:.1e} |")
    same = all(r["same_nan"] for r in rows)
    print(f"same NaN frames as museval: {same}; max uSDR diff "
          f"{max(r['usdr_diff_db'] for r in rows):.1e} dB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": args.seconds, "load_average": os.getloadavg()[0],
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
