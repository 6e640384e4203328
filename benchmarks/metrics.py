"""cSDR + uSDR of one 4-minute stereo track: this project's metrics vs museval.

    python benchmarks/metrics.py [--seconds 240] [--repeats 5]

Prints wall and CPU times (ours: best of --repeats; museval once, it takes about a minute) and the
largest difference between the two framewise SDRs. CPU time is the fairer number on a shared
machine; museval's numpy may use several threads, so its CPU time can exceed its wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bsmamba2_jax import metrics

RATE = 44100


def _track(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random vocals (with silent stretches), accompaniment and a leaky, noisy vocal estimate."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    vocals = 0.2 * rng.standard_normal((2, n)).astype(np.float32)
    for start in range(0, int(seconds), 20):  # 5 s of silence every 20 s
        vocals[:, start * RATE:(start + 5) * RATE] = 0.0
    accompaniment = 0.3 * rng.standard_normal((2, n)).astype(np.float32)
    estimate = vocals + 0.1 * accompaniment + 0.05 * rng.standard_normal((2, n)).astype(np.float32)
    return vocals, accompaniment, estimate


def ours(vocals, accompaniment, estimate) -> tuple[np.ndarray, float]:
    # Sources as lists: csdr_frames reads them in place, no stacked copy.
    accompaniment_estimate = (vocals + accompaniment) - estimate
    frames = metrics.csdr_frames([vocals, accompaniment], [estimate, accompaniment_estimate])
    return frames, metrics.usdr(vocals, estimate)


def reference(vocals, accompaniment, estimate) -> tuple[np.ndarray, float]:
    import museval

    mixture = vocals + accompaniment
    refs = np.stack([vocals, accompaniment]).transpose(0, 2, 1)
    ests = np.stack([estimate, mixture - estimate]).transpose(0, 2, 1)
    sdr, _, _, _ = museval.evaluate(refs, ests, win=RATE, hop=RATE)
    v, e = vocals.astype(np.float64), estimate.astype(np.float64)
    return sdr, 10 * np.log10((np.sum(v**2) + 1e-7) / (np.sum((v - e) ** 2) + 1e-7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    track = _track(args.seconds)

    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        frames, u = ours(*track)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t_ours, c_ours = min(wall), min(cpu)
    t0, c0 = time.perf_counter(), time.process_time()
    ref_frames, ref_u = reference(*track)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0

    same_nan = bool(np.array_equal(np.isnan(frames), np.isnan(ref_frames)))
    diff = float(np.nanmax(np.abs(frames - ref_frames)))
    print(f"track: {args.seconds:.0f} s stereo at {RATE} Hz, sources vocals + accompaniment")
    print("| implementation        | wall (s) | CPU (s) | speed-up wall | speed-up CPU |")
    print("|-----------------------|---------:|--------:|--------------:|-------------:|")
    print(f"| museval.evaluate (v4) | {t_ref:8.2f} | {c_ref:7.2f} |          1.0x |         1.0x |")
    print(f"| bsmamba2_jax.metrics  | {t_ours:8.3f} | {c_ours:7.3f} | "
          f"{t_ref / t_ours:12.0f}x | {c_ref / c_ours:11.0f}x |")
    print(f"max |cSDR frame diff| = {diff:.2e} dB, same NaN pattern: {same_nan}, "
          f"uSDR diff = {abs(u - ref_u):.2e} dB")


if __name__ == "__main__":
    main()
