"""Shared memory and threads per CTA of each Mosaic GPU SSD kernel, from the CUDA lowering on a
host without a GPU, at the BSMamba2 shapes (forward and backward).

    python scripts/mosaic_smem_check.py [--dtype bfloat16] [--markdown]

JAX's Mosaic GPU lowering sizes every kernel's shared memory and refuses one above the 227 KiB an
sm_90 CTA may use; this records what each kernel asks for (through a private hook: the size is
not exposed) and how many CTAs of it fit an SM's 228 KiB by shared memory alone. Registers and
spills are not known here: Mosaic GPU compiles its MLIR to PTX and SASS inside the CUDA plugin
when XLA compiles the custom call, which this CPU-only jaxlib cannot do (scripts/
triton_ptx_check.py does that part for the Triton kernels with a standalone Triton).
"""

from __future__ import annotations

import argparse
import sys

SHAPES = {"time-axis": (310, 801, 16, 64, 1, 128, 256),
          "band-axis": (4005, 62, 16, 64, 1, 128, 64)}
SM_SMEM = 228 * 1024  # per SM on H100/H200 (227 KiB usable by one CTA, 1 KiB reserved per CTA)


def capture(shape, dtype) -> list[tuple[str, int, int]]:
    """[(kernel name, shared-memory bytes, threads per CTA)] of the forward and backward, as
    the model calls the SSD (no initial state, the final state unused)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import core  # private: the only place the size is known

    from kernels.ssd.pallas import ssd_pallas

    seen: dict[str, tuple[int, int]] = {}
    original = core._smem_tree_size

    def hook(tree):
        size = original(tree)
        launch = sys._getframe(1)
        if launch.f_code.co_name == "_launch":
            frame, name = launch, None
            while frame is not None and name is None:
                name = frame.f_locals.get("kernel_name")
                frame = frame.f_back
            block = launch.f_locals.get("block", (0,))
            seen[str(name).removesuffix("_mosaic_gpu")] = (size, int(block[0]))
        return size

    b, l, h, p, g, n, chunk = shape
    spec = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = (spec((b, l, h, p), dtype), spec((b, l, h), f32), spec((h,), f32),
            spec((b, l, g, n), dtype), spec((b, l, g, n), dtype), spec((b, h, p, n), f32))

    def loss(x, dt, A, B, C):  # as the model calls it: no initial state, the final one unused
        y, _ = ssd_pallas(x, dt, A, B, C, chunk, None, backend="mosaic", interpret=False)
        return jnp.sum(y)

    core._smem_tree_size = hook
    try:
        jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)))).trace(*args[:5]).lower(
            lowering_platforms=("cuda",))
    finally:
        core._smem_tree_size = original
    return [(name, size, threads) for name, (size, threads) in sorted(seen.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    import jax.numpy as jnp

    if args.markdown:
        print("| shape | kernel | smem KiB | threads | CTAs/SM by smem |\n|---|---|---:|---:|---:|")
    for label, shape in SHAPES.items():
        for name, size, threads in capture(shape, jnp.dtype(args.dtype)):
            per_sm = SM_SMEM // (size + 1024)
            if args.markdown:
                print(f"| {label} | {name} | {size / 1024:.1f} | {threads} | {per_sm} |")
            else:
                print(f"{label:<10} {args.dtype:<9} {name:<26} smem {size / 1024:6.1f} KiB  "
                      f"threads {threads:>3}  CTAs/SM by smem {per_sm}", flush=True)


if __name__ == "__main__":
    main()
