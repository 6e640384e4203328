"""`impl="pallas_triton"` against the float64 recurrence and the "xla" impl, values and gradients;
kernels lowered for CUDA (Triton) from this host at the BSMamba2 shapes and at small odd ones.

The kernels run where they are lowered: compiled Triton kernels on a GPU, the Pallas interpreter
on a CPU (`kernels.ssd.pallas_platform`), so on a CPU these tests exercise the kernel code
itself and on a GPU the compiled kernels. The full BSMamba2 shapes run on a GPU only (minutes in
the interpreter); on a CPU their CUDA lowering is checked instead. On a GPU run with
JAX_DEFAULT_MATMUL_PRECISION=highest (as scripts/gpu_check.sh does), so that the float32 "xla"
reference is not computed in TF32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels.ssd import mamba_chunk_scan
from kernels.ssd.pallas import ssd_pallas
from kernels.ssd.triton.common import SSDBlockSizes, kernel_dims
from kernels.ssd.xla import ssd_xla
from tests.kernels import ssd_recurrence as rec
from tests.kernels.test_ssd import GRAD_ARGS, rel_err, to_jnp

ON_GPU = jax.default_backend() == "gpu"
f32, bf16 = jnp.float32, jnp.bfloat16
# Relative tolerances (max |error| / max |reference|). Triton's float32 dots use 3xTF32 on a
# GPU: near float32, not bit for bit. bf16 operands: an 8-bit mantissa, ~4e-3 per rounding and
# several roundings per value (inputs, the kernels' bf16 matmul operands).
VALUE_TOL = {f32: 2e-4 if ON_GPU else 1e-4, bf16: 3e-2}
GRAD_TOL = {f32: 1e-3, bf16: 3e-2}
TRITON_CALL = "__gpu$xla.gpu.triton"

# (b, l, h, p, g, n, chunk): l = 1, l < chunk, l not a multiple of chunk, chunk not a power of
# two, g = 1 and g > 1, p and n not powers of two (nor multiples of 16).
SHAPES = [
    (1, 1, 2, 3, 1, 5, 16),
    (2, 11, 4, 5, 2, 6, 16),
    (1, 45, 6, 12, 3, 10, 16),
    (2, 37, 3, 7, 1, 9, 24),
    (1, 70, 2, 20, 1, 17, 32),
]
# The model's two SSD calls per 8 s segment (h=16, p=64, n=128): along time (b = batch x 62
# bands, l = 801 frames, chunk 256) and along bands (b = batch x 801 frames, l = 62, chunk 64).
TIME_AXIS = (62, 801, 16, 64, 1, 128, 256)
BAND_AXIS = (801, 62, 16, 64, 1, 128, 64)
shape_id = lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s)


def seed_of(*key) -> int:
    """A stable seed from a test's parameters (hash() is salted per process)."""
    return zlib.crc32(repr(key).encode())


def check(name: str, actual, expected, tol: float, seed: int) -> None:
    err = rel_err(actual, expected)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} (seed {seed})"


def _inputs(seed, shape, options="all"):
    b, l, h, p, g, n, _ = shape
    rng = np.random.default_rng(seed)
    return rng, rec.random_inputs(
        rng, b, l, h, p, g, n, with_d={"all": "h", "d_hp": "hp", "bare": None}[options],
        with_z=options != "bare", with_bias=options != "bare", with_init=options != "bare")


def _rounded(inputs: dict, dtype) -> dict:
    """The inputs as the kernels see them in `dtype` (initial states stay float32), in float64:
    the float64 reference then measures the kernels' own rounding, not the inputs'."""
    out = {}
    for k, v in inputs.items():
        d = f32 if k == "initial_states" else dtype
        out[k] = None if v is None else np.asarray(jnp.asarray(v, d), np.float64)
    return out


def _args(inputs: dict, dtype) -> dict:
    args = to_jnp(inputs, dtype)
    if args["initial_states"] is not None:
        args["initial_states"] = args["initial_states"].astype(f32)
    return args


@functools.partial(jax.jit, static_argnums=(1, 2))
def _run(args, chunk, impl):
    return mamba_chunk_scan(**args, chunk_size=chunk, dt_softplus=True, return_final_states=True,
                            impl=impl)


