"""`impl="pallas_mosaic"` (the Mosaic GPU kernels) in JAX's GPU interpreter and lowered for CUDA.

On a CPU the kernels run in the GPU interpreter with race detection, out-of-bounds reads raising
and uninitialised shared memory reading as NaN (`kernels.ssd.mosaic.common.interpret_params`);
every test that runs them also asserts that no race was found. Values and all nine gradients are
compared with the float64 recurrence (`ssd_recurrence`, of the inputs rounded as the kernels see
them) and with the paper's Listing 1 (`kernels.ssd.reference.ssd_minimal`, differentiated by
JAX). The kernels' products take 16-bit operands, so float32 inputs are held to bfloat16-level
tolerances. On a GPU (scripts/gpu_check.sh) the same tests run the compiled kernels.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels.ssd import mamba_chunk_scan
from kernels.ssd.common import prepare_dt, skip_and_gate
from kernels.ssd.mosaic import common as mc
from kernels.ssd.mosaic import state_passing
from kernels.ssd.mosaic.common import MosaicBlockSizes, kernel_dims
from kernels.ssd.pallas import ssd_pallas
from kernels.ssd.reference import ssd_minimal, state_passing_fwd_reference
from tests.kernels import ssd_recurrence as rec
from tests.kernels.test_ssd import GRAD_ARGS, rel_err, seed_of

ON_GPU = jax.default_backend() == "gpu"
f32, bf16 = jnp.float32, jnp.bfloat16
# Relative tolerances (max |error| / max |reference|): bf16 operands (an 8-bit mantissa, ~4e-3
# per rounding, several roundings per value) for both input dtypes.
VALUE_TOL = {f32: 2e-2, bf16: 3e-2}
GRAD_TOL = {f32: 3e-2, bf16: 4e-2}
MOSAIC_CALL = "mosaic_gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """The GPU interpreter keeps global state (its race record, and a half-run kernel after an
    error): start each test from a clean one."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    gpu_callbacks.reset_gpu_interpret_mode_state()
    yield


def races_found() -> bool:
    """Whether the GPU interpreter recorded a race since the last reset (False on a GPU)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    try:
        return gpu_callbacks.get_races().races_found
    except AssertionError:  # no kernel was interpreted since the reset
        return False


def check(name, actual, expected, tol, seed):
    err = rel_err(actual, expected)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} (seed {seed})"


def _rounded(inputs: dict, dtype) -> dict:
    """The inputs as the kernels see them, in float64: x, B, C (and z) in the operand dtype
    (bf16 for float32 inputs too); initial states float32."""
    out = {}
    for k, v in inputs.items():
        d = f32 if k == "initial_states" else (bf16 if k in ("x", "B", "C") else dtype)
        out[k] = None if v is None else np.asarray(jnp.asarray(v, d), np.float64)
    return out


def _listing1(args, chunk):
    """y and the final state by the paper's Listing 1, with the same pre/post steps."""
    dt = prepare_dt(args["dt"], args["dt_bias"], True)
    y, final = ssd_minimal(args["x"].astype(f32), dt, args["A"], args["B"].astype(f32),
                           args["C"].astype(f32), chunk, args["initial_states"])
    return skip_and_gate(y, args["x"], args["D"], args["z"]), final


def _value_and_grads(args, gy, g_final, chunk, impl):
    def objective(a):
        if impl == "listing1":
            y, final = _listing1(a, chunk)
        else:
            y, final = mamba_chunk_scan(**a, chunk_size=chunk, dt_softplus=True,
                                        return_final_states=True, impl=impl)
        return jnp.sum(y.astype(f32) * gy) + jnp.sum(final * g_final), (y, final)

    (_, outs), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(args)
    return outs, grads


