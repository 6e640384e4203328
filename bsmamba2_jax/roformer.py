"""BS-RoFormer's transformer: the other dual-path sequence model (docs/DESIGN.md#roformer).

The paper's baseline, BS-RoFormer, is the authors' model class with a transformer in place of
the bidirectional Mamba2 block (EuiYeonKim/BSMamba2 `src/model/bs_model.py`,
`BSModel(module_type="transformer")`, attention in `src/model/modules/attend.py`); band split,
final norm, mask estimator and recipe are shared. One pass (over frames, or over bands) is one
pre-norm transformer layer with full (unmasked, bidirectional) attention over the sequence:

    a = L2RMSNorm(x)
    q, k, v = a Wq, a Wk, a Wv                       (no bias; heads h, head size e)
    q, k = rotary(q), rotary(k)                      (positions 0..l-1, interleaved pairs)
    o = softmax(q k^T / sqrt(e)) v * sigmoid(a Wg + bg)    (one gate per head and position)
    x = x + o Wo                                     (no bias)
    x = x + W2 GELU(W1 L2RMSNorm(x) + b1) + b2       (d -> ff_mult d -> d, exact erf GELU)

No norm after the layer (the authors build it with `norm_output=False`). Dropout, training only,
where the authors' modules put it: `attn_dropout` on the attention probabilities and after Wo,
`ff_dropout` after the GELU and after W2.

Letters: b batch of sequences, l / m query / key positions, h heads, e head features
(dim_head), d model features.

Numerics: the residual stream, the norms, the rotary rotation and the softmax are float32; the
projections and the two attention matmuls run in `dtype` (bf16 in the paper recipe).
Positions are exact integers in float32. (The authors trained with bf16 autocast, under which
rotary-embedding-torch 0.6.4 builds the positions in the queries' dtype, so positions above 256
were rounded in their training; their evaluation, under fp16 autocast, and their fp32 outputs use
exact positions, as we do.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bsmamba2_jax.mamba2 import torch_bias_init, torch_kernel_init
from bsmamba2_jax.norms import L2RMSNorm

Dtype = Any

ROTARY_THETA = 10_000.0  # rotary-embedding-torch's default base
ATTN_IMPLS = ("xla", "cudnn")  # `implementation` of jax.nn.dot_product_attention


def rotary_frequencies(dim_head: int, theta: float = ROTARY_THETA) -> np.ndarray:
    """(dim_head // 2,) float32 angular frequencies theta ** (-2i / dim_head).

    rotary-embedding-torch's default (`freqs_for="lang"`), rotating all dim_head features; the
    authors' checkpoints hold this fixed tensor as `rotary_embed.freqs`.
    """
    if dim_head <= 0 or dim_head % 2:
        raise ValueError(f"rotary embeddings rotate pairs: dim_head={dim_head} must be even")
    exponents = np.arange(0, dim_head, 2, dtype=np.float64) / dim_head
    return (1.0 / theta ** exponents).astype(np.float32)


def rotary_cos_sin(length: int, dim_head: int,
                   theta: float = ROTARY_THETA) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the angles position * frequency: two (length, dim_head // 2) float32."""
    angles = np.outer(np.arange(length, dtype=np.float32), rotary_frequencies(dim_head, theta))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates consecutive feature pairs (x[2i], x[2i+1]) of each position by its angles.

    As complex numbers, x[2i] + j x[2i+1] is multiplied by exp(j * position * freq_i).
    x (b, l, h, e); cos, sin (l, e // 2) -> (b, l, h, e) float32.
    """
    b, l, h, e = x.shape
    pairs = x.astype(jnp.float32).reshape(b, l, h, e // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (b, l, h, e/2)
    c, s = cos[:, None, :], sin[:, None, :]  # (l, 1, e/2)
    return jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1).reshape(b, l, h, e)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
              dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(e)) v per head over all positions; the softmax in float32.

    Without dropout this is `jax.nn.dot_product_attention` (impl "cudnn": the fused GPU kernel,
    bf16/fp16 only). With dropout (training with `dropout_rate` > 0 and an rng) the
    probabilities are formed explicitly, (b, h, l, l) in memory, so that they can be dropped as
    the authors' `Attend` does; no fused kernel here takes a dropout mask.
    q, k, v (b, l, h, e) -> (b, l, h, e) in v.dtype.
    """
    if dropout_rng is None or dropout_rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl).astype(v.dtype)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("blhe,bmhe->bhlm", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1)  # (b, h, l, m) float32
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhlm,bmhe->blhe", probs, v)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of one transformer pass (hashable, so modules can hold it)."""

    dim: int  # d, input/output features
    heads: int = 8  # h, attention heads
    dim_head: int = 48  # e, features per head (even: rotary pairs)
    ff_mult: int = 4  # feed-forward hidden = ff_mult * dim
    attn_dropout: float = 0.0  # on attention probabilities and after Wo, training only
    ff_dropout: float = 0.0  # after the GELU and after W2, training only
    attn_impl: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" or "cudnn"
    dtype: Dtype = jnp.float32  # matmul compute dtype
    deterministic: bool = True  # False (training): dropout on, needs the 'dropout' rng


class Attention(nn.Module):
    """Pre-norm gated multi-head attention with rotary q, k: x (b, l, d) -> o Wo (b, l, d)."""

    config: TransformerConfig  # sizes, dropout, compute dtype
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, l, d) -> (b, l, d) in `config.dtype` (the residual is added by the caller)."""
        b, l, d = x.shape
        c = self.config
        h, e = c.heads, c.dim_head
        dense = dict(dtype=c.dtype, param_dtype=self.param_dtype, kernel_init=torch_kernel_init)
        a = L2RMSNorm(param_dtype=self.param_dtype, name="norm")(x)  # (b, l, d) float32
        # Output features ordered (qkv, h, e), as the authors' `to_qkv` weight rows.
        qkv = nn.Dense(3 * h * e, use_bias=False, name="to_qkv", **dense)(a)
        q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, h, e), 2, 0)  # each (b, l, h, e)
        cos, sin = rotary_cos_sin(l, e)
        q = apply_rotary(q, cos, sin).astype(c.dtype)
        k = apply_rotary(k, cos, sin).astype(c.dtype)
        rng = None
        if not c.deterministic and c.attn_dropout > 0.0:
            rng = self.make_rng("dropout")
        o = attention(q, k, v, impl=c.attn_impl, dropout_rate=c.attn_dropout,
                      dropout_rng=rng)  # (b, l, h, e)
        gates = nn.Dense(h, bias_init=torch_bias_init(d), name="to_gates", **dense)(a)
        o = o.astype(jnp.float32) * jax.nn.sigmoid(gates.astype(jnp.float32))[..., None]
        out = nn.Dense(d, use_bias=False, name="to_out", **dense)(
            o.reshape(b, l, h * e).astype(c.dtype))
        return nn.Dropout(c.attn_dropout, deterministic=c.deterministic)(out)


class FeedForward(nn.Module):
    """Pre-norm MLP: Linear(d -> ff_mult d) -> GELU (erf) -> Linear(-> d), (b, l, d) -> same."""

    config: TransformerConfig  # sizes, dropout, compute dtype
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, l, d) -> (b, l, d) in `config.dtype` (the residual is added by the caller)."""
        d = x.shape[-1]
        c = self.config
        hidden = c.ff_mult * d
        dense = dict(dtype=c.dtype, param_dtype=self.param_dtype, kernel_init=torch_kernel_init)
        y = L2RMSNorm(param_dtype=self.param_dtype, name="norm")(x)
        y = nn.Dense(hidden, bias_init=torch_bias_init(d), name="hidden", **dense)(y)
        y = jax.nn.gelu(y.astype(jnp.float32), approximate=False).astype(c.dtype)
        y = nn.Dropout(c.ff_dropout, deterministic=c.deterministic)(y)
        y = nn.Dense(d, bias_init=torch_bias_init(hidden), name="out", **dense)(y)
        return nn.Dropout(c.ff_dropout, deterministic=c.deterministic)(y)


class TransformerBlock(nn.Module):
    """One transformer layer over each sequence: x + Attention(x), then + FeedForward(.)."""

    config: TransformerConfig  # sizes, dropout, compute dtype
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, l, d) -> (b, l, d) float32."""
        c = self.config
        if x.shape[-1] != c.dim:
            raise ValueError(f"features {x.shape[-1]} must equal TransformerConfig.dim={c.dim}")
        x = x.astype(jnp.float32)
        x = x + Attention(c, param_dtype=self.param_dtype, name="attn")(x).astype(jnp.float32)
        return x + FeedForward(c, param_dtype=self.param_dtype, name="ff")(x).astype(jnp.float32)
