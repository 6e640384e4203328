"""Whole-song separation through the bsmamba2-separate path: wall time, real-time factor, memory.

    python benchmarks/separate.py [--config paper|demo|tiny] [--minutes 4,20]
        [--segment-seconds 8] [--batch-size auto] [--dtype auto] [--repeats 2]
        [--workdir /tmp/bsmamba2_separate_bench] [--json OUT.json]

For each track length: writes a stereo 44.1 kHz float wav made with the synthetic generator
(`bsmamba2_jax.data.synthetic`; one minute of music repeated to the length) and a model file
with randomly initialised weights of the chosen config (both cached in --workdir), then runs, in
a fresh Python process per track, what `bsmamba2-separate TRACK -o OUT --checkpoint MODEL` runs
(`separate_cli.load_separator`, then `separate_cli.run`), with timed calls of the compiled forward
on one batch of segments before and after it.

Columns: load = reading the model file and compiling the forward; separation = the file's wall
time from opening it to its outputs being in place (reading, resampling, every model call,
writing); RTF = separation / audio seconds; forward = median of the calls on one batch timed
alone, `--repeats` before and `--repeats` after the separation; ideal = calls x forward; ratio =
separation / ideal (the goal is <= 1.15); in model calls = the time the separation spent inside
the model's calls (the rest is reading, writing, waiting for the first batch and for the last
write) and their median; peak RSS = the process's peak resident memory (load and compile
included) and the peak sampled every 20 ms during the separation alone; call = XLA's compiled
memory (temporaries + input + output) of one call. The load average is read before and after
each run: the numbers are only as quiet as it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RATE = 44100


def load_average() -> float:
    return os.getloadavg()[0]


def make_model(config_name: str, workdir: Path) -> Path:
    """A model file of `config_name` with model.init's random weights (key 0), cached."""
    path = workdir / f"model_{config_name or 'paper'}.msgpack"
    if path.is_file():
        return path
    import jax

    from bsmamba2_jax import export
    from bsmamba2_jax.model import BSMamba2
    from configs.bsmamba2 import get_config

    config = get_config(config_name)
    model = BSMamba2(**config.model)
    # The weights do not depend on the input's length: init on a short one.
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 2, RATE // 4), np.float32))
    return export.save_model(path, params, config)


def make_track(minutes: float, workdir: Path) -> Path:
    """A stereo float wav of `minutes`: one synthetic minute repeated, written block-wise."""
    import soundfile as sf

    from bsmamba2_jax.data import synthetic

    path = workdir / f"track_{minutes:g}min.wav"
    if path.is_file():
        return path
    total = int(round(minutes * 60 * RATE))
    track = synthetic.synthesize_track(0, "test", 0, min(60.0, minutes * 60))
    mixture = sum(track.stems[s] for s in synthetic.STEMS).T  # (n, 2)
    tmp = path.with_name(path.name + ".tmp")
    with sf.SoundFile(str(tmp), "w", RATE, 2, subtype="FLOAT", format="WAV") as f:
        written = 0
        while written < total:
            n = min(len(mixture), total - written)
            f.write(mixture[:n])
            written += n
    tmp.replace(path)
    return path