def _check_all(shape, dtype, seed, *, with_init=True):
    b, l, h, p, g, n, chunk = shape
    rng = np.random.default_rng(seed)
    inputs = rec.random_inputs(rng, b, l, h, p, g, n, with_init=with_init)
    gy, g_final = rng.standard_normal((b, l, h, p)), rng.standard_normal((b, h, p, n))
    args = {k: None if v is None else jnp.asarray(v, f32 if k == "initial_states" else dtype)
            for k, v in inputs.items()}
    gy_j, gf_j = jnp.asarray(gy, f32), jnp.asarray(g_final, f32)
    (y, final), grads = _value_and_grads(args, gy_j, gf_j, chunk, "pallas_mosaic")
    assert not races_found()
    assert y.shape == (b, l, h, p) and y.dtype == dtype
    assert final.shape == (b, h, p, n) and final.dtype == f32
    vtol, gtol = VALUE_TOL[dtype], GRAD_TOL[dtype]

    exact = _rounded(inputs, dtype)
    y_e, final_e, cache = rec.forward(**exact)
    expected = rec.backward(gy, g_final, cache, **exact)
    check("y vs float64", y, y_e, vtol, seed)
    check("final vs float64", final, final_e, vtol, seed)
    for name, grad in expected.items():
        check(f"d{name} vs float64", grads[name], grad, gtol, seed)

    (y_m, final_m), grads_m = _value_and_grads(args, gy_j, gf_j, chunk, "listing1")
    check("y vs Listing 1", y, y_m, vtol, seed)
    check("final vs Listing 1", final, final_m, vtol, seed)
    for name in GRAD_ARGS:
        if args[name] is not None:
            check(f"d{name} vs Listing 1", grads[name], grads_m[name], gtol, seed)


# (b, l, h, p, g, n, chunk): l = 1, l < chunk, l not a multiple of the chunk (several chunks),
# g > 1 with 3 heads per group, p and n not multiples of the 64-wide tiles.
SHAPES = [
    (1, 1, 2, 3, 1, 5, 64),
    (2, 37, 4, 5, 2, 6, 64),
    (1, 150, 6, 12, 2, 10, 64),
]
shape_id = lambda s: "b{}l{}h{}p{}g{}n{}q{}".format(*s)


@pytest.mark.parametrize("dtype", [bf16, f32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_values_and_gradients_match_float64_and_listing1(shape, dtype):
    _check_all(shape, dtype, seed_of("mosaic", shape, jnp.dtype(dtype).name))


def test_fused_passing_chosen(monkeypatch):
    """With the fused passing chosen (enough CTAs): compiled on a GPU it runs; the interpreted
    composition computes the states per chunk instead (`kernels.ssd.pallas._fused`), the fused
    kernels being tested on their own in test_ssd_steps.py and below."""
    default = MosaicBlockSizes.default
    monkeypatch.setattr(MosaicBlockSizes, "default", lambda *a: dataclasses.replace(
        default(*a), fused_passing_min_programs=0))
    _check_all((1, 150, 2, 7, 1, 9, 64), bf16, seed_of("mosaic-passing"))


def test_no_initial_state_one_chunk():
    """One chunk and no initial state: the kernels read no state at all."""
    _check_all((2, 40, 2, 8, 1, 8, 64), bf16, seed_of("mosaic-one-chunk"), with_init=False)


@pytest.mark.slow  # ~1 min in the interpreter: the model's head and state dims, 3 chunks
def test_bsmamba2_like_shape_few_sequences():
    """p = 64, n = 128 (the model's), chunk 128 with a ragged last chunk, two sequences."""
    _check_all((2, 300, 2, 64, 1, 128, 128), bf16, seed_of("mosaic-bsmamba2"))


# --- the race check bites ---------------------------------------------------------------------

interpreter_only = pytest.mark.skipif(ON_GPU, reason="checks of JAX's GPU interpreter (CPU)")

def _passing_inputs(seed, chunks=3):
    rng = np.random.default_rng(seed)
    b, h, P, N, Q = 1, 1, 64, 64, 64
    L = chunks * Q
    x = jnp.asarray(rng.standard_normal((b, L, h, P)), bf16)
    B = jnp.asarray(rng.standard_normal((b, L, 1, N)), bf16)
    dt = jnp.asarray(rng.uniform(0.01, 0.5, (b, h, L)), f32)
    cs = jnp.cumsum(-dt.reshape(b, h, chunks, Q), axis=-1).reshape(b, h, L)
    return x, B, dt, cs, Q


def _read_without_waiting(landed, release_barrier, compute):
    """The planted bug: the consumer reads a buffer without waiting for its copies to land."""
    out = compute()
    mc.release(release_barrier)
    return out


@interpreter_only
@pytest.mark.parametrize("planted", [False, True], ids=["as_written", "missing_wait"])
def test_race_detector_catches_a_missing_barrier_wait(planted, monkeypatch):
    """The fused passing streams 3 chunks through 2 buffers: when the consumer reads a buffer
    without waiting on the barriers of its TMA copies (a missing barrier wait), the reads race
    with the copies. The interpreter must report that race (its barrier bookkeeping then also
    fails the kernel: the landed phases were never observed), and none as written."""
    if planted:
        monkeypatch.setattr(state_passing, "consume", _read_without_waiting)
    x, B, dt, cs, Q = _passing_inputs(seed_of("race", planted))
    run = jax.jit(lambda *a: state_passing.state_passing_fwd(
        *a, None, chunk=Q, blocks=MosaicBlockSizes(stages=2), interpret=True))
    if planted:
        with pytest.raises(Exception, match="observ"):
            jax.block_until_ready(run(x, B, dt, cs))
        assert races_found()
    else:
        states, final = run(x, B, dt, cs)
        assert not races_found()
        ref_states, ref_final = state_passing_fwd_reference(x, B, dt, cs, None, chunk=Q)
        check("states", states, ref_states, 1e-5, 0)
        check("final", final, ref_final, 1e-5, 0)


@interpreter_only
def test_uninitialised_shared_memory_reads_as_nan(monkeypatch):
    """The interpreter's uninitialised-memory check is on: a tile the kernel never loads reads
    as NaN and reaches the output (here the consumer reads its scratch tile in place of the
    loaded x tile)."""
    x, B, dt, cs, Q = _passing_inputs(seed_of("uninit"), chunks=1)
    real_product = state_passing.weighted_product

    def unloaded(u_s, v_s, uw_s, *rest, **kw):
        # Read a scratch tile that nothing wrote instead of the loaded u tile.
        return real_product(uw_s, v_s, uw_s, *rest, **kw)

    monkeypatch.setattr(state_passing, "weighted_product", unloaded)
    _, final = jax.jit(lambda *a: state_passing.state_passing_fwd(
        *a, None, chunk=Q, blocks=MosaicBlockSizes(), interpret=True))(x, B, dt, cs)
    assert np.isnan(np.asarray(final)).all()


# --- blocks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [(801, 64, 128, 256), (62, 64, 128, 64), (1, 3, 5, 16),
                                  (37, 7, 9, 24), (5000, 200, 130, 1000)])
