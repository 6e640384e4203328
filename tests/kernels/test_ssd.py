"""`mamba_chunk_scan` ("scan", "xla") against the float64 NumPy recurrence: values and gradients.

Seeds come from the test's parameters (zlib.crc32 of their repr) and are printed on failure.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssd import mamba_chunk_scan
from kernels.ssd.xla import sequences_per_step, ssd_xla
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


def seed_of(*params) -> int:
    """A seed that is stable across processes (hash() of a str is salted per process)."""
    return zlib.crc32(repr(params).encode())


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
    # Jitted: one compilation instead of one per op (eager SSD calls take minutes on 2 cores).
    return jax.jit(lambda a: mamba_chunk_scan(**a, chunk_size=chunk, dt_softplus=True,
                                              return_final_states=True, impl=impl))(args)


@pytest.mark.parametrize("impl", ["scan", "xla"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s))
@pytest.mark.parametrize("options", ["all", "bare", "d_hp"])
def test_values_match_float64_recurrence(impl, shape, options):
    b, l, h, p, g, n, chunk = shape
    seed = seed_of(impl, shape, options)
    rng = np.random.default_rng(seed)
    inputs = rec.random_inputs(rng, b, l, h, p, g, n, with_d="hp" if options == "d_hp" else (
        None if options == "bare" else "h"), with_z=options != "bare",
        with_bias=options != "bare", with_init=options != "bare")
    y_expected, final_expected, _ = rec.forward(**inputs)
    y, final = run_forward(inputs, chunk, impl)
    assert y.shape == (b, l, h, p) and final.shape == (b, h, p, n)
    assert rel_err(y, y_expected) < 1e-4, f"{seed=}"
    assert rel_err(final, final_expected) < 1e-4, f"{seed=}"


@pytest.mark.parametrize("impl", ["scan", "xla"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s))
def test_gradients_match_float64_adjoint(impl, shape):
    b, l, h, p, g, n, chunk = shape
    seed = seed_of("grad", impl, shape)
    rng = np.random.default_rng(seed)
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
        assert rel_err(grads[name], expected[name]) < 1e-3, f"{name} {seed=}"


# The "xla" impl's own code paths, called directly on prepared dt (no softplus):
# (b, l, h, p, g, n, chunk, row_block, sequences per step, initial state, what the loss uses).
# Row blocks that do and do not divide the chunk and the tail; groups of sequences that do not
# divide b (the last group overlaps the one before); 1, 2 and > 2 chunks (the chunk loop); a
# zero or given initial state; an unused final state (a symbolic-zero cotangent) or unused y.
XLA_PATHS = [
    (3, 50, 4, 6, 2, 5, 16, 4, 2, True, "both"),
    (2, 37, 3, 7, 1, 9, 16, 5, 1, False, "y"),
    (5, 70, 2, 5, 1, 4, 8, 3, 2, True, "y"),
    (3, 1, 2, 3, 1, 5, 16, 64, 1, True, "both"),
    (2, 13, 4, 3, 2, 6, 16, 3, 3, True, "final"),
    (4, 24, 6, 4, 3, 7, 12, 12, 3, False, "both"),
]


@pytest.mark.parametrize("case", XLA_PATHS,
                         ids=lambda c: "b{}l{}h{}p{}g{}n{}q{}r{}k{}-init{}-{}".format(*c))
def test_xla_paths_match_float64_recurrence(case):
    b, l, h, p, g, n, chunk, row_block, seqs, with_init, uses = case
    seed = seed_of("xla-paths", case)
    rng = np.random.default_rng(seed)
    inputs = rec.random_inputs(rng, b, l, h, p, g, n, with_d=None, with_z=False,
                               with_bias=False, with_init=with_init)
    inputs["dt"] = rng.uniform(0.01, 1.0, (b, l, h))  # already "softplus'd": positive
    del inputs["D"], inputs["z"], inputs["dt_bias"]
    y_expected, final_expected, cache = rec.forward(**inputs, dt_softplus=False)
    gy = rng.standard_normal((b, l, h, p)) * (uses != "final")
    g_final = rng.standard_normal((b, h, p, n)) * (uses != "y")
    expected = rec.backward(gy, g_final, cache, **inputs, dt_softplus=False)

    def ssd(args):
        return ssd_xla(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk,
                       args.get("initial_states"), row_block=row_block,
                       sequences_per_step_override=seqs)

    def objective(args):
        y, final = ssd(args)
        # Leave the unused output out of the loss, so that its cotangent is a symbolic zero.
        return ((jnp.sum(y * gy) if uses != "final" else 0.0)
                + (jnp.sum(final * g_final) if uses != "y" else 0.0))

    args = {k: v for k, v in to_jnp(inputs).items() if v is not None}
    y, final = jax.jit(ssd)(args)
    assert rel_err(y, y_expected) < 1e-4, f"{seed=}"
    assert rel_err(final, final_expected) < 1e-4, f"{seed=}"
    grads = jax.jit(jax.grad(objective))(args)
    for name in args:
        assert rel_err(grads[name], expected[name]) < 1e-3, f"{name} {seed=}"


def _platform_case():
    """A shape where the CPU takes one sequence per step and an accelerator all three."""
    b, l, h, p, g, n, chunk = 3, 70, 16, 64, 1, 16, 64
    seqs = {pl: sequences_per_step(pl, chunk, h, p, g) for pl in ("cpu", "cuda")}
    assert seqs["cpu"] == 1 and seqs["cuda"] >= b, seqs
    inputs = rec.random_inputs(np.random.default_rng(seed_of("platform")), b, l, h, p, g, n)
    inputs["dt"] = np.log1p(np.exp(inputs["dt"]))
    return to_jnp(inputs), chunk, seqs


def test_xla_steps_follow_the_lowering_platform():
    """The sequences per step are chosen for the platform lowered for, not the tracing host."""
    args, chunk, seqs = _platform_case()

    def loss(x, dt, A, B, C, init):
        y, final = ssd_xla(x, dt, A, B, C, chunk, init)
        return jnp.sum(y ** 2) + jnp.sum(final)

    ssd_args = tuple(args[k] for k in ("x", "dt", "A", "B", "C", "initial_states"))
    traced = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)))).trace(*ssd_args)
    b = args["x"].shape[0]
    x_chunk = lambda k: f"tensor<{min(k, b)}x{chunk}x1x16x64xf32>"  # a step's slice of x
    for platform, other in (("cpu", "cuda"), ("cuda", "cpu")):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert x_chunk(seqs[platform]) in text, platform
        assert x_chunk(seqs[other]) not in text, platform
    assert re.search(r"stablehlo\.while", traced.lower(lowering_platforms=("cpu",)).as_text())


def test_xla_accelerator_steps_agree_on_the_cpu():
    """The accelerator's grouping (all sequences in one step), run on the CPU, gives the same."""
    args, chunk, seqs = _platform_case()

    def value_and_grads(override):
        def loss(a):
            y, final = ssd_xla(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk,
                               a["initial_states"], sequences_per_step_override=override)
            return jnp.sum(y * jnp.cos(a["x"])) + jnp.sum(final ** 2)

        return jax.jit(jax.value_and_grad(loss))(args)

    cpu = value_and_grads(None)
    accelerator = value_and_grads(seqs["cuda"])
    assert rel_err(accelerator[0], cpu[0]) < 1e-5
    for name in args:
        if args[name] is not None:
            assert rel_err(accelerator[1][name], cpu[1][name]) < 1e-5, name


