"""`impl="pallas"` against the float64 recurrence and the "xla" impl, values and gradients; the
kernels lowered for CUDA (Triton) on the CPU at the BSMamba2 shapes and at small odd ones.

On a CPU the kernels run in Pallas interpret mode (chosen from the default backend), so these tests
exercise the kernel code itself; on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ssd import mamba_chunk_scan
from kernels.ssd.pallas import SSDBlockSizes, kernel_dims, ssd_pallas
from kernels.ssd.xla import ssd_xla
from tests.kernels import ssd_recurrence as rec
from tests.kernels.test_ssd import GRAD_ARGS, rel_err, to_jnp

ON_GPU = jax.default_backend() == "gpu"
# Triton's float32 dots use 3xTF32 on a GPU: near float32, not bit-for-bit.
VALUE_TOL = 1e-4 if not ON_GPU else 2e-4
GRAD_TOL = 1e-3

# (b, l, h, p, g, n, chunk): l = 1, l < chunk, l not a multiple of chunk, chunk not a power of
# two, g = 1 and g > 1, p and n not powers of two (nor multiples of 16).
SHAPES = [
    (1, 1, 2, 3, 1, 5, 16),
    (2, 11, 4, 5, 2, 6, 16),
    (1, 45, 6, 12, 3, 10, 16),
    (2, 37, 3, 7, 1, 9, 24),
    (1, 70, 2, 20, 1, 17, 32),
]
shape_id = lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s)


def _inputs(seed, shape, options="all"):
    b, l, h, p, g, n, _ = shape
    rng = np.random.default_rng(seed)
    return rng, rec.random_inputs(
        rng, b, l, h, p, g, n, with_d={"all": "h", "d_hp": "hp", "bare": None}[options],
        with_z=options != "bare", with_bias=options != "bare", with_init=options != "bare")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _run(args, chunk, impl):
    return mamba_chunk_scan(**args, chunk_size=chunk, dt_softplus=True, return_final_states=True,
                            impl=impl)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_values_match_float64_recurrence_and_xla(shape):
    options = "d_hp" if shape[4] > 1 else "all"
    _, inputs = _inputs(hash(("pallas", shape, options)) % 2**32, shape, options)
    y_expected, final_expected, _ = rec.forward(**inputs)
    args = to_jnp(inputs)
    y, final = _run(args, shape[-1], "pallas")
    b, l, h, p, g, n, _ = shape
    assert y.shape == (b, l, h, p) and y.dtype == jnp.float32
    assert final.shape == (b, h, p, n) and final.dtype == jnp.float32
    assert rel_err(y, y_expected) < VALUE_TOL
    assert rel_err(final, final_expected) < VALUE_TOL
    y_xla, final_xla = _run(args, shape[-1], "xla")
    assert rel_err(y, y_xla) < VALUE_TOL and rel_err(final, final_xla) < VALUE_TOL


@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_gradients_match_float64_adjoint_and_xla(shape):
    b, l, h, p, g, n, chunk = shape
    rng, inputs = _inputs(hash(("pallas-grad", shape)) % 2**32, shape,
                          "d_hp" if g > 1 else "all")
    gy = rng.standard_normal((b, l, h, p))
    g_final = rng.standard_normal((b, h, p, n))
    _, _, cache = rec.forward(**inputs)
    expected = rec.backward(gy, g_final, cache, **inputs)

    def objective(args, impl):
        y, final = _run(args, chunk, impl)
        return jnp.sum(y * gy) + jnp.sum(final * g_final)

    args = to_jnp(inputs)
    grad_fn = jax.jit(jax.grad(objective), static_argnums=1)
    grads, grads_xla = grad_fn(args, "pallas"), grad_fn(args, "xla")
    for name in GRAD_ARGS:
        assert rel_err(grads[name], expected[name]) < GRAD_TOL, name
        assert rel_err(grads[name], grads_xla[name]) < GRAD_TOL, name


@pytest.fixture
def fused_passing(request, monkeypatch):
    """Forces the fused chunk-state/passing kernels (True) or the per-chunk ones (False)."""
    default = SSDBlockSizes.default

    def forced(*args):
        return dataclasses.replace(default(*args),
                                   fused_passing_min_programs=0 if request.param else 2**62)

    monkeypatch.setattr(SSDBlockSizes, "default", forced)
    return request.param


@pytest.mark.parametrize("seqlen", [13, 40], ids=["one_chunk", "three_chunks"])
@pytest.mark.parametrize("with_init", [False, True], ids=["no_init", "init"])
@pytest.mark.parametrize("use_final", [False, True], ids=["final_dropped", "final_used"])
@pytest.mark.parametrize("fused_passing", [False, True], ids=["scan", "fused"], indirect=True)
def test_zero_state_shortcuts(seqlen, with_init, use_final, fused_passing):
    """No initial state and/or an unused final state (its cotangent a symbolic zero): with one
    chunk the kernels then skip the zero states; values and gradients stay exact. Both ways of
    passing states between chunks."""
    if seqlen == 40 and with_init and use_final and not fused_passing:
        pytest.skip("the general path: covered by the gradient test above")
    if seqlen == 13 and fused_passing and not with_init:
        pytest.skip("one chunk without an initial state passes nothing")
    b, l, h, p, g, n, chunk = 2, seqlen, 2, 6, 1, 5, 16
    rng, inputs = _inputs(hash(("zero", seqlen, with_init, use_final)) % 2**32,
                          (b, l, h, p, g, n, chunk), "all")
    if not with_init:
        inputs["initial_states"] = None
    gy = rng.standard_normal((b, l, h, p))
    g_final = rng.standard_normal((b, h, p, n)) if use_final else None
    y_expected, final_expected, cache = rec.forward(**inputs)
    expected = rec.backward(gy, g_final, cache, **inputs)

    def objective(a):
        y, final = mamba_chunk_scan(**a, chunk_size=chunk, dt_softplus=True,
                                    return_final_states=True, impl="pallas")
        loss = jnp.sum(y * gy) + (jnp.sum(final * g_final) if use_final else 0.0)
        return loss, (y, final)

    args = to_jnp(inputs)
    (_, (y, final)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(args)
    assert rel_err(y, y_expected) < VALUE_TOL and rel_err(final, final_expected) < VALUE_TOL
    for name in GRAD_ARGS:
        if inputs[name] is not None:
            assert rel_err(grads[name], expected[name]) < GRAD_TOL, name


def test_several_tiles_per_chunk_and_head_dim():
    """Small tiles: several row/column blocks per chunk (the causal loops and their diagonal
    masks) and several head-dim blocks per chunk state, against the xla impl."""
    rng = np.random.default_rng(5)
    b, l, h, p, g, n = 1, 100, 4, 20, 2, 12
    inputs = rec.random_inputs(rng, b, l, h, p, g, n)
    args = {k: jnp.asarray(inputs[k], jnp.float32) for k in ("x", "A", "B", "C")}
    args["dt"] = jax.nn.softplus(jnp.asarray(inputs["dt"] + inputs["dt_bias"], jnp.float32))
    args["initial_states"] = jnp.asarray(inputs["initial_states"], jnp.float32)
    gy = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
    g_final = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    blocks = SSDBlockSizes(block_m=16, block_p=16)

    def objective(a, impl):
        fn = ssd_xla if impl == "xla" else lambda *t: ssd_pallas(*t, block_sizes=blocks)
        y, final = fn(a["x"], a["dt"], a["A"], a["B"], a["C"], 64, a["initial_states"])
        return jnp.sum(y * gy) + jnp.sum(final * g_final), (y, final)

    run = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (_, (y, final)), grads = run(args, "pallas")
    (_, (y_x, final_x)), grads_x = run(args, "xla")
    assert rel_err(y, y_x) < VALUE_TOL and rel_err(final, final_x) < VALUE_TOL
    for name in args:
        assert rel_err(grads[name], grads_x[name]) < GRAD_TOL, name


def test_bfloat16_inputs_stay_close():
    rng = np.random.default_rng(12)
    b, l, h, p, g, n = 2, 40, 4, 8, 2, 16
    inputs = rec.random_inputs(rng, b, l, h, p, g, n)
    gy = rng.standard_normal((b, l, h, p))
    g_final = rng.standard_normal((b, h, p, n))
    y_expected, final_expected, cache = rec.forward(**inputs)
    expected = rec.backward(gy, g_final, cache, **inputs)
    args = to_jnp(inputs, jnp.bfloat16)
    args["initial_states"] = args["initial_states"].astype(jnp.float32)

    def objective(a):
        y, final = _run(a, 16, "pallas")
        return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(final * g_final), (y, final)

    (_, (y, final)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(args)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: ~4e-3 per rounding, several roundings per value.
    assert rel_err(y, y_expected) < 3e-2
    assert rel_err(final, final_expected) < 3e-2
    for name in ("x", "dt", "A", "B", "C", "initial_states"):
        assert rel_err(grads[name], expected[name]) < 3e-2, name


@pytest.mark.parametrize("bad, message", [
    (SSDBlockSizes(block_m=24), "block_m"),
    (SSDBlockSizes(block_m=128), "block_m"),  # longer than the (16-step) chunk
    (SSDBlockSizes(block_m=16, block_p=8), "block_p"),
])
def test_bad_block_sizes_name_the_problem(bad, message):
    args = to_jnp(_inputs(0, (1, 16, 2, 16, 1, 16, 16), "bare")[1])
    with pytest.raises(ValueError, match=message):
        ssd_pallas(args["x"], args["dt"], args["A"], args["B"], args["C"], 16, block_sizes=bad)


@pytest.mark.parametrize("dims", [(801, 64, 128, 256), (62, 64, 128, 64), (1, 3, 5, 16),
                                  (37, 7, 9, 24), (5000, 200, 300, 1000)])
def test_default_block_sizes_fit_the_padded_dims(dims):
    chunk, P, N = kernel_dims(*dims)
    for v in (chunk, P, N):
        assert v >= 16 and v & (v - 1) == 0
    assert chunk >= min(dims[0], dims[3]) and P >= dims[1] and N >= dims[2]
    SSDBlockSizes.default(P, N, chunk).check(P, N, chunk)


# --- CUDA lowering on the CPU: a kernel that cannot compile for Triton fails here. ---------------

def _lower_for_cuda(b, l, h, p, g, n, chunk, dtype, with_init, use_final=True):
    spec = jax.ShapeDtypeStruct
    args = (spec((b, l, h, p), dtype), spec((b, l, h), jnp.float32), spec((h,), jnp.float32),
            spec((b, l, g, n), dtype), spec((b, l, g, n), dtype), spec((b, h, p, n), jnp.float32))

    def forward(x, dt, A, B, C, init):
        return ssd_pallas(x, dt, A, B, C, chunk, init if with_init else None, interpret=False)

    def loss(*a):
        y, final = forward(*a)
        return jnp.sum(y) + (jnp.sum(final) if use_final else 0.0)

    fwd = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    bwd = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    return fwd, bwd


def _triton_kernels(module_text: str) -> list[str]:
    """Names of the Triton custom calls in a lowered module, one per call."""
    names = sorted(re.findall(r'name = "(ssd_[a-z_]+)"', module_text))
    assert module_text.count("__gpu$xla.gpu.triton") == len(names)
    return names


@pytest.mark.parametrize("shape, dtype, with_init, use_final", [
    # BSMamba2 time axis (b = 5 x 62) and band axis (b = 5 x 801), as the model calls them
    ((310, 801, 16, 64, 1, 128, 256), jnp.bfloat16, False, False),
    ((4005, 62, 16, 64, 1, 128, 64), jnp.bfloat16, False, False),
    ((310, 801, 16, 64, 1, 128, 256), jnp.float32, True, True),
    ((4005, 62, 16, 64, 1, 128, 64), jnp.float32, True, True),
    ((2, 7, 4, 5, 2, 6, 16), jnp.float32, True, True),
    ((3, 50, 6, 12, 3, 10, 24), jnp.bfloat16, False, True),
    ((1, 20, 3, 8, 1, 8, 16), jnp.bfloat16, True, True),  # 3 heads per group (not a power of 2)
    ((1, 1, 1, 1, 1, 1, 8), jnp.float32, False, False),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_kernels_lower_for_cuda(shape, dtype, with_init, use_final):
    fwd, bwd = _lower_for_cuda(*shape, dtype, with_init, use_final)
    b, l, h, p, g, n, chunk_size = shape
    chunk, P, N = kernel_dims(l, p, n, chunk_size)
    blocks = SSDBlockSizes.default(P, N, chunk)
    fused = b * h * (P // blocks.block_p) >= blocks.fused_passing_min_programs
    several = l > chunk
    if several or with_init:
        states = "ssd_state_passing" if fused else "ssd_chunk_state"
    else:  # one chunk, nothing enters it: chunk states only for the final state
        states = "ssd_chunk_state"
    assert _triton_kernels(fwd) == sorted(["ssd_chunk_scan", states])
    backward = ["ssd_chunk_scan_bwd_rows", "ssd_chunk_scan_bwd_cols"]
    if several:  # recompute the states, pass the gradients back
        backward += [states, "ssd_state_passing_bwd" if fused else "ssd_output_state_grad"]
    elif with_init:  # one chunk: only the initial state's gradient needs the output-state pass
        backward += ["ssd_output_state_grad"]
    expected = sorted(["ssd_chunk_scan", states, *backward])
    names = _triton_kernels(bwd)
    # With one chunk and the final state unused, its chunk-state kernel is dead code.
    dropped = sorted(["ssd_chunk_scan", *backward])
    assert names == expected or (not use_final and not several and names == dropped)
