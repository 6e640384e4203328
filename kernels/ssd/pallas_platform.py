"""Runs a Pallas computation compiled where it is lowered for CUDA, interpreted elsewhere.

    outs = on_lowering_platform(fn, *arrays)     # fn(*arrays, interpret=bool) -> list of arrays

The choice is made per platform when the computation is lowered, not from the machine that traces
it: `jax.export(..., platforms=("cpu", "cuda"))` or an ahead-of-time lowering for a GPU server
from a CPU host embeds the compiled kernels (Triton or Mosaic GPU) for CUDA and the interpreter
for the CPU.

Why not `jax.lax.platform_dependent`: it lowers every kept branch for every lowering platform, so
a multi-platform lowering asks a compiled `pallas_call` for a CPU lowering, which Pallas refuses
("Only interpret mode is supported on CPU backend"). A primitive with one lowering rule per
platform is lowered by `mlir.lower_per_platform`, which narrows each rule to its own platforms.

The primitive has no differentiation rules: it is meant for the forward and backward rules of a
`jax.custom_vjp`, which JAX never differentiates (a second derivative fails with JAX's message).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

__all__ = ["on_lowering_platform"]

# The platforms that get the compiled kernels; every other one gets the interpreter.
COMPILED_PLATFORMS = ("cuda",)

pallas_per_platform_p = Primitive("ssd_pallas_per_platform")
pallas_per_platform_p.multiple_results = True


def on_lowering_platform(fn: Callable[..., Sequence[jax.Array]], *args: jax.Array
                         ) -> list[jax.Array]:
    """fn(*args, interpret=False) where lowered for CUDA, fn(*args, interpret=True) elsewhere.

    Args:
      fn: a hashable callable (a function or a functools.partial of one) of arrays and the
        keyword `interpret`, returning a list or tuple of arrays; traced once per lowering.
      args: arrays only (bind static values into fn).
    """
    return pallas_per_platform_p.bind(*args, fn=fn)


def _abstract_eval(*avals, fn):
    """The outputs' avals, and the interpreter's effects: JAX's GPU interpreter (the Mosaic GPU
    kernels off CUDA) is a chain of ordered host callbacks, so the primitive declares them for
    every platform (a compiled lowering passes the ordering token through)."""
    interpreted = jax.make_jaxpr(functools.partial(fn, interpret=True))(*avals)
    outs = jax.eval_shape(functools.partial(fn, interpret=False), *avals)
    return [jax.core.ShapedArray(o.shape, o.dtype) for o in outs], interpreted.effects


def _impl(*args, fn):
    # Outside jit: compile for the default device, whose platform then picks the rule.
    return jax.jit(functools.partial(on_lowering_platform, fn))(*args)


def _lowered(*args, fn, interpret: bool):
    return list(fn(*args, interpret=interpret))


@dataclasses.dataclass(frozen=True)
class _Vmapped:
    """fn mapped over axis 0 of the arguments whose in_axes entry is 0 (a hashable closure)."""

    fn: Callable
    in_axes: tuple

    def __call__(self, *args, interpret: bool):
        return jax.vmap(functools.partial(self.fn, interpret=interpret), self.in_axes)(*args)


def _batch(args, dims, *, fn):
    # dims: the batched axis of each argument, None where it is not batched.
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
    in_axes = tuple(None if d is None else 0 for d in dims)
    outs = pallas_per_platform_p.bind(*args, fn=_Vmapped(fn, in_axes))
    return outs, [0] * len(outs)


pallas_per_platform_p.def_effectful_abstract_eval(_abstract_eval)
pallas_per_platform_p.def_impl(_impl)
batching.primitive_batchers[pallas_per_platform_p] = _batch
mlir.register_lowering(pallas_per_platform_p,
                       mlir.lower_fun(functools.partial(_lowered, interpret=True),
                                      multiple_results=True))
for _platform in COMPILED_PLATFORMS:
    mlir.register_lowering(pallas_per_platform_p,
                           mlir.lower_fun(functools.partial(_lowered, interpret=False),
                                          multiple_results=True),
                           platform=_platform)
