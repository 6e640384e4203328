"""`mamba_chunk_scan` ("scan", "xla") against the float64 NumPy recurrence: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssd import mamba_chunk_scan
from tests.kernels import ssd_recurrence as rec

GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")

# (b, l, h, p, g, n, chunk): l = 1, l < chunk, l not a multiple of chunk, g = 1 and g > 1,
# p and n not powers of two.
SHAPES = [
    (1, 1, 2, 3, 1, 5, 16),
    (2, 7, 4, 5, 2, 6, 16),
    (1, 50, 6, 12, 3, 10, 16),
    (2, 33, 3, 7, 1, 9, 8),
    (1, 64, 4, 8, 4, 4, 16),
]


def rel_err(actual, expected) -> float:
    """max |a - e| / max |e|, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def to_jnp(inputs, dtype=jnp.float32):
    return {k: None if v is None else jnp.asarray(v, dtype) for k, v in inputs.items()}


def run_forward(inputs, chunk, impl, dtype=jnp.float32):
    args = to_jnp(inputs, dtype)
    if args["initial_states"] is not None:
        args["initial_states"] = args["initial_states"].astype(jnp.float32)
    return mamba_chunk_scan(**args, chunk_size=chunk, dt_softplus=True,
                            return_final_states=True, impl=impl)


@pytest.mark.parametrize("impl", ["scan", "xla"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s))
@pytest.mark.parametrize("options", ["all", "bare", "d_hp"])
def test_values_match_float64_recurrence(impl, shape, options):
    b, l, h, p, g, n, chunk = shape
    rng = np.random.default_rng(hash((impl, shape, options)) % 2**32)
    inputs = rec.random_inputs(rng, b, l, h, p, g, n, with_d="hp" if options == "d_hp" else (
        None if options == "bare" else "h"), with_z=options != "bare",
        with_bias=options != "bare", with_init=options != "bare")
    y_expected, final_expected, _ = rec.forward(**inputs)
    y, final = run_forward(inputs, chunk, impl)
    assert y.shape == (b, l, h, p) and final.shape == (b, h, p, n)
    assert rel_err(y, y_expected) < 1e-4
    assert rel_err(final, final_expected) < 1e-4


@pytest.mark.parametrize("impl", ["scan", "xla"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s))
def test_gradients_match_float64_adjoint(impl, shape):
    b, l, h, p, g, n, chunk = shape
    rng = np.random.default_rng(hash(("grad", impl, shape)) % 2**32)
    inputs = rec.random_inputs(rng, b, l, h, p, g, n)
    gy = rng.standard_normal((b, l, h, p))
    g_final = rng.standard_normal((b, h, p, n))
    _, _, cache = rec.forward(**inputs)
    expected = rec.backward(gy, g_final, cache, **inputs)

    def objective(args):
        y, final = mamba_chunk_scan(**args, chunk_size=chunk, dt_softplus=True,
                                    return_final_states=True, impl=impl)
        return jnp.sum(y * gy) + jnp.sum(final * g_final)

    grads = jax.jit(jax.grad(objective))(to_jnp(inputs))
    for name in GRAD_ARGS:
        assert rel_err(grads[name], expected[name]) < 1e-3, name


def test_final_state_chains_across_calls():
    """Running two halves with the state handed over equals one call (any split point)."""
    rng = np.random.default_rng(7)
    inputs = to_jnp(rec.random_inputs(rng, 2, 45, 4, 6, 2, 5, with_init=False))
    del inputs["initial_states"]
    full = mamba_chunk_scan(**inputs, chunk_size=16, dt_softplus=True, impl="xla")
    cut = 19
    first = {k: v[:, :cut] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    second = {k: v[:, cut:] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    y1, state = mamba_chunk_scan(**first, chunk_size=16, dt_softplus=True,
                                 return_final_states=True, impl="xla")
    y2 = mamba_chunk_scan(**second, chunk_size=16, dt_softplus=True, initial_states=state,
                          impl="xla")
    assert rel_err(jnp.concatenate([y1, y2], axis=1), full) < 1e-5


@pytest.mark.parametrize("impl", ["scan", "xla"])
def test_bfloat16_inputs_stay_close(impl):
    rng = np.random.default_rng(11)
    inputs = rec.random_inputs(rng, 2, 40, 4, 8, 2, 16)
    y_expected, final_expected, _ = rec.forward(**inputs)
    y, final = run_forward(inputs, 16, impl, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: ~4e-3 per rounding, several roundings per output.
    assert rel_err(y, y_expected) < 3e-2
    assert rel_err(final, final_expected) < 3e-2


def test_xla_is_jittable_with_static_chunk():
    rng = np.random.default_rng(3)
    inputs = to_jnp(rec.random_inputs(rng, 1, 21, 2, 4, 1, 3))
    f = jax.jit(lambda a: mamba_chunk_scan(**a, chunk_size=8, dt_softplus=True, impl="xla"))
    eager = mamba_chunk_scan(**inputs, chunk_size=8, dt_softplus=True, impl="xla")
    assert rel_err(f(inputs), eager) < 1e-6


def _valid_args():
    rng = np.random.default_rng(0)
    return to_jnp(rec.random_inputs(rng, 2, 10, 4, 3, 2, 5))


@pytest.mark.parametrize("change, message", [
    (dict(B=jnp.ones((2, 10, 3, 5)), C=jnp.ones((2, 10, 3, 5))), "multiple of ngroups"),
    (dict(B=jnp.ones((2, 9, 2, 5))), "seqlen"),
    (dict(dt=jnp.ones((1, 10, 4))), "dt must have shape"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=8.0), "chunk_size"),
    (dict(D=jnp.ones((3,))), "D must have shape"),
    (dict(z=jnp.ones((2, 10, 4, 4))), "z must have"),
    (dict(initial_states=jnp.ones((2, 4, 3, 4))), "initial_states"),
    (dict(impl="cuda"), "Unknown SSD impl"),
])
def test_bad_arguments_name_the_problem(change, message):
    args = {**_valid_args(), "chunk_size": 8, **change}
    with pytest.raises(ValueError, match=message):
        mamba_chunk_scan(**args)
