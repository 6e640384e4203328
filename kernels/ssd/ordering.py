"""Data dependencies that XLA cannot see through, to order work without changing values.

XLA:CPU removes `optimization_barrier`s early, merges identical computations
(common-subexpression elimination) and runs work as soon as its operands exist. Work that reads
only constants or parameters (a loop's zero-filled output buffer, a weight broadcast to an
activation's shape, a dropout mask) then runs at the start of the program and stays live until
its use, and a recomputation is merged back into the pass it repeats. `after(ref, tree)` makes
`tree` depend on `ref` so that neither can happen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def after(ref: Any, tree: Any) -> Any:
    """tree, made to depend on the first element of ref's first leaf; same values.

    x + 0 * (c == c) equals x for every finite or infinite c (c == c is 0 or 1, never NaN), but
    XLA cannot fold it: a float product with zero is not zero to it (NaN, inf), and integer
    leaves (a PRNG key's data) get that float zero converted. Boolean leaves pass unchanged.
    The dependency has no gradient (c == c is piecewise constant).
    """
    c = jax.tree_util.tree_leaves(ref)[0].reshape(-1)[0]
    zero = 0.0 * (c == c).astype(jnp.float32)

    def delay(a: jax.Array) -> jax.Array:
        if jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer):
            return a + zero.astype(a.dtype)
        return a

    return jax.tree_util.tree_map(delay, tree)