def _value_and_grads(args, gy, g_final, chunk, impl):
    """(y, final) and the gradients of <gy, y> + <g_final, final> in every argument, jitted
    afresh on each call: the kernels' block sizes are read when tracing (a test may patch them)."""
    def objective(a, gy, g_final):
        y, final = mamba_chunk_scan(**a, chunk_size=chunk, dt_softplus=True,
                                    return_final_states=True, impl=impl)
        return jnp.sum(y.astype(f32) * gy) + jnp.sum(final * g_final), (y, final)

    run = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (_, outs), grads = run(args, jnp.asarray(gy, f32), jnp.asarray(g_final, f32))
    return outs, grads


def _problem(shape, seed, options):
    """Float64 inputs and the output cotangents (gy, g_final), a pure function of the seed."""
    b, l, h, p, g, n, _ = shape
    rng, inputs = _inputs(seed, shape, options)
    return inputs, rng.standard_normal((b, l, h, p)), rng.standard_normal((b, h, p, n))


PER_SEQUENCE = ("x", "dt", "B", "C", "z", "initial_states")


@functools.lru_cache(maxsize=4)
def _float64_expected(shape, dtype_name: str, seed: int, options: str, keep: tuple | None):
    """y, final and every gradient from the float64 recurrence of the inputs rounded to the
    dtype, on the sequences `keep` (all when None; then no batch-summed gradient). Cached: the
    two ways of passing states are tested on the same problem."""
    inputs, gy, g_final = _problem(shape, seed, options)
    exact = _rounded(inputs, jnp.dtype(dtype_name))
    if keep is not None:
        exact = {k: v[list(keep)] if v is not None and k in PER_SEQUENCE else v
                 for k, v in exact.items()}
        gy, g_final = gy[list(keep)], g_final[list(keep)]
    y, final, cache = rec.forward(**exact)
    grads = rec.backward(gy, g_final, cache, **exact)
    if keep is not None:
        grads = {k: v for k, v in grads.items() if k in PER_SEQUENCE}
    return y, final, grads


def _check_all(shape, dtype, seed, options, *, float64_sequences=None):
    """Values and all gradients of "pallas_triton" against the float64 recurrence and "xla".

    float64_sequences: compare against float64 only on these sequences (the recurrence keeps
    every state: too large for the model's batch); "xla" is compared on all of them."""
    b, l, h, p, g, n, chunk = shape
    inputs, gy, g_final = _problem(shape, seed, options)
    args = _args(inputs, dtype)
    (y, final), grads = _value_and_grads(args, gy, g_final, chunk, "pallas_triton")
    (y_x, final_x), grads_x = _value_and_grads(args, gy, g_final, chunk, "xla")
    assert y.shape == (b, l, h, p) and y.dtype == dtype
    assert final.shape == (b, h, p, n) and final.dtype == f32
    vtol, gtol = VALUE_TOL[dtype], GRAD_TOL[dtype]
    check("y vs xla", y, y_x, vtol, seed)
    check("final vs xla", final, final_x, vtol, seed)
    for name in GRAD_ARGS:
        if inputs[name] is not None:
            check(f"d{name} vs xla", grads[name], grads_x[name], gtol, seed)

    keep = None if float64_sequences is None else tuple(float64_sequences)
    pick = np.asarray if keep is None else (lambda t: np.asarray(t)[list(keep)])
    y_expected, final_expected, expected = _float64_expected(
        shape, jnp.dtype(dtype).name, seed, options, keep)
    check("y vs float64", pick(y), y_expected, vtol, seed)
    check("final vs float64", pick(final), final_expected, vtol, seed)
    for name, grad in expected.items():
        check(f"d{name} vs float64", pick(grads[name]), grad, gtol, seed)


@pytest.fixture
def fused_passing(request, monkeypatch):
    """Forces the fused chunk-state/passing kernels (True) or the per-chunk ones (False)."""
    default = SSDBlockSizes.default

    def forced(*args):
        return dataclasses.replace(default(*args),
                                   fused_passing_min_programs=0 if request.param else 2**62)

    monkeypatch.setattr(SSDBlockSizes, "default", forced)
    return request.param


# --- the BSMamba2 shapes, compiled on a GPU (first: the most valuable) ---------------------------

gpu_only = pytest.mark.skipif(not ON_GPU, reason="BSMamba2 shapes take minutes in the "
                              "interpreter; their CUDA lowering is tested below")


