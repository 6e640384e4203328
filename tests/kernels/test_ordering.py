"""`kernels.ssd.ordering.after`: a dependency XLA cannot see through, values unchanged."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssd.ordering import after


@pytest.mark.parametrize("first", [1.5, -0.0, np.nan, np.inf, -np.inf])
def test_after_keeps_values_exactly(first):
    rng = np.random.default_rng(zlib.crc32(repr(first).encode()))
    ref = rng.standard_normal((3, 4)).astype(np.float32)
    ref[0, 0] = first
    tree = (rng.standard_normal((5, 2)).astype(np.float32),
            rng.standard_normal(3).astype(jnp.bfloat16),
            rng.integers(0, 2**32, 4, dtype=np.uint32),  # a PRNG key's data
            np.arange(-3, 4, dtype=np.int32), rng.standard_normal(6) > 0)
    got = jax.jit(after)(jnp.asarray(ref), tuple(jnp.asarray(a) for a in tree))
    for g, a in zip(got, tree, strict=True):
        assert g.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(g), a, err_msg=f"ref[0, 0]={first}")


def test_after_passes_gradients_through_unchanged():
    rng = np.random.default_rng(7)
    ref, x = (jnp.asarray(rng.standard_normal((2, 3)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    g_ref, g_x = jax.grad(lambda r, v: jnp.sum(after(r, v) * w), argnums=(0, 1))(ref, x)
    np.testing.assert_array_equal(np.asarray(g_x), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(g_ref), np.zeros((2, 3), np.float32))


def test_after_survives_compilation():
    """The dependency is still in the optimised program: XLA did not fold it away."""
    text = jax.jit(lambda r, v: after(r, jnp.zeros((4, 5)) + v)).lower(
        jnp.ones(3), jnp.ones((4, 5))).compile().as_text()
    assert "compare" in text