def test_kernel_dims_are_whole_tiles(dims):
    chunk, P, N = kernel_dims(*dims)
    for v in (chunk, P, N):
        assert v % 64 == 0 and v >= 64
    assert chunk <= 256 and P >= dims[1] and N >= dims[2]
    MosaicBlockSizes.default(P, N, chunk).check(P, N, chunk)


def test_bad_block_sizes_name_the_problem():
    with pytest.raises(ValueError, match="stages"):
        MosaicBlockSizes(stages=1).check(64, 64, 64)
    with pytest.raises(ValueError, match="headdim"):
        MosaicBlockSizes().check(320, 64, 64)


# --- lowering for CUDA from this host: Mosaic GPU kernels only -----------------------------------

def _lower(platform, b, l, h, p, g, n, chunk, dtype, with_init, use_final=True):
    spec = jax.ShapeDtypeStruct
    args = (spec((b, l, h, p), dtype), spec((b, l, h), f32), spec((h,), f32),
            spec((b, l, g, n), dtype), spec((b, l, g, n), dtype), spec((b, h, p, n), f32))

    def forward(x, dt, A, B, C, init):
        return ssd_pallas(x, dt, A, B, C, chunk, init if with_init else None, backend="mosaic")

    def loss(*a):
        y, final = forward(*a)
        return jnp.sum(y) + (jnp.sum(final) if use_final else 0.0)

    lower = lambda f: jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return lower(forward), lower(jax.grad(loss, argnums=tuple(range(6))))


def mosaic_kernels(module_text: str) -> list[str]:
    """The kernel names of the Mosaic GPU custom calls in a lowered module, one per call."""
    names = sorted(re.findall(r"(ssd_[a-z_]+?)_mosaic_gpu", module_text))
    assert module_text.count(f"custom_call @{MOSAIC_CALL}") == len(names), names
    assert TRITON_CALL not in module_text
    return names