@gpu_only
@pytest.mark.parametrize("fused_passing", [True, False], ids=["fused", "scan"], indirect=True)
@pytest.mark.parametrize("dtype", [bf16, f32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [TIME_AXIS, BAND_AXIS], ids=["time_axis", "band_axis"])
def test_bsmamba2_shapes_two_sequences(shape, dtype, fused_passing):
    """Two sequences of each model shape, both ways of passing states: everything against the
    float64 recurrence (on the host) and "xla"."""
    _check_all((2, *shape[1:]), dtype, seed_of("bsmamba2-2", shape, jnp.dtype(dtype).name), "all")


@gpu_only
@pytest.mark.parametrize("dtype", [bf16, f32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [TIME_AXIS, BAND_AXIS], ids=["time_axis", "band_axis"])
def test_bsmamba2_shapes_model_batch(shape, dtype):
    """One segment's worth of sequences (the model's batch 1) with the default tiles: against
    "xla" everywhere, against float64 on the first and last sequence."""
    _check_all(shape, dtype, seed_of("bsmamba2", shape, jnp.dtype(dtype).name), "all",
               float64_sequences=[0, shape[0] - 1])


# --- odd shapes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_values_match_float64_recurrence_and_xla(shape):
    options = "d_hp" if shape[4] > 1 else "all"
    seed = seed_of("pallas", shape, options)
    _, inputs = _inputs(seed, shape, options)
    y_expected, final_expected, _ = rec.forward(**inputs)
    args = to_jnp(inputs)
    y, final = _run(args, shape[-1], "pallas_triton")
    b, l, h, p, g, n, _ = shape
    assert y.shape == (b, l, h, p) and y.dtype == f32
    assert final.shape == (b, h, p, n) and final.dtype == f32
    check("y", y, y_expected, VALUE_TOL[f32], seed)
    check("final", final, final_expected, VALUE_TOL[f32], seed)
    y_xla, final_xla = _run(args, shape[-1], "xla")
    check("y vs xla", y, y_xla, VALUE_TOL[f32], seed)
    check("final vs xla", final, final_xla, VALUE_TOL[f32], seed)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_gradients_match_float64_adjoint_and_xla(shape):
    _check_all(shape, f32, seed_of("pallas-grad", shape), "d_hp" if shape[4] > 1 else "all")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=shape_id)
def test_bfloat16_values_and_gradients_stay_close(shape):
    """bf16 x, B, C, z (float32 states): against the float64 recurrence of the same rounded
    inputs and against "xla" in bf16."""
    _check_all(shape, bf16, seed_of("pallas-bf16", shape), "all")


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
    seed = seed_of("zero", seqlen, with_init, use_final)
    rng, inputs = _inputs(seed, (b, l, h, p, g, n, chunk), "all")
    if not with_init:
        inputs["initial_states"] = None
    gy = rng.standard_normal((b, l, h, p))
    g_final = rng.standard_normal((b, h, p, n)) if use_final else None
    y_expected, final_expected, cache = rec.forward(**inputs)
    expected = rec.backward(gy, g_final, cache, **inputs)

    def objective(a):
        y, final = mamba_chunk_scan(**a, chunk_size=chunk, dt_softplus=True,
                                    return_final_states=True, impl="pallas_triton")
        loss = jnp.sum(y * gy) + (jnp.sum(final * g_final) if use_final else 0.0)
        return loss, (y, final)

    args = to_jnp(inputs)
    (_, (y, final)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(args)
    check("y", y, y_expected, VALUE_TOL[f32], seed)
    check("final", final, final_expected, VALUE_TOL[f32], seed)
    for name in GRAD_ARGS:
        if inputs[name] is not None:
            check(f"d{name}", grads[name], expected[name], GRAD_TOL[f32], seed)


def test_several_tiles_per_chunk_and_head_dim():
    """Small tiles: several row/column blocks per chunk (the causal loops and their diagonal
    masks) and several head-dim blocks per chunk state, against the xla impl."""
    seed = seed_of("tiles")
    rng = np.random.default_rng(seed)
    b, l, h, p, g, n = 1, 100, 4, 20, 2, 12
    inputs = rec.random_inputs(rng, b, l, h, p, g, n)
    args = {k: jnp.asarray(inputs[k], f32) for k in ("x", "A", "B", "C")}
    args["dt"] = jax.nn.softplus(jnp.asarray(inputs["dt"] + inputs["dt_bias"], f32))
    args["initial_states"] = jnp.asarray(inputs["initial_states"], f32)
    gy = jnp.asarray(rng.standard_normal((b, l, h, p)), f32)
    g_final = jnp.asarray(rng.standard_normal((b, h, p, n)), f32)
    blocks = SSDBlockSizes(block_m=16, block_p=16)

    def objective(a, impl):
        fn = ssd_xla if impl == "xla" else lambda *t: ssd_pallas(*t, block_sizes=blocks)
        y, final = fn(a["x"], a["dt"], a["A"], a["B"], a["C"], 64, a["initial_states"])
        return jnp.sum(y * gy) + jnp.sum(final * g_final), (y, final)

    run = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (_, (y, final)), grads = run(args, "pallas_triton")
    (_, (y_x, final_x)), grads_x = run(args, "xla")
    check("y", y, y_x, VALUE_TOL[f32], seed)
    check("final", final, final_x, VALUE_TOL[f32], seed)
    for name in args:
        check(f"d{name}", grads[name], grads_x[name], GRAD_TOL[f32], seed)


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


# --- lowering per platform: Triton for CUDA, the interpreter elsewhere, from this host -----------

def for_an_h100():
    """Lowering for CUDA on a host without a GPU: JAX 0.11's Triton lowering asks for a device
    (its compute capability); an abstract H100 stands in (on a GPU host: the real one)."""
    if ON_GPU:
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                         num_cores=132)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (),
                                                                    abstract_device=device))


