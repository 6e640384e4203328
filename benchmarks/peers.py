"""Times mamba_ssm's Triton SSD, `mamba_chunk_scan_combined`, at benchmarks/ssd.py's shapes.

    bash scripts/prepare_peers.sh MAMBA_REPO          # once: mamba_ssm's SSD files -> .peer/
    python benchmarks/peers.py --shapes bsmamba2 --dtypes bfloat16,float32 --json peers.json

The anchor our kernels are measured against on the same card (PyTorch + Triton; its SSD is pure
Python + Triton). Its files are copied into the ignored `.peer/` folder and imported from there
without mamba_ssm's package __init__ (which loads its compiled CUDA extension): the loader gives
`mamba_ssm` and its subpackages empty package shells. Nothing of it is committed or installed.

Rows have benchmarks/ssd.py's JSON fields with impl "mamba_ssm" (same FLOP and byte counts), so
`benchmarks/roofline.py --ssd ssd.json --peers peers.json` puts them in one table. Each forward
row also gives `rel_err_vs_xla`: max |y_mamba - y_xla| / max |y_xla| on the same inputs, our
"xla" impl run in this process (so the anchor is known to compute the same function).
Without .peer/, torch, triton or a CUDA device it prints why, writes an empty row list, exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

PEER_DIR = Path(__file__).resolve().parent.parent / ".peer"
PACKAGES = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils")
DEVICE = "cuda"


def load_mamba_chunk_scan(peer_dir: Path = PEER_DIR) -> tuple[Callable | None, str]:
    """(mamba_chunk_scan_combined, where it came from), or (None, why it cannot be loaded)."""
    root = peer_dir / "mamba_ssm"
    if not (root / "ops" / "triton" / "ssd_combined.py").exists():
        return None, (f"{root} has no mamba_ssm SSD: run `bash scripts/prepare_peers.sh "
                      "MAMBA_REPO` (a checkout of state-spaces/mamba) first")
    for module in ("torch", "triton", "einops"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            return None, f"mamba_ssm's SSD needs {module}: {err}"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device for PyTorch: mamba_ssm's Triton kernels need one"
    # Package shells: import the copied modules without running mamba_ssm/__init__.py.
    for name in PACKAGES:
        if name not in sys.modules:
            shell = types.ModuleType(name)
            shell.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = shell
    combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    source = (peer_dir / "SOURCE").read_text().splitlines()[0] if (
        peer_dir / "SOURCE").exists() else str(root)
    return combined.mamba_chunk_scan_combined, source


def _median_ms(fn: Callable, repeats: int) -> float:
    import torch

    fn()  # Triton's autotuning and compilation happen in the first calls
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _rows_for(scan: Callable, s, dtype_name: str, modes: list[str], repeats: int) -> list[dict]:
    """Rows of one shape and dtype; inputs from benchmarks/ssd.py's `make_inputs`."""
    import jax
    import numpy as np
    import torch

    from benchmarks import ssd

    jargs = ssd.make_inputs(s, jax.numpy.dtype(dtype_name))
    y_xla = np.asarray(ssd.build("xla", "fwd", s.chunk)(*jargs), np.float32)
    tdtype = getattr(torch, dtype_name)
    # float32 through numpy (bf16 values are exact in float32), then the benchmark dtype; dt and A
    # stay float32 as in benchmarks/ssd.py.
    x, dt, A, B, C = (torch.from_numpy(np.asarray(a, np.float32)).to(DEVICE) for a in jargs)
    x, B, C = x.to(tdtype), B.to(tdtype), C.to(tdtype)
    del jargs
    y = scan(x, dt, A, B, C, s.chunk, dt_softplus=True).float().cpu().numpy()
    err = float(np.max(np.abs(y - y_xla)) / np.max(np.abs(y_xla)))
    leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C)]

    def forward():
        with torch.no_grad():
            scan(x, dt, A, B, C, s.chunk, dt_softplus=True)

    def forward_backward():
        y = scan(*leaves, s.chunk, dt_softplus=True)
        (y.float() ** 2).sum().backward()
        for t in leaves:
            t.grad = None

    tokens = s.batch * s.seqlen
    itemsize = torch.finfo(tdtype).bits // 8
    rows = []
    for mode in modes:
        ms = _median_ms(forward if mode == "fwd" else forward_backward, repeats)
        flops = ssd.forward_flops(s) * (3 if mode == "fwdbwd" else 1)
        nbytes = ssd.forward_bytes(s, itemsize)
        if mode == "fwdbwd":
            nbytes += nbytes + itemsize * tokens * s.nheads * s.headdim
        rows.append(dict(
            **asdict(s), dtype=dtype_name, mode=mode, impl="mamba_ssm", ms=ms,
            tokens_per_s=tokens / ms * 1e3, gflops=flops / ms / 1e6, gbps=nbytes / ms / 1e6,
            temp_mib=float("nan"), rel_err_vs_scan=None,
            rel_err_vs_xla=err if mode == "fwd" else None))
        print(f"{s.name:<12} {s.batch:>5} {s.seqlen:>6} {s.chunk:>4} {dtype_name:<9} {mode:<7} "
              f"mamba_ssm {ms:>10.3f} ms  err vs xla {err:.1e}", flush=True)
    return rows


def run(shapes, dtypes: list[str], modes: list[str], repeats: int, scan: Callable) -> list[dict]:
    import torch

    rows = []
    for s in shapes:
        for dtype_name in dtypes:
            rows += _rows_for(scan, s, dtype_name, modes, repeats)
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="bsmamba2", help="benchmarks/ssd.py shape sets")
    parser.add_argument("--batch", type=int, default=1, help="as benchmarks/ssd.py --batch")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    # JAX computes the "xla" reference next to PyTorch on the same card: no preallocation.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    scan, source = load_mamba_chunk_scan()
    rows = []
    if scan is None:
        print(f"mamba_ssm column skipped: {source}")
    else:
        import torch

        from benchmarks import ssd

        sets = {"check": ssd.check_shapes, "sweep": ssd.sweep_shapes, "tiny": ssd.tiny_shapes,
                "bsmamba2": lambda: ssd.bsmamba2_shapes(args.batch)}
        shapes = [s for name in args.shapes.split(",") for s in sets[name]()]
        print(f"mamba_ssm {source}; torch {torch.__version__}, "
              f"{torch.cuda.get_device_name()}")
        rows = run(shapes, args.dtypes.split(","), args.modes.split(","), args.repeats, scan)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(impl="mamba_ssm", source=source, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
