"""The parts of the GPU check, each under its own time budget (run through scripts/gpu_check.sh).

    python scripts/gpu_check.py run OUT [--dry] [--parts tests,ssd] [--budgets tests=60,...]
    python scripts/gpu_check.py summary OUT          # rewrite OUT/summary.md from OUT's files
    python scripts/gpu_check.py env OUT/env.json [--require-gpu]

Parts, most valuable first (GPU budget in seconds):
  env        versions, the device; on a GPU run, stops everything if JAX sees no GPU     15
  tests      the Pallas SSD tests (Triton and Mosaic GPU kernels, tests/kernels/
             test_ssd_{pallas,mosaic,steps}.py) compiled on the card (float32
             references at full precision)                                              85
  roofline   the card's copy bandwidth and bf16 matmul rate (benchmarks/roofline.py)    15
  ssd        "xla", "pallas_triton", "pallas_mosaic" and mamba_ssm's Triton SSD at the
             BSMamba2 shapes, bf16 then float32, fwd and fwd+bwd (benchmarks/ssd.py,
             benchmarks/peers.py)                                                      115
  ssd-table  their table against the ceilings (benchmarks/roofline.py)                  10
  train      the paper config's train step (benchmarks/train_step.py): one real step at
             5 x 8 s (bf16, remat per block) per impl with its peak memory, the compiled
             memory analysis (8 s, then 1, 2, 4 s), then batch sweeps per (impl, remat)
             until the budget ends                                                     100
  inference  bsmamba2-separate on a 4-minute synthetic track, bf16 and fp32 (wall time,
             real-time factor; scripts/gpu_inference.py)                                 75
  models     BSMamba2 and BS-RoFormer forward at 1, 8, 16 s: time and compiled
             temporaries (benchmarks/model.py compare)                                   45
Each step runs in its own process group and is killed when its part's budget (or the total)
runs out, so a hang leaves the other parts' results. Everything lands in OUT: a log per part
(OUT/<part>.log), the JSON of each benchmark, OUT/parts.json (status and seconds per step) and
OUT/summary.md (all tables). Large files (the track, model files, separated audio) go to
$GPU_CHECK_WORK (default: a folder in the system's temporary directory). --dry runs the same
steps on the CPU with tiny shapes and short loops (the tiny config, a 10 s track), so that only
what needs the card can fail on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# Audio and model files (hundreds of MB) stay out of OUT, which holds logs, JSON and tables.
WORK = Path(os.environ.get("GPU_CHECK_WORK", Path(tempfile.gettempdir()) / "bsmamba2_gpu_check"))


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    cmd: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # on the card; a dry run gets DRY_BUDGET_S per part (the CPU is slower)
    steps: Callable[[Path, bool], list[Step]]  # built when the part starts (reads earlier JSON)
    title: str


DRY_BUDGET_S = 900.0
TOTAL_S = 465.0  # under 8 minutes with the install, whatever each part does (parts: 460)


def _env_steps(out: Path, dry: bool) -> list[Step]:
    cmd = [PY, "scripts/gpu_check.py", "env", str(out / "env.json")]
    return [Step("versions", cmd if dry else [*cmd, "--require-gpu"])]


def _test_steps(out: Path, dry: bool) -> list[Step]:
    cmd = [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "console_output_style=classic",
           "tests/kernels/test_ssd_pallas.py", "tests/kernels/test_ssd_mosaic.py",
           "tests/kernels/test_ssd_steps.py"]
    if dry:  # one odd shape's values, gradients and bf16; one CUDA lowering; the CPU lowering
        cmd += ["-k", "b2l11h4p5g2n6q16 or 2x7x4x5x2x6x16 or cpu_lowering or "
                "(b2l37h4p5g2n6q64 and bfloat16) or 3x50x6x12x3x10x24 or missing_wait"]
    # The float32 "xla" reference at full precision (XLA's GPU default for float32 is TF32).
    return [Step("pytest", cmd, {"JAX_DEFAULT_MATMUL_PRECISION": "highest"})]


def _roofline_steps(out: Path, dry: bool) -> list[Step]:
    cmd = [PY, "benchmarks/roofline.py", "--json", str(out / "roofline.json")]
    return [Step("ceilings", cmd + (["--copy_gib", "0.01", "--matmul_size", "256",
                                     "--repeats", "3"] if dry else []))]


def _ssd_steps(out: Path, dry: bool) -> list[Step]:
    # The model's shapes at the authors' 5 examples of 8 s per device (x 62 x 801 along time).
    shapes = ["--shapes", "tiny", "--repeats", "1"] if dry else [
        "--shapes", "bsmamba2", "--batch", "5", "--repeats", "10"]
    steps = []
    for dtype in ("bfloat16", "float32"):
        common = [*shapes, "--dtypes", dtype, "--modes", "fwd,fwdbwd"]
        steps.append(Step(f"ours {dtype}", [PY, "benchmarks/ssd.py", "--impls",
                                            "xla,pallas_triton,pallas_mosaic",
                                            *common, "--json", str(out / f"ssd_{dtype}.json")]))
        steps.append(Step(f"mamba_ssm {dtype}", [PY, "benchmarks/peers.py", *common, "--json",
                                                 str(out / f"peers_{dtype}.json")]))
    return steps


def _table_steps(out: Path, dry: bool) -> list[Step]:
    dtypes = ("bfloat16", "float32")
    return [Step("ssd table", [
        PY, "benchmarks/roofline.py", "--ceilings", str(out / "roofline.json"),
        "--ssd", *(str(out / f"ssd_{d}.json") for d in dtypes),
        "--peers", *(str(out / f"peers_{d}.json") for d in dtypes),
        "--markdown", str(out / "ssd_table.md")])]


def _peak_tflops(out: Path) -> list[str]:
    try:
        rate = json.loads((out / "roofline.json").read_text())["bf16_matmul_flops_per_s"]
    except (OSError, KeyError, ValueError):
        return []  # no ceiling measured: train_step.py reports MFU against its own default
    return ["--peak-tflops", f"{rate / 1e12:.4g}"]


def _train_steps(out: Path, dry: bool) -> list[Step]:
    script = [PY, "benchmarks/train_step.py"]
    config = ["--config=configs/bsmamba2.py" + (":tiny" if dry else "")]
    seconds = ["--seconds", "1" if dry else "8"]
    speed = [*script, "speed", *config, *seconds, "--dtype", "bfloat16", *_peak_tflops(out)]
    steps = [
        # The authors' per-GPU batch: one real step with remat, its peak memory; pallas first.
        Step(f"speed 5 x 8 s, remat block, {impl}", [
            *speed, "--batches", "2" if dry else "5", "--remat", "block", "--impls", impl,
            "--json", str(out / f"train_paper_batch_{impl}.json")])
        for impl in ("pallas", "xla")]
    # Compile-only memory analysis on the card (CUDA's buffers, not the CPU's): 8 s first.
    memory = [*script, "memory", *config, "--remat", "block,layer,none"]
    for secs in (["1"] if dry else ["8", "1,2,4"]):
        steps.append(Step(f"memory analysis {secs} s", [
            *memory, "--seconds", secs, "--json",
            str(out / f"train_memory_{secs.replace(',', '_')}s.json")],
            {} if dry else {"JAX_PLATFORMS": "cuda"}))
    batches = "1" if dry else "1,2,4,8,16"
    sweeps = (("pallas", "block"), ("xla", "block"), ("pallas", "layer"), ("xla", "layer"),
              ("pallas", "none"), ("xla", "none"))
    if dry:  # each kind of command once: the CPU compiles every row for about a minute
        steps = [steps[0], *steps[2:]]
        sweeps = (("xla", "block"),)
    for impl, remat in sweeps:
        steps.append(Step(f"sweep {impl} remat {remat}", [
            *speed, "--batches", batches, "--remat", remat, "--impls", impl,
            "--json", str(out / f"train_sweep_{impl}_{remat}.json")]))
    return steps


def _inference_steps(out: Path, dry: bool) -> list[Step]:
    cmd = [PY, "scripts/gpu_inference.py", str(WORK / "inference"), "--dtypes", "bfloat16,float32",
           "--impl", "pallas", "--json", str(out / "inference.json")]
    return [Step("separate", cmd + (["--variant", "tiny", "--seconds", "10"] if dry else []))]


def _models_steps(out: Path, dry: bool) -> list[Step]:
    configs = "configs/bsmamba2.py,configs/bsroformer.py"
    if dry:
        configs = "configs/bsmamba2.py:tiny,configs/bsroformer.py:tiny"
    return [Step("bsmamba2 vs bs-roformer", [
        PY, "benchmarks/model.py", "compare", "--configs", configs,
        "--seconds", "1,2" if dry else "1,8,16", "--repeats", "1" if dry else "3",
        "--json", str(out / "models.json")])]


PARTS = [
    Part("env", 15, _env_steps, "Versions and device"),
    Part("tests", 85, _test_steps, "Pallas SSD tests on the card"),
    Part("roofline", 15, _roofline_steps, "Ceilings"),
    Part("ssd", 115, _ssd_steps, "SSD speed"),
    Part("ssd-table", 10, _table_steps, "SSD table against the ceilings"),
    Part("train", 100, _train_steps, "Train step"),
    Part("inference", 75, _inference_steps, "Inference"),
    Part("models", 45, _models_steps, "BSMamba2 against BS-RoFormer, forward"),
]


def _run_step(step: Step, log, timeout: float) -> tuple[str, float]:
    """Runs one step in its own process group; ("ok" | "failed (rc N)" | "timeout", seconds)."""
    log.write(f"\n=== {step.name}: {' '.join(step.cmd)}\n")
    log.flush()
    env = {**os.environ, **step.env}
    t0 = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = "timeout"
    seconds = time.monotonic() - t0
    log.write(f"=== {step.name}: {status} after {seconds:.1f} s\n")
    log.flush()
    return status, seconds


def budgets_from(text: str | None) -> dict[str, float]:
    """"tests=60,ssd=200" -> {"tests": 60.0, "ssd": 200.0}; ValueError naming a bad entry."""
    known = {p.name for p in PARTS}
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in known or not value.replace(".", "", 1).isdigit():
            raise ValueError(f"bad budget {item!r}: want PART=SECONDS with PART in {sorted(known)}")
        out[name] = float(value)
    return out


def run(out: Path, dry: bool, parts: list[str] | None, total_s: float,
        budgets: dict[str, float] | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    record = dict(mode="dry (CPU, tiny shapes)" if dry else "gpu", parts=[])
    failures = 0
    for part in PARTS:
        if parts is not None and part.name not in parts:
            continue
        budget = (budgets or {}).get(part.name, DRY_BUDGET_S if dry else part.budget_s)
        budget = min(budget, total_s - (time.monotonic() - start))
        entry = dict(name=part.name, title=part.title, budget_s=budget, steps=[])
        record["parts"].append(entry)
        t0 = time.monotonic()
        with open(out / f"{part.name}.log", "w") as log:
            for step in part.steps(out, dry):
                left = budget - (time.monotonic() - t0)
                if left < 1:
                    entry["steps"].append(dict(name=step.name, status="skipped (budget)",
                                               seconds=0.0))
                    continue
                status, seconds = _run_step(step, log, left)
                entry["steps"].append(dict(name=step.name, status=status, seconds=seconds))
                failures += status != "ok"
        entry["seconds"] = time.monotonic() - t0
        print(f"[{part.name}] {entry['seconds']:.0f} s of {budget:.0f} s: "
              + ", ".join(f"{s['name']} {s['status']}" for s in entry["steps"]), flush=True)
        (out / "parts.json").write_text(json.dumps(record, indent=1) + "\n")
        if part.name == "env" and entry["steps"][0]["status"] != "ok" and not dry:
            print("stopping: no GPU (see env.log)", flush=True)
            break
    record["seconds"] = time.monotonic() - start
    (out / "parts.json").write_text(json.dumps(record, indent=1) + "\n")
    write_summary(out)
    print(f"total {record['seconds']:.0f} s; summary: {out / 'summary.md'}", flush=True)
    return 1 if failures else 0


# --- summary ------------------------------------------------------------------------------------

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "-" if v is None else str(v)


def markdown_table(rows: list[dict]) -> list[str]:
    """Rows of any keys (their union, first-seen order) as a Markdown table."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows)]