@pytest.mark.parametrize("shape, dtype, with_init, use_final", [
    # BSMamba2 time axis (b = 5 x 62) and band axis (b = 5 x 801), as the model calls them
    ((310, 801, 16, 64, 1, 128, 256), bf16, False, False),
    ((4005, 62, 16, 64, 1, 128, 64), bf16, False, False),
    ((310, 801, 16, 64, 1, 128, 256), f32, True, True),
    ((4005, 62, 16, 64, 1, 128, 64), f32, True, True),
    ((2, 801, 16, 64, 1, 128, 256), bf16, False, True),  # few sequences: per-chunk states
    ((3, 50, 6, 12, 3, 10, 24), bf16, True, True),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_kernels_lower_for_cuda(shape, dtype, with_init, use_final):
    """Forward and forward+backward lower to Mosaic GPU kernels (wgmma shapes, layouts, TMA
    boxes are checked by this lowering) and nothing else: no Triton call. The gradient keeps
    the forward's kernels too: the per-platform primitive declares the GPU interpreter's ordered
    effects, which XLA does not remove (a model's loss needs the forward anyway)."""
    b, l, h, p, g, n, chunk_size = shape
    chunk, _, _ = kernel_dims(l, p, n, chunk_size)
    fwd, bwd = _lower("cuda", *shape, dtype, with_init, use_final)
    fused = b * h >= MosaicBlockSizes().fused_passing_min_programs
    several = l > chunk
    states = "ssd_state_passing" if fused and (several or with_init) else "ssd_chunk_state"
    forward = ["ssd_chunk_scan", states]
    assert mosaic_kernels(fwd) == sorted(forward)
    backward = forward + ["ssd_chunk_scan_bwd_cols", "ssd_chunk_scan_bwd_rows"]
    if several:
        backward += [states, "ssd_state_passing_bwd" if fused else "ssd_output_state_grad"]
    elif with_init:
        backward += ["ssd_output_state_grad"]
    assert mosaic_kernels(bwd) == sorted(backward)


def test_cpu_lowering_interprets_the_kernels():
    fwd, bwd = _lower("cpu", 2, 40, 2, 8, 1, 16, 64, bf16, True)
    assert MOSAIC_CALL not in fwd and MOSAIC_CALL not in bwd


@pytest.mark.slow  # ~1 min: the tiny model's SSD calls in the GPU interpreter
def test_model_exported_for_cuda_carries_mosaic_and_runs_interpreted_on_cpu():
    """The tiny separator with ssd_impl="pallas_mosaic": `jax.export` for "cuda" from this host
    holds Mosaic GPU kernels only; run here (the kernels in the GPU interpreter) it equals
    ssd_impl="xla" to the kernels' bf16 products. An export that includes the CPU fails: the GPU
    interpreter is host callbacks, which `jax.export` cannot serialise (export the CPU copy with
    ssd_impl="xla" or "pallas_triton")."""
    from bsmamba2_jax.model import BSMamba2
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    model_xla, params, config = tiny_model_and_params()
    model = BSMamba2(**{**config.model, "ssd_impl": "pallas_mosaic"})
    seed = seed_of("export-mosaic")
    audio = (0.1 * np.random.default_rng(seed).standard_normal((1, 2, 22050))).astype(np.float32)
    checks = [export.DisabledSafetyCheck.custom_call(MOSAIC_CALL + "_v2"),
              export.DisabledSafetyCheck.custom_call(MOSAIC_CALL)]
    exported = export.export(jax.jit(model.apply), platforms=("cuda",),
                             disabled_checks=checks)(params, audio)
    names = mosaic_kernels(exported.mlir_module())
    assert "ssd_chunk_scan" in names and len(names) >= 4, names
    with pytest.raises(NotImplementedError, match="host_callbacks"):
        export.export(jax.jit(model.apply), platforms=("cpu", "cuda"),
                      disabled_checks=checks)(params, audio)
    out = jax.jit(model.apply)(params, audio)
    expected = jax.jit(model_xla.apply)(params, audio)
    check("separated audio vs xla", out, expected, 3e-2, seed)
    assert not races_found()
