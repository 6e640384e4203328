"""Mamba2 SSD scan: one entry point, several implementations.

    from kernels.ssd import mamba_chunk_scan
    y = mamba_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                         initial_states=None, dt_softplus=False, return_final_states=False,
                         impl="xla")

Mirrors mamba_ssm's `mamba_chunk_scan_combined`. Each implementation is a function
`(x, dt, A, B, C, chunk_size, initial_states) -> (y_float32, final_states_float32)` working on
prepared float32 `dt`; this module applies dt_bias/softplus before and the D skip and z gate after,
so that every implementation shares those steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from kernels.ssd.common import check_args, prepare_dt, skip_and_gate
from kernels.ssd.scan import ssd_scan
from kernels.ssd.xla import ssd_xla

IMPLS = ("scan", "xla", "pallas", "pallas_triton", "pallas_mosaic")


def default_pallas_backend() -> str:
    """The Pallas backend that impl="pallas" means: "triton" while JAX ships Pallas' Triton
    backend, else "mosaic".

    Why Triton first: its kernels run on every CUDA GPU JAX supports (sm_80 on), the Mosaic GPU
    kernels need sm_90 (TMA, wgmma), and neither has been timed on a card yet; JAX 0.11
    deprecates the Triton backend, and where a JAX no longer has it "pallas" is the Mosaic GPU
    kernels. Choose either explicitly with "pallas_triton" / "pallas_mosaic"."""
    try:
        import jax.experimental.pallas.triton  # noqa: F401
    except ImportError:
        return "mosaic"
    return "triton"


def get_impl(impl: str) -> Callable:
    """Resolves an implementation name to its function; ValueError for an unknown name."""
    if impl == "scan":
        return ssd_scan
    if impl == "xla":
        return ssd_xla
    if impl in ("pallas", "pallas_triton", "pallas_mosaic"):
        from kernels.ssd.pallas import ssd_pallas  # imports Pallas only when asked for

        backend = default_pallas_backend() if impl == "pallas" else impl.removeprefix("pallas_")
        return functools.partial(ssd_pallas, backend=backend)
    raise ValueError(f"Unknown SSD impl {impl!r}; choose one of {IMPLS}")


def mamba_chunk_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                     chunk_size: int, D: jax.Array | None = None, z: jax.Array | None = None,
                     dt_bias: jax.Array | None = None, initial_states: jax.Array | None = None,
                     dt_softplus: bool = False, return_final_states: bool = False,
                     impl: str = "xla") -> jax.Array | tuple[jax.Array, jax.Array]:
    """The SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t.

    Args:
      x: (b, l, h, p) inputs. dt: (b, l, h) step sizes (before dt_bias/softplus).
      A: (h,) per-head decay rates (negative). B, C: (b, l, g, n), h % g == 0.
      chunk_size: chunk length Q of the chunked algorithms; any l works (padded inside).
      D: (h,) or (h, p) skip. z: (b, l, h, p) gate, y *= silu(z). dt_bias: (h,).
      initial_states: (b, h, p, n) float32 state before step 0.
      dt_softplus: apply softplus to dt + dt_bias.
      return_final_states: also return the (b, h, p, n) float32 state after the last step.
      impl: "scan" (sequential reference), "xla" (chunked, pure JAX), "pallas_triton" or
        "pallas_mosaic" (Pallas kernels on the Triton or the Mosaic GPU backend, compiled where
        lowered for CUDA, interpreted on other platforms), or "pallas" (the default Pallas
        backend, `default_pallas_backend`: Triton while JAX ships it).
    Returns:
      y (b, l, h, p) in x.dtype, and final_states when asked.
    """
    check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    ssd = get_impl(impl)
    dt = prepare_dt(dt, dt_bias, dt_softplus)
    y, final_states = ssd(x, dt, A, B, C, chunk_size, initial_states)
    y = skip_and_gate(y, x, D, z)
    return (y, final_states) if return_final_states else y