class RssSampler:
    """Peak VmRSS of this process, sampled every `period` seconds on a thread."""

    def __init__(self, period: float = 0.02):
        self.period, self.peak = period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def child(args: argparse.Namespace) -> dict:
    """One track in this process: the CLI's load and run, then the forward alone."""
    import jax

    from bsmamba2_jax import separate_cli

    load0 = load_average()
    t = time.perf_counter()
    separator = separate_cli.load_separator(
        args.model, dtype=args.dtype, segment_seconds=args.segment_seconds,
        batch_size=args.batch_size if args.batch_size == "auto" else int(args.batch_size))
    load_s = time.perf_counter() - t
    call_times: list[float] = []
    compiled = separator.fn

    def timed(x):
        t = time.perf_counter()
        out = np.asarray(compiled(x))
        call_times.append(time.perf_counter() - t)
        return out

    separator = dataclasses.replace(separator, fn=timed)
    batch = 0.1 * np.random.default_rng(0).standard_normal(
        (separator.batch_size, 2, separator.segment)).astype(np.float32)

    def forward_times(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(compiled(batch))
            times.append(time.perf_counter() - t)
        return times

    # Before and after the separation, so a load that changes during the run hits both sides.
    times = forward_times(args.repeats)
    with tempfile.TemporaryDirectory(dir=args.workdir) as out, RssSampler() as sampler:
        (result,) = separate_cli.run([args.track], out, separator, progress=False)
    if result.error:
        raise SystemExit(f"separation failed: {result.error}")
    times += forward_times(args.repeats)
    calls = -(-result.segments // separator.batch_size)
    forward = float(np.median(times))
    return {
        "config": args.config or "paper", "minutes": result.seconds / 60,
        "audio_s": result.seconds, "segment_s": separator.segment / separator.rate,
        "batch": separator.batch_size, "segments": result.segments, "calls": calls,
        "load_s": load_s, "separation_s": result.wall, "rtf": result.wall / result.seconds,
        "forward_s": forward, "forward_all_s": times, "ideal_s": calls * forward,
        "ratio": result.wall / (calls * forward), "in_calls_s": sum(call_times),
        "call_times_s": call_times, "median_call_in_run_s": float(np.median(call_times)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "separation_rss_gb": sampler.peak / 1e9, "call_gib": separator.call_bytes / 2**30,
        "backend": jax.default_backend(), "load_before": load0, "load_after": load_average(),
    }


COLUMNS = [("config", "config", "{}"), ("minutes", "track min", "{:.0f}"),
           ("segment_s", "segment s", "{:g}"), ("batch", "batch", "{}"),
           ("segments", "segments", "{}"), ("load_s", "load s", "{:.1f}"),
           ("separation_s", "separation s", "{:.1f}"), ("rtf", "RTF", "{:.3f}"),
           ("forward_s", "forward s", "{:.3f}"), ("ideal_s", "ideal s", "{:.1f}"),
           ("ratio", "ratio", "{:.3f}"), ("in_calls_s", "in model calls s", "{:.1f}"),
           ("median_call_in_run_s", "median call in run s", "{:.3f}"),
           ("peak_rss_gb", "peak RSS GB", "{:.2f}"),
           ("separation_rss_gb", "RSS in separation GB", "{:.2f}"),
           ("call_gib", "call GiB", "{:.2f}"), ("load_before", "load avg", "{:.1f}")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = []
    for r in rows:
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        cells[-1] = f"{r['load_before']:.1f}-{r['load_after']:.1f}"
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule] + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="", choices=["", "paper", "demo", "tiny"],
                        help="configs/bsmamba2.py variant ('' or paper = the paper model)")
    parser.add_argument("--minutes", default="4,20", help="track lengths, comma-separated")
    parser.add_argument("--segment-seconds", type=float, default=8.0)
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2,
                        help="forward calls timed alone before, and again after, the separation")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "bsmamba2_separate_bench"))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--track", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = "" if args.config == "paper" else args.config
    workdir = Path(args.workdir)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(args.config, workdir)
    rows = []
    for minutes in (float(m) for m in args.minutes.split(",")):
        track = make_track(minutes, workdir)
        cmd = [sys.executable, __file__, "--child", "--config", args.config or "paper",
               "--model", str(model), "--track", str(track), "--workdir", str(workdir),
               "--segment-seconds", str(args.segment_seconds), "--batch-size", args.batch_size,
               "--dtype", args.dtype, "--repeats", str(args.repeats)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the {minutes:g}-minute run failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{minutes:g} min done: {rows[-1]['separation_s']:.1f} s", file=sys.stderr)
    import platform

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, backend "
          f"{rows[0]['backend']}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
