"""Each Pallas kernel step, both backends, against its plain-jnp reference (kernels.ssd.reference).

The steps take the padded, chunked operands `kernels.ssd.pallas` lays out; the shapes here are
whole tiles of both backends (64), two chunks, and groups of two heads (g = 2, h = 4) or one. The
references round the same operands to the matmul dtype, so the kernels match them to float32
accumulation-order rounding. Triton runs in the Pallas interpreter, Mosaic GPU in JAX's GPU
interpreter with its race, out-of-bounds and uninitialised-memory checks on; on a GPU the
kernels are compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssd import reference as R
from kernels.ssd.pallas import get_backend
from tests.kernels.test_ssd import rel_err, seed_of
from tests.kernels.test_ssd_mosaic import races_found

ON_GPU = jax.default_backend() == "gpu"
f32, bf16 = jnp.float32, jnp.bfloat16
TOL = 1e-4
BACKENDS = ["triton", "mosaic"]


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    gpu_callbacks.reset_gpu_interpret_mode_state()
    yield


def _operands(seed, g=1, h=2, b=1, L=128, P=64, N=64, Q=64):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), bf16)
    dt = jnp.asarray(rng.uniform(0.01, 0.6, (b, h, L)), f32)
    A = -jnp.asarray(rng.uniform(0.5, 4.0, (h,)), f32)
    cs = jnp.cumsum((dt * A[None, :, None]).reshape(b, h, L // Q, Q), axis=-1).reshape(b, h, L)
    return dict(x=normal(b, L, h, P), B=normal(b, L, g, N), C=normal(b, L, g, N),
                dy=normal(b, L, h, P), dt=dt, cs=cs,
                states=jnp.asarray(rng.standard_normal((b, L // Q, h, P, N)), f32),
                init=jnp.asarray(rng.standard_normal((b, h, P, N)), f32), Q=Q)


def _kw(backend):
    kernels = get_backend(backend)
    o = _operands(0)
    P, N, Q = o["x"].shape[3], o["B"].shape[3], o["Q"]
    return dict(chunk=Q, blocks=kernels.block_sizes.default(P, N, Q, 2), interpret=not ON_GPU)


def _compare(name, outs, refs, seed):
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    assert len(outs) == len(refs)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out.shape == ref.shape, (name, i)
        err = rel_err(out, ref)
        assert err < TOL, f"{name} output {i}: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
@pytest.mark.parametrize("to_end", [True, False], ids=["forward", "output_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_state(backend, to_end, groups):
    seed = seed_of("step-state", backend, to_end, groups)
    o = _operands(seed, g=groups, h=2 * groups)
    u, v = (o["x"], o["B"]) if to_end else (o["dy"], o["C"])
    out = jax.jit(lambda *a: get_backend(backend).chunk_state(*a, to_end=to_end, **_kw(backend))
                  )(u, v, o["dt"], o["cs"])
    _compare("chunk_state", out, R.chunk_state_reference(u, v, o["dt"], o["cs"], chunk=o["Q"],
                                                         to_end=to_end), seed)
    assert backend == "triton" or not races_found()


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no_state"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_scan(backend, with_state):
    seed = seed_of("step-scan", backend, with_state)
    o = _operands(seed, g=2, h=4)
    states = o["states"] if with_state else None
    args = (o["x"], o["B"], o["C"], o["dt"], o["cs"], states)
    out = jax.jit(lambda *a: get_backend(backend).chunk_scan(*a, **_kw(backend)))(*args)
    _compare("chunk_scan", out, R.chunk_scan_reference(*args, chunk=o["Q"]), seed)
    assert backend == "triton" or not races_found()


@pytest.mark.parametrize("with_init", [True, False], ids=["init", "zero_init"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_passing_fwd(backend, with_init):
    seed = seed_of("step-passing", backend, with_init)
    o = _operands(seed, L=192)
    init = o["init"] if with_init else None
    args = (o["x"], o["B"], o["dt"], o["cs"], init)
    out = jax.jit(lambda *a: get_backend(backend).state_passing_fwd(*a, **_kw(backend)))(*args)
    _compare("state_passing_fwd", out, R.state_passing_fwd_reference(*args, chunk=o["Q"]), seed)
    assert backend == "triton" or not races_found()


@pytest.mark.parametrize("with_final", [True, False], ids=["final", "no_final"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_passing_bwd(backend, with_final):
    seed = seed_of("step-passing-bwd", backend, with_final)
    o = _operands(seed, L=192)
    states = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 3, 2, 64, 64)), f32)
    args = (o["dy"], o["C"], o["cs"], states, o["init"] if with_final else None)
    out = jax.jit(lambda *a: get_backend(backend).state_passing_bwd(*a, **_kw(backend)))(*args)
    _compare("state_passing_bwd", out, R.state_passing_bwd_reference(*args, chunk=o["Q"]), seed)
    assert backend == "triton" or not races_found()


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no_state"])
@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_scan_bwd(backend, side, with_state):
    seed = seed_of("step-bwd", backend, side, with_state)
    o = _operands(seed, g=2, h=4)
    states = o["states"] if with_state else None
    args = (o["x"], o["B"], o["C"], o["dt"], o["cs"], states, o["dy"])
    kernels = get_backend(backend)
    kernel = kernels.chunk_scan_bwd_rows if side == "rows" else kernels.chunk_scan_bwd_cols
    reference = (R.chunk_scan_bwd_rows_reference if side == "rows"
                 else R.chunk_scan_bwd_cols_reference)
    out = jax.jit(lambda *a: kernel(*a, **_kw(backend)))(*args)
    _compare(f"chunk_scan_bwd_{side}", out, reference(*args, chunk=o["Q"]), seed)
    assert backend == "triton" or not races_found()


def test_listing1_matches_the_float64_recurrence():
    """The whole-SSD oracle itself (Listing 1, in float64) against the NumPy recurrence."""
    from tests.kernels import ssd_recurrence as rec

    rng = np.random.default_rng(seed_of("listing1"))
    inputs = rec.random_inputs(rng, 2, 37, 4, 5, 2, 6, with_d=None, with_z=False,
                               with_bias=False)
    inputs["dt"] = rng.uniform(0.01, 1.0, (2, 37, 4))
    y_e, final_e, _ = rec.forward(**{k: v for k, v in inputs.items() if k not in ("D", "z",
                                                                              "dt_bias")},
                                  dt_softplus=False)
    with jax.enable_x64(True):
        a = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items() if v is not None}
        y, final = R.ssd_minimal(a["x"], a["dt"], a["A"], a["B"], a["C"], 16,
                                 a["initial_states"])
        assert y.dtype == jnp.float64
        assert rel_err(y, y_e) < 1e-12 and rel_err(final, final_e) < 1e-12
