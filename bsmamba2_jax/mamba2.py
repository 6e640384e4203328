"""Mamba2 mixer, its norms and the bidirectional block of BSMamba2 (docs/DESIGN.md#model).

Letters (SSD, from `ssd_minimal.py`): b batch, l sequence, h heads, p head dim, g groups,
n state dim; d model features, e d_inner (= expand * d).

Numerics (docs/DESIGN.md#numerics): parameters are float32; matmuls and the depthwise conv run
in `dtype` (bf16 in the paper config); dt + dt_bias, softplus, A = -exp(A_log), the SSD state and
every norm's reduction are float32, as mamba_ssm keeps them. The residual stream around each
mixer is float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from kernels.ssd import mamba_chunk_scan

Dtype = Any

# torch.nn.Linear / Conv1d default init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """torch's default bias (and depthwise conv) init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_floor: float = 1e-4) -> nn.initializers.Initializer:
    """mamba_ssm's dt_bias: inverse softplus of dt ~ log-uniform[dt_min, dt_max], floored."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt)
    return init


def a_log_init(lo: float = 1.0, hi: float = 16.0) -> nn.initializers.Initializer:
    """mamba_ssm's A_log = log(A), A ~ U(1, 16) per head."""
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
    return init


class RMSNorm(nn.Module):
    """Standard RMSNorm x * rsqrt(mean(x^2) + eps) * weight over the last axis (mamba_ssm's).

    Reduces in float32; returns float32.
    """

    eps: float = 1e-5  # added to mean(x^2)
    param_dtype: Dtype = jnp.float32  # storage dtype of weight

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d) -> (..., d) float32."""
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * weight.astype(jnp.float32)


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: RMSNorm(y * silu(z)) per group.

    The normalisation runs over groups of `group_size` features (d_inner / ngroups in Mamba2).
    Float32 throughout; returns float32.
    """

    group_size: int  # features per normalisation group
    eps: float = 1e-5  # added to mean(x^2)
    param_dtype: Dtype = jnp.float32  # storage dtype of weight

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """y, z (..., e) -> (..., e) float32."""
        e = y.shape[-1]
        if e % self.group_size:
            raise ValueError(f"features {e} must be a multiple of group_size={self.group_size}")
        weight = self.param("weight", nn.initializers.ones, (e,), self.param_dtype)
        x = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        xg = x.reshape(x.shape[:-1] + (e // self.group_size, self.group_size))
        xg = xg * jax.lax.rsqrt(jnp.mean(jnp.square(xg), axis=-1, keepdims=True) + self.eps)
        return xg.reshape(x.shape) * weight.astype(jnp.float32)


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """Depthwise causal conv1d along l: y[t] = bias + sum_k weight[k] * x[t - K + 1 + k].

    Written as K shifted multiply-adds (K = 4): for a depthwise kernel this is exactly the
    convolution and cheaper than a grouped conv op with 1280 groups.

    Args:
      x: (b, l, c). weight: (K, c) (weight[K-1] multiplies the current step). bias: (c,).
    Returns:
      (b, l, c) in x.dtype.
    """
    k, l = weight.shape[0], x.shape[1]
    xp = jnp.pad(x, [(0, 0), (k - 1, 0), (0, 0)])
    y = bias.astype(x.dtype)
    for i in range(k):
        y = y + xp[:, i:i + l] * weight[i].astype(x.dtype)
    return y


def _dense_kernel_params(key: jax.Array, fan_in: int, features: int,
                         dtype: Dtype) -> dict[str, jax.Array]:
    """{"kernel": (fan_in, features)} as nn.Dense(features, use_bias=False) initialises it, so
    that the parameter tree is that of a Dense named like the param."""
    return {"kernel": torch_kernel_init(key, (fan_in, features), dtype)}


def _matmul(u: jax.Array, kernel: jax.Array, dtype: Dtype) -> jax.Array:
    """u (..., d) @ kernel (d, f) in `dtype`, as nn.Dense computes it (no bias)."""
    return jax.lax.dot_general(u.astype(dtype), kernel.astype(dtype),
                               (((u.ndim - 1,), (0,)), ((), ())))


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Hyper-parameters of one Mamba2 mixer (hashable, so modules can hold it)."""

    d_model: int  # d, input/output features
    expand: int = 2  # e = expand * d_model
    d_state: int = 128  # n
    headdim: int = 64  # p; heads h = e / p
    ngroups: int = 1  # g, B/C groups
    d_conv: int = 4  # depthwise conv kernel
    chunk_size: int = 256  # SSD chunk length
    ssd_impl: str = "xla"  # "xla", "scan" or "pallas"
    dtype: Dtype = jnp.float32  # matmul / conv compute dtype


class Mamba2(nn.Module):
    """The Mamba2 mixer of mamba_ssm 2.2.2 (`Mamba2`, rmsnorm=True, no dt limit).

    in_proj -> (z, x, B, C, dt) -> depthwise causal conv + SiLU on x, B, C
    -> SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D x -> RMSNorm(y * silu(z))
    -> out_proj.
    """

    config: Mamba2Config  # sizes, SSD impl and compute dtype
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        """u (b, l, d) -> (b, l, d) in `config.dtype`."""
        b, l, d = u.shape
        c = self.config
        e = c.expand * c.d_model
        if e % c.headdim:
            raise ValueError(f"d_inner={e} must be a multiple of headdim={c.headdim}")
        h, p, g, n = e // c.headdim, c.headdim, c.ngroups, c.d_state
        if h % g:
            raise ValueError(f"nheads={h} must be a multiple of ngroups={g}")
        conv_dim = e + 2 * g * n

        # One in_proj kernel (the authors' layout: columns z, x, B, C, dt), applied as five
        # products of its column blocks: each output comes out contiguous, where splitting one
        # (b, l, 2e + 2gn + h) output (and the conv's) cost copies: ~9% of the CPU forward's time.
        in_proj = self.param("in_proj", _dense_kernel_params, u.shape[-1],
                             2 * e + 2 * g * n + h, self.param_dtype)["kernel"]
        widths = (e, e, g * n, g * n, h)  # z, x, B, C, dt
        starts = np.cumsum((0,) + widths[:-1])
        z, x, B, C, dt = (_matmul(u, in_proj[:, a:a + w], c.dtype)
                          for a, w in zip(starts, widths, strict=True))

        # Depthwise: torch's fan_in is d_conv (one input channel per group). The conv and SiLU
        # act per channel, so x, B and C go through them apart, with their own columns.
        conv_w = self.param("conv_weight", torch_bias_init(c.d_conv),
                            (c.d_conv, conv_dim), self.param_dtype)
        conv_b = self.param("conv_bias", torch_bias_init(c.d_conv), (conv_dim,),
                            self.param_dtype)
        conv_starts = starts[1:4] - e  # columns of x, B and C in the conv's (x, B, C) layout
        x, B, C = (jax.nn.silu(causal_depthwise_conv(t, conv_w[:, a:a + w], conv_b[a:a + w]))
                   for t, a, w in zip((x, B, C), conv_starts, widths[1:4], strict=True))

        dt_bias = self.param("dt_bias", dt_bias_init(), (h,), self.param_dtype)
        A_log = self.param("A_log", a_log_init(), (h,), self.param_dtype)
        D = self.param("D", nn.initializers.ones, (h,), self.param_dtype)
        A = -jnp.exp(A_log.astype(jnp.float32))  # (h,) float32

        y = mamba_chunk_scan(x.reshape(b, l, h, p), dt.astype(jnp.float32), A,
                             B.reshape(b, l, g, n), C.reshape(b, l, g, n), c.chunk_size,
                             D=D.astype(jnp.float32), dt_bias=dt_bias.astype(jnp.float32),
                             dt_softplus=True, impl=c.ssd_impl)  # (b, l, h, p)
        y = GatedRMSNorm(group_size=e // g, param_dtype=self.param_dtype,
                         name="norm")(y.reshape(b, l, e), z)
        return nn.Dense(d, use_bias=False, dtype=c.dtype, param_dtype=self.param_dtype,
                        kernel_init=torch_kernel_init, name="out_proj")(y)


class DirectionalMamba2(nn.Module):
    """One direction of the bidirectional block: v + Mamba2(RMSNorm(v)).

    With reverse=True the sequence is flipped before and after, so the output at t depends only
    on inputs at t and later (anti-causal); otherwise only on t and earlier (causal).
    """

    mixer: Mamba2Config  # the mixer's hyper-parameters
    reverse: bool = False  # process the sequence back to front
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        """u (b, l, d) -> (b, l, d) float32."""
        v = jnp.flip(u, axis=1) if self.reverse else u
        v = v.astype(jnp.float32)
        mixer = Mamba2(self.mixer, param_dtype=self.param_dtype, name="mixer")
        out = v + mixer(RMSNorm(param_dtype=self.param_dtype, name="norm")(v)).astype(jnp.float32)
        return jnp.flip(out, axis=1) if self.reverse else out


class BiMamba2Block(nn.Module):
    """Bidirectional Mamba2 block (docs/DESIGN.md#model):

        f = u + Mamba2(RMSNorm(u));  b = flip(v + Mamba2'(RMSNorm'(v))), v = flip(u)
        out = Linear(concat[f, b]: 2d -> d, with bias) + u

    No feed-forward sublayer (the authors' code has none).
    """

    mixer: Mamba2Config  # hyper-parameters of both directions' mixers
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        """u (b, l, d) -> (b, l, d) float32."""
        d = u.shape[-1]
        u = u.astype(jnp.float32)
        f = DirectionalMamba2(self.mixer, reverse=False, param_dtype=self.param_dtype,
                              name="forward")(u)
        r = DirectionalMamba2(self.mixer, reverse=True, param_dtype=self.param_dtype,
                              name="backward")(u)
        out = nn.Dense(d, dtype=self.mixer.dtype,
                       param_dtype=self.param_dtype, kernel_init=torch_kernel_init,
                       bias_init=torch_bias_init(2 * d), name="merge")(
            jnp.concatenate([f, r], axis=-1))
        return out.astype(jnp.float32) + u