def test_final_state_chains_across_calls():
    """Running two halves with the state handed over equals one call (any split point)."""
    rng = np.random.default_rng(seed_of("chain"))
    inputs = to_jnp(rec.random_inputs(rng, 2, 45, 4, 6, 2, 5, with_init=False))
    del inputs["initial_states"]
    call = jax.jit(lambda a, init: mamba_chunk_scan(**a, chunk_size=16, dt_softplus=True,
                                                    initial_states=init,
                                                    return_final_states=True, impl="xla"))
    full, _ = call(inputs, None)
    cut = 19
    first = {k: v[:, :cut] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    second = {k: v[:, cut:] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    y1, state = call(first, None)
    y2, _ = call(second, state)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), full) < 1e-5


@pytest.mark.parametrize("impl", ["scan", "xla"])
def test_bfloat16_inputs_stay_close(impl):
    seed = seed_of("bf16", impl)
    rng = np.random.default_rng(seed)
    inputs = rec.random_inputs(rng, 2, 40, 4, 8, 2, 16)
    y_expected, final_expected, _ = rec.forward(**inputs)
    y, final = run_forward(inputs, 16, impl, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: ~4e-3 per rounding, several roundings per output.
    assert rel_err(y, y_expected) < 3e-2, f"{seed=}"
    assert rel_err(final, final_expected) < 3e-2, f"{seed=}"


def test_xla_bfloat16_gradients_stay_close():
    """bf16 inputs through the row blocks and the chunk loop: gradients in the input dtypes."""
    seed = seed_of("bf16-grad")
    rng = np.random.default_rng(seed)
    b, l, h, p, g, n = 2, 40, 4, 8, 2, 16
    inputs = rec.random_inputs(rng, b, l, h, p, g, n, with_z=False)
    gy = rng.standard_normal((b, l, h, p))
    _, _, cache = rec.forward(**inputs)
    expected = rec.backward(gy, None, cache, **inputs)
    args = to_jnp(inputs, jnp.bfloat16)
    args.update({k: args[k].astype(jnp.float32) for k in ("dt", "A", "initial_states")})

    def objective(a):
        y = mamba_chunk_scan(**a, chunk_size=16, dt_softplus=True, impl="xla")
        return jnp.sum(y.astype(jnp.float32) * gy)

    grads = jax.jit(jax.grad(objective))(args)
    for name in ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states"):
        assert grads[name].dtype == args[name].dtype, name
        assert rel_err(grads[name], expected[name]) < 5e-2, f"{name} {seed=}"


def test_xla_is_jittable_with_static_chunk():
    rng = np.random.default_rng(seed_of("jit"))
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


def test_pallas_names_resolve_to_their_backends():
    """"pallas_triton" / "pallas_mosaic" pick their backend; "pallas" the default one (Triton
    while JAX ships it); an unknown backend is named."""
    from kernels.ssd import default_pallas_backend, get_impl
    from kernels.ssd.pallas import ssd_pallas

    assert get_impl("pallas_triton").keywords == {"backend": "triton"}
    assert get_impl("pallas_mosaic").keywords == {"backend": "mosaic"}
    assert get_impl("pallas").keywords == {"backend": default_pallas_backend()}
    assert default_pallas_backend() == "triton"  # both supported JAX versions ship Triton
    args = _valid_args()
    with pytest.raises(ValueError, match="Unknown Pallas backend"):
        ssd_pallas(args["x"], args["dt"], args["A"], args["B"], args["C"], 8, backend="cuda")
