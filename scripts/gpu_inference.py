"""Wall time of `bsmamba2-separate` on one synthetic track, per compute dtype.

    python scripts/gpu_inference.py WORKDIR [--variant ""] [--seconds 240] \
        [--dtypes float32,bfloat16] [--impl pallas] [--json out.json]

Writes WORKDIR/track/mixture.wav (the synthetic generator's first test track: vocal phrases,
drums, bass and pads, stereo, 44.1 kHz) and, per dtype, a model file with random weights of the
config `configs/bsmamba2.py:VARIANT` ("" = the paper model) through `bsmamba2_jax.export`; then
runs the command line `python -m bsmamba2_jax.separate_cli` (what `bsmamba2-separate` runs) on the
track in a fresh process and times it end to end: start-up, compilation, reading, separating,
writing. Real-time factor = track seconds / wall seconds (> 1: faster than real time). The
separated audio of a random model means nothing; only the time is measured. WORKDIR must be new
or empty, or one this script made (it is then emptied first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_track(folder: Path, seconds: float) -> Path:
    import soundfile as sf

    from bsmamba2_jax.data import synthetic

    # The mixture only (the stems are not needed): a fifth of the generator's disk writes.
    track = synthetic.synthesize_track(0, "test", 0, seconds)
    mixture = np.zeros_like(track.stems["vocals"])
    for name in synthetic.STEMS:  # the generator's summation order
        mixture = mixture + track.stems[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mixture.wav"
    sf.write(path, mixture.T, synthetic.SAMPLE_RATE, subtype="FLOAT")
    return path


def random_params(model, seed: int = 0):
    """Random weights in the shapes of `model.init` without compiling it: unit-variance inputs
    stay near unit variance (fan-in scaling), norm scales 1, biases 0."""
    import jax

    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 2, 4410), np.float32))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "bias" in name:
            return np.zeros(s.shape, np.float32)
        if s.ndim == 1 or "norm" in name or "gamma" in name:
            return np.ones(s.shape, np.float32)
        fan_in = math.prod(s.shape[:-1])
        return (rng.standard_normal(s.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def write_model(path: Path, variant: str, dtype: str, impl: str) -> None:
    from bsmamba2_jax import export
    from bsmamba2_jax.model import BSMamba2
    from configs.bsmamba2 import get_config

    config = get_config(variant)
    config.model.dtype = dtype
    config.model.ssd_impl = impl
    model = BSMamba2(**config.model)
    export.save_model(path, random_params(model), config)


def separate(track: Path, model_file: Path, out: Path, log: Path) -> float:
    """Wall seconds of the separation command line (a fresh process)."""
    cmd = [sys.executable, "-m", "bsmamba2_jax.separate_cli", str(track), "-o", str(out),
           "--checkpoint", str(model_file), "--no-progress"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--variant", default="", help='config variant ("" = the paper model)')
    parser.add_argument("--seconds", type=float, default=240.0, help="track length")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--impl", default="pallas", help="the model's ssd_impl")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.workdir).resolve()  # the separation runs in the repository root
    marker = work / ".gpu_inference"
    if work.exists() and any(work.iterdir()):
        if not marker.exists():
            raise SystemExit(f"{work} is not empty and was not made by this script; choose a "
                             "new WORKDIR")
        shutil.rmtree(work)  # this script's own earlier outputs
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    track = write_track(work / "track", args.seconds)
    rows = []
    for dtype in args.dtypes.split(","):
        model_file = work / f"model_{dtype}.msgpack"
        write_model(model_file, args.variant, dtype, args.impl)
        wall = separate(track, model_file, work / f"out_{dtype}", work / f"separate_{dtype}.log")
        rows.append(dict(variant=args.variant or "paper", dtype=dtype, impl=args.impl,
                         track_seconds=args.seconds, wall_seconds=wall,
                         realtime_factor=args.seconds / wall))
        print(f"{dtype:<9} {args.impl}: {wall:.1f} s for {args.seconds:g} s of audio "
              f"(real-time factor {args.seconds / wall:.1f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