def _lower(platform, b, l, h, p, g, n, chunk, dtype, with_init, use_final=True, blocks=None):
    spec = jax.ShapeDtypeStruct
    args = (spec((b, l, h, p), dtype), spec((b, l, h), f32), spec((h,), f32),
            spec((b, l, g, n), dtype), spec((b, l, g, n), dtype), spec((b, h, p, n), f32))

    def forward(x, dt, A, B, C, init):  # the default: decided per lowering platform
        return ssd_pallas(x, dt, A, B, C, chunk, init if with_init else None, block_sizes=blocks)

    def loss(*a):
        y, final = forward(*a)
        return jnp.sum(y) + (jnp.sum(final) if use_final else 0.0)

    lower = lambda f: jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    with for_an_h100() if platform == "cuda" else contextlib.nullcontext():
        return lower(forward), lower(jax.grad(loss, argnums=tuple(range(6))))


def _triton_kernels(module_text: str) -> list[str]:
    """Names of the Triton custom calls in a lowered module, one per call."""
    names = sorted(re.findall(r'name = "(ssd_[a-z_]+)"', module_text))
    assert module_text.count(TRITON_CALL) == len(names)
    return names


@pytest.mark.parametrize("shape, dtype, with_init, use_final, fused", [
    # BSMamba2 time axis (b = 5 x 62) and band axis (b = 5 x 801), as the model calls them
    ((310, 801, 16, 64, 1, 128, 256), bf16, False, False, None),
    ((4005, 62, 16, 64, 1, 128, 64), bf16, False, False, None),
    ((310, 801, 16, 64, 1, 128, 256), f32, True, True, None),
    ((4005, 62, 16, 64, 1, 128, 64), f32, True, True, None),
    ((2, 801, 16, 64, 1, 128, 256), bf16, False, True, None),  # batch 1/31: per-chunk states
    ((2, 7, 4, 5, 2, 6, 16), f32, True, True, None),
    ((3, 50, 6, 12, 3, 10, 24), bf16, False, True, None),
    ((1, 20, 3, 8, 1, 8, 16), bf16, True, True, None),  # 3 heads per group (not a power of 2)
    ((2, 90, 6, 12, 2, 10, 32), bf16, True, True, True),  # 3 chunks (L = 96) in fused passing
    ((2, 90, 6, 12, 2, 10, 32), f32, False, True, False),
    ((1, 1, 1, 1, 1, 1, 8), f32, False, False, None),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else getattr(v, "__name__", str(v)))
def test_kernels_lower_for_cuda(shape, dtype, with_init, use_final, fused):
    """Every kernel builds Triton IR (power-of-two blocks, dots of >= 16): a kernel that cannot
    compile for Triton fails here, on a CPU."""
    b, l, h, p, g, n, chunk_size = shape
    chunk, P, N = kernel_dims(l, p, n, chunk_size)
    blocks = SSDBlockSizes.default(P, N, chunk, jnp.dtype(dtype).itemsize)
    if fused is not None:
        blocks = dataclasses.replace(blocks, fused_passing_min_programs=0 if fused else 2**62)
    fwd, bwd = _lower("cuda", *shape, dtype, with_init, use_final, blocks)
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
    # The gradient needs no forward output (the residuals are the inputs): only the backward
    # kernels remain.
    assert _triton_kernels(bwd) == sorted(backward)


def test_cpu_lowering_interprets_the_kernels():
    """The same default call lowered for the CPU holds no Triton call (the interpreter's loops)."""
    fwd, bwd = _lower("cpu", 2, 40, 4, 8, 2, 16, 16, f32, True)
    assert TRITON_CALL not in fwd and TRITON_CALL not in bwd
    assert "stablehlo.while" in fwd and "stablehlo.while" in bwd


def test_explicit_interpret_flag_wins():
    """interpret=False asks for Triton even when lowered for the CPU (and fails there);
    interpret=True interprets even when lowered for CUDA."""
    spec = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 20, 2, 16, 1, 16
    args = (spec((b, l, h, p), f32), spec((b, l, h), f32), spec((h,), f32),
            spec((b, l, g, n), f32), spec((b, l, g, n), f32))
    lower = lambda interpret, platform: jax.jit(
        lambda *a: ssd_pallas(*a, 16, interpret=interpret)).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
    assert TRITON_CALL not in lower(True, "cuda")
    with pytest.raises(ValueError, match="interpret"):
        lower(False, "cpu")


def test_vmap_equals_the_batch_axis():
    """vmap over the per-platform kernels (their batching rule) = the same sequences batched."""
    seed = seed_of("vmap")
    rng = np.random.default_rng(seed)
    k, b, l, h, p, g, n = 2, 1, 20, 2, 16, 1, 16
    x, B, C = (jnp.asarray(rng.standard_normal(s), f32)
               for s in ((k, b, l, h, p), (k, b, l, g, n), (k, b, l, g, n)))
    dt = jnp.asarray(rng.uniform(0.01, 0.5, (k, b, l, h)), f32)
    A = -jnp.asarray(rng.uniform(0.5, 4.0, (h,)), f32)
    mapped = jax.jit(jax.vmap(lambda x, dt, B, C: ssd_pallas(x, dt, A, B, C, 16)))
    y, final = mapped(x, dt, B, C)
    flat = lambda t: t.reshape(k * b, *t.shape[2:])
    y_b, final_b = jax.jit(lambda *a: ssd_pallas(*a, 16))(flat(x), flat(dt), A, flat(B), flat(C))
    check("y", flat(y), y_b, 1e-6, seed)
    check("final", flat(final), final_b, 1e-6, seed)


@pytest.mark.slow  # ~30 s on 2 idle cores: the interpreted tiny model
def test_model_exported_for_cpu_and_cuda_carries_triton_and_runs_on_cpu():
    """jax.export of the separator (tiny BSMamba2, ssd_impl="pallas_triton") for ("cpu", "cuda")
    from this host: the CUDA module holds the Triton kernels, and the exported function run on the
    CPU (the interpreted kernels) equals the model with ssd_impl="xla"."""
    from bsmamba2_jax.model import BSMamba2
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    model_xla, params, config = tiny_model_and_params()
    model = BSMamba2(**{**config.model, "ssd_impl": "pallas_triton"})
    seed = seed_of("export")
    audio = (0.1 * np.random.default_rng(seed).standard_normal((1, 2, 22050))).astype(np.float32)
    with for_an_h100():
        exported = export.export(
            jax.jit(model.apply), platforms=("cpu", "cuda"),
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(params, audio)
    names = _triton_kernels(exported.mlir_module())
    # Each SSD call of the forward (both directions of the time pass and of the band pass)
    # lowers its chunk-state and output kernels.
    assert set(names) == {"ssd_chunk_state", "ssd_chunk_scan"} and len(names) >= 4, names
    out = exported.call(params, audio)
    expected = jax.jit(model_xla.apply)(params, audio)
    check("separated audio vs xla", out, expected, 1e-5, seed)