def _rows_of(data) -> list[dict]:
    """The rows of a benchmark JSON: a list, or the list under "rows" (or any list of dicts)."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        if isinstance(data.get("rows"), list):
            return _rows_of(data["rows"])
        for v in data.values():
            if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                return v
    return []


def _test_counts(log: Path) -> tuple[dict, list[str]]:
    text = log.read_text() if log.exists() else ""
    results = re.findall(r"^(tests/\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M)
    counts: dict[str, int] = {}
    for _, result in results:
        counts[result] = counts.get(result, 0) + 1
    return counts, [name for name, result in results if result in ("FAILED", "ERROR")]


def write_summary(out: Path) -> None:
    record = _load(out / "parts.json") or {"parts": []}
    env = _load(out / "env.json") or {}
    lines = [f"# GPU check: {env.get('device', '?')}, {env.get('date', '?')}", "",
             f"mode {record.get('mode', '?')}; " + ", ".join(
                 f"{k} {v}" for k, v in env.get("versions", {}).items()), ""]
    lines += ["| part | step | status | seconds | part budget |", "|---|---|---|---:|---:|"]
    for part in record["parts"]:
        for s in part["steps"]:
            lines.append(f"| {part['name']} | {s['name']} | {s['status']} | {s['seconds']:.1f} "
                         f"| {part['budget_s']:.0f} |")
    if "seconds" in record:
        lines.append(f"\nTotal {record['seconds']:.0f} s.")

    counts, failed = _test_counts(out / "tests.log")
    lines += ["", "## Pallas SSD tests", "",
              ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "not run"]
    lines += [f"- FAILED {name}" for name in failed]

    lines += ["", "## SSD speed", ""]
    table = out / "ssd_table.md"
    lines += [table.read_text().rstrip()] if table.exists() else ["not measured"]
    for path in sorted(out.glob("peers_*.json")):
        data = _load(path) or {}
        if not data.get("rows"):
            lines.append(f"\nmamba_ssm column ({path.name}): {data.get('source', 'not run')}")

    lines += ["", "## Train step", ""]
    for path in sorted(out.glob("train_*.json")):
        rows = _rows_of(_load(path))
        lines += [f"`{path.name}`", "", *(markdown_table(rows) if rows else ["no rows"]), ""]
    if not list(out.glob("train_*.json")):
        lines.append("not measured")

    lines += ["", "## Inference", ""]
    rows = _rows_of(_load(out / "inference.json"))
    lines += markdown_table(rows) if rows else ["not measured"]

    lines += ["", "## BSMamba2 against BS-RoFormer (forward, batch 1)", ""]
    rows = _rows_of(_load(out / "models.json"))
    lines += markdown_table(rows) if rows else ["not measured"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# --- env ----------------------------------------------------------------------------------------

def env(path: Path, require_gpu: bool) -> int:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "torch",
                 "flax", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    import jax

    device = jax.devices()[0]
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                backend=jax.default_backend(), device=device.device_kind,
                devices=len(jax.devices()), versions=versions)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    if require_gpu and info["backend"] != "gpu":
        print(f"JAX sees no GPU (backend {info['backend']}): the check needs the card; "
              "use --dry on a CPU", file=sys.stderr)
        return 3
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("out")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, short loops")
    p.add_argument("--parts", default=None, help=f"comma list of {[q.name for q in PARTS]}")
    p.add_argument("--total", type=float, default=None,
                   help=f"seconds for all parts (default {TOTAL_S:g}; a dry run: unlimited)")
    p.add_argument("--budgets", default=os.environ.get("GPU_CHECK_BUDGETS"),
                   help="PART=SECONDS,... overriding the parts' budgets (or $GPU_CHECK_BUDGETS)")
    p = sub.add_parser("summary")
    p.add_argument("out")
    p = sub.add_parser("env")
    p.add_argument("json")
    p.add_argument("--require-gpu", action="store_true")
    args = parser.parse_args()
    if args.command == "env":
        return env(Path(args.json), args.require_gpu)
    if args.command == "summary":
        write_summary(Path(args.out))
        return 0
    parts = None if args.parts is None else args.parts.split(",")
    unknown = set(parts or []) - {q.name for q in PARTS}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {[q.name for q in PARTS]}")
    try:
        budgets = budgets_from(args.budgets)
    except ValueError as err:
        parser.error(str(err))
    total = args.total if args.total is not None else (float("inf") if args.dry else TOTAL_S)
    return run(Path(args.out).resolve(), args.dry, parts, total, budgets)


if __name__ == "__main__":
    sys.exit(main())
