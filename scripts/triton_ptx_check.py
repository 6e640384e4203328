"""Compiles the SSD Pallas kernels to PTX and SASS on a machine without a GPU, and reports each
kernel's shared memory, registers and spills for sm_90a (H100) and sm_80 (A100).

    pip install --target /tmp/tri --no-deps triton     # optional tool, not a project dependency
    PYTHONPATH=/tmp/tri:. python scripts/triton_ptx_check.py [--dtype bfloat16] [--block_m 64]

The CUDA-lowering test proves that Pallas builds Triton IR for every kernel; this goes one step
further with a standalone Triton (its version need not match the one inside jaxlib, so treat the
numbers as close estimates): the IR that jax lowers is captured (through a private jax hook),
compiled by `triton.compile` for each target, and assembled by the ptxas that ships with Triton.
A kernel that needs more shared memory than the card has fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile


def capture_kernels(shape, dtype, block_m: int | None, with_init: bool):
    """[(kernel name, Triton IR text, num_warps)] for the forward and backward at `shape`."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering  # private: the only place the IR is visible

    from kernels.ssd.pallas import ssd_pallas
    from kernels.ssd.triton.common import SSDBlockSizes, kernel_dims

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def hook(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    b, l, h, p, g, n, chunk = shape
    q, P, N = kernel_dims(l, p, n, chunk)
    blocks = SSDBlockSizes.default(P, N, q, jnp.dtype(dtype).itemsize)
    if block_m is not None:  # the default's warp rule, for the chosen tile
        blocks = dataclasses.replace(blocks, block_m=block_m,
                                     num_warps_scan=8 if block_m * max(P, N) >= 8192 else 4)
    spec = jax.ShapeDtypeStruct
    args = (spec((b, l, h, p), dtype), spec((b, l, h), jnp.float32), spec((h,), jnp.float32),
            spec((b, l, g, n), dtype), spec((b, l, g, n), dtype), spec((b, h, p, n), jnp.float32))

    def loss(x, dt, A, B, C, init):
        y, final = ssd_pallas(x, dt, A, B, C, chunk, init if with_init else None,
                              block_sizes=blocks, interpret=False)
        return jnp.sum(y) + jnp.sum(final)

    lowering.lower_jaxpr_to_triton_module = hook
    try:
        jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(
            lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    out, seen = [], set()
    for text in captured:
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        if name in seen:
            continue
        seen.add(name)
        warps = blocks.num_warps_state if "state" in name else blocks.num_warps_scan
        out.append((name, text, warps, blocks.num_stages))
    return out


def compile_report(name, text, warps, stages, cc: int, workdir: str) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    path = os.path.join(workdir, f"{name}.ttir")
    with open(path, "w") as f:
        f.write(text)
    try:
        kernel = triton_compile(path, target=GPUTarget("cuda", cc, 32),
                                options=dict(num_warps=warps, num_stages=stages))
    except Exception as err:  # report every kernel, not just the first failure
        return f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    ptx = kernel.asm["ptx"]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, exe) for exe in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bin_dir, exe))), None)
    usage = ""
    if ptxas:
        ptx_path = path + ".ptx"
        with open(ptx_path, "w") as f:
            f.write(ptx)
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", os.devnull],
                             capture_output=True, text=True)
        regs = re.findall(r"Used (\d+) registers", res.stderr)
        spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
        usage = (f"regs {max(map(int, regs)) if regs else '?':>3}  "
                 f"spill {max(map(int, spills)) if spills else '?':>5} B")
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no-mma")
    return f"smem {kernel.metadata.shared / 1024:6.1f} KiB  {mma:<6} {usage}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block_m", type=int, default=None)
    parser.add_argument("--with_init", action="store_true")
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("needs the `triton` package (see the module docstring)")
    import jax.numpy as jnp

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shapes = {"time-axis": (310, 801, 16, 64, 1, 128, 256),
              "band-axis": (4005, 62, 16, 64, 1, 128, 64)}
    with tempfile.TemporaryDirectory() as workdir:
        for label, shape in shapes.items():
            kernels = capture_kernels(shape, jnp.dtype(args.dtype), args.block_m, args.with_init)
            for name, text, warps, stages in kernels:
                for cc in (90, 80):
                    report = compile_report(name, text, warps, stages, cc, workdir)
                    print(f"{label:<10} {args.dtype:<9} {name:<26} w{warps} sm{cc}: {report}",
                          flush=True)


if __name__ == "__main__":
    main()
