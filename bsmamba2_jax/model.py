"""BSMamba2: band split, dual-path bidirectional Mamba2, mask estimation (docs/DESIGN.md#model).

    from bsmamba2_jax.model import BSMamba2
    model = BSMamba2(**config.model)
    params = model.init(rng, audio)          # audio (batch, 2, samples) float
    vocals = model.apply(params, audio)      # (batch, 2, samples) float32, no dropout
    vocals = model.apply(params, audio, train=True, rngs={"dropout": key})   # training

`mixer="transformer"` swaps the sequence model of both dual-path passes for BS-RoFormer's
transformer (`bsmamba2_jax/roformer.py`, the paper's baseline; configs/bsroformer.py).

Letters: b batch, t frames, f bins, k bands, d features, s stereo channels, m bands in a group,
w bins in a band.

Bands of equal width that follow each other are processed as one group with stacked weights
(the paper config has 7 groups: 24x2, 12x4, 8x12, 8x24, 8x48, 1x128, 1x129 bins). This is the
same function and parameter count as one Linear per band (paper Sec. III-A), in 7 batched matmuls
instead of 62 small ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bsmamba2_jax.audio import istft, stft
from bsmamba2_jax.mamba2 import BiMamba2Block, Mamba2Config, torch_bias_init
from bsmamba2_jax.norms import L2RMSNorm, l2_rms_norm
from bsmamba2_jax.roformer import ATTN_IMPLS, TransformerBlock, TransformerConfig
from kernels.ssd.ordering import after

Dtype = Any


def resolve_dtype(dtype: Dtype) -> jnp.dtype:
    """"bfloat16" / "float32" / a dtype -> a floating jnp dtype; ValueError otherwise."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"Unknown dtype {dtype!r}; use 'float32' or 'bfloat16'") from err
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype must be floating ('float32', 'bfloat16'), got {dtype!r}")
    return resolved


def band_groups(band_widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """Runs of equal consecutive band widths: [(bands in run, bins per band), ...], in order."""
    groups: list[tuple[int, int]] = []
    for w in band_widths:
        if groups and groups[-1][1] == w:
            groups[-1] = (groups[-1][0] + 1, w)
        else:
            groups.append((1, w))
    return groups


def fold_spectrum(spec: jax.Array) -> jax.Array:
    """Complex stereo spectrum (b, 2, f, t) -> real features (b, t, 4f), order (f, s, re/im).

    Frequency is outermost, so band k's 4 * F_k features are one contiguous slice.
    """
    b, s, f, t = spec.shape
    x = jnp.stack([spec.real, spec.imag], axis=-1)  # (b, s, f, t, 2)
    x = jnp.transpose(x, (0, 3, 2, 1, 4))  # (b, t, f, s, 2)
    return x.reshape(b, t, f * s * 2).astype(jnp.float32)


def unfold_mask(m: jax.Array, channels: int = 2) -> jax.Array:
    """Real features (b, t, 4f), order (f, s, re/im) -> complex mask (b, s, f, t)."""
    b, t, feats = m.shape
    f = feats // (2 * channels)
    m = m.reshape(b, t, f, channels, 2)
    m = jnp.transpose(m, (0, 3, 2, 1, 4))  # (b, s, f, t, 2)
    return jax.lax.complex(m[..., 0], m[..., 1])


class GroupedDense(nn.Module):
    """m independent Linear layers applied to m bands at once: (..., m, i) -> (..., m, o)."""

    features: int  # o, outputs per band
    dtype: Dtype = jnp.float32  # matmul compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., m, i) -> (..., m, o) in `dtype` (torch Linear init per band)."""
        m, i = x.shape[-2], x.shape[-1]
        kernel = self.param("kernel", torch_bias_init(i), (m, i, self.features),
                            self.param_dtype)
        bias = self.param("bias", torch_bias_init(i), (m, self.features), self.param_dtype)
        y = jnp.einsum("...mi,mio->...mo", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class BandSplit(nn.Module):
    """Per band: L2RMSNorm(4 F_k) -> Linear(4 F_k -> d). (b, t, 4f) -> (b, t, k, d)."""

    band_widths: tuple[int, ...]  # F_k, bins per band
    dim: int  # d
    dtype: Dtype = jnp.float32  # matmul compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, t, 4f) folded spectrum -> (b, t, k, d) float32."""
        b, t, _ = x.shape
        outs, start = [], 0
        for gi, (m, w) in enumerate(band_groups(tuple(self.band_widths))):
            xg = x[..., start:start + m * 4 * w].reshape(b, t, m, 4 * w)
            start += m * 4 * w
            gamma = self.param(f"norm{gi}", nn.initializers.ones, (m, 4 * w), self.param_dtype)
            xg = l2_rms_norm(xg, gamma)
            outs.append(GroupedDense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=f"proj{gi}")(xg))
        return jnp.concatenate(outs, axis=2).astype(jnp.float32)  # (b, t, k, d)


class MaskEstimator(nn.Module):
    """Per band: Linear(d -> hidden) -> Tanh -> Linear(hidden -> 8 F_k) -> GLU.

    No norm inside: the authors' code has none, where the paper (Sec. III-C) mentions an RMSNorm;
    we follow the code (docs/DESIGN.md#model).
    Returns the folded complex stereo mask (b, t, 4f), float32.
    """

    band_widths: tuple[int, ...]  # F_k, bins per band
    hidden: int  # hidden features (mask_hidden_mult * d)
    dtype: Dtype = jnp.float32  # matmul compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, t, k, d) -> (b, t, 4f) float32."""
        b, t = x.shape[:2]
        outs, k0 = [], 0
        for gi, (m, w) in enumerate(band_groups(tuple(self.band_widths))):
            xg = x[:, :, k0:k0 + m]  # (b, t, m, d)
            k0 += m
            h = GroupedDense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"hidden{gi}")(xg)
            h = jnp.tanh(h.astype(jnp.float32))
            y = GroupedDense(8 * w, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"out{gi}")(h).astype(jnp.float32)  # (b, t, m, 8w)
            a, gate = jnp.split(y, 2, axis=-1)  # torch nn.GLU(dim=-1): a * sigmoid(gate)
            outs.append((a * jax.nn.sigmoid(gate)).reshape(b, t, m * 4 * w))
        return jnp.concatenate(outs, axis=-1)


SequenceConfig = Mamba2Config | TransformerConfig
MIXERS = ("mamba2", "transformer")  # BSMamba2's bidirectional Mamba2, BS-RoFormer's transformer


def sequence_block(config: SequenceConfig, param_dtype: Dtype, name: str) -> nn.Module:
    """The sequence model of one pass, (b, l, d) -> (b, l, d) float32, chosen by config type."""
    if isinstance(config, TransformerConfig):
        return TransformerBlock(config, param_dtype=param_dtype, name=name)
    return BiMamba2Block(config, param_dtype=param_dtype, name=name)


REMAT_MODES = ("none", "layer", "block")


def resolve_remat(remat: Any) -> str:
    """`model.remat` -> "none", "layer" or "block"; False/True (older configs): "none"/"layer"."""
    if remat is False:
        return "none"
    if remat is True:
        return "layer"
    if isinstance(remat, str) and remat in REMAT_MODES:
        return remat
    raise ValueError(f"model.remat={remat!r} is not one of {REMAT_MODES} (or False/True); "
                     '"block" recomputes the least memory, "none" is the fastest')


def recompute_in_backward(module: nn.Module, *args: Any) -> Any:
    """module(*args), whose backward pass recomputes module's forward pass instead of keeping it.

    The forward keeps only the module's parameters, its inputs and (when the scope has a
    "dropout" rng) the one dropout key drawn for this call; the backward reruns the module from
    them, with the same key and so the same dropout masks, once the output's cotangent has
    arrived (`kernels.ssd.ordering.after`), then differentiates it. Same values and gradients as the
    module run with that key, for one extra forward pass. The key is drawn here, not inside the
    module, so the masks differ from those of the module called directly (same distribution).
    `module` must be stateless apart from its "params" (true of every module here). Flax's
    `nn.checkpoint` is not used: XLA:CPU undoes it (`kernels.ssd.ordering`).
    """
    definition = module.clone(parent=None)  # an unbound copy, run from explicit params and key
    dropout = module.scope is not None and module.scope.has_rng("dropout")
    key = jax.random.key_data(module.make_rng("dropout")) if dropout else None

    def run(params: Any, key: jax.Array | None, *a: Any) -> Any:
        # Work that reads only params or key (weights broadcast to the activations' shape,
        # dropout masks) waits for the inputs, instead of running at the start of the program
        # and staying live until its use, or being shared between forward and backward.
        params, key = after(a, (params, key))
        rngs = {"dropout": key} if key is not None else None
        return definition.apply({"params": params}, *a, rngs=rngs)

    def fn(mdl: nn.Module, key: jax.Array | None, *a: Any) -> Any:
        return run(mdl.variables["params"], key, *a)

    def fwd(mdl: nn.Module, key: jax.Array | None, *a: Any) -> tuple[Any, tuple]:
        params = mdl.variables["params"]
        return run(params, key, *a), (params, key, a)

    def bwd(residuals: tuple, cotangent: Any) -> tuple:
        params, key, a = after(cotangent, residuals)
        _, vjp = jax.vjp(lambda p, *x: run(p, key, *x), params, *a)
        params_ct, *args_ct = vjp(cotangent)
        key_ct = None if key is None else np.zeros(key.shape, jax.dtypes.float0)
        return ({"params": params_ct}, key_ct, *args_ct)

    return nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd)(module, key, *args)


def sequence_groups(n: int, length: int, group_tokens: int) -> tuple[int, int]:
    """(groups, sequences per group) splitting n sequences of `length` steps into groups of at
    most `group_tokens` tokens (at least one sequence each), as even as possible; 0: one group."""
    if group_tokens <= 0 or n * length <= group_tokens:
        return 1, n
    groups = -(-n // max(1, group_tokens // length))
    return groups, -(-n // groups)


def sequence_pass(block: nn.Module, x: jax.Array, group_tokens: int, remat: bool) -> jax.Array:
    """block(x) for x (n, l, d) holding n independent sequences, one group of them at a time.

    Groups of at most `group_tokens` tokens run one after the other (`nn.scan`, parameters
    shared), so the pass's intermediates are those of one group, whatever the batch and
    segment length; the last group is padded with zero sequences (cut off afterwards). Each
    group's output overwrites its input in the loop's one buffer: a scan's stacked outputs would
    need a second, zero-filled buffer per pass (on XLA:CPU: a shared zero constant plus one copy
    per pass, each live from the start of the program). With `remat`, each group's forward pass
    is recomputed in the backward pass instead of kept. Returns (n, l, d).
    """
    n, l = x.shape[:2]
    groups, per = sequence_groups(n, l, group_tokens)
    call = recompute_in_backward if remat else (lambda mdl, xg: mdl(xg))
    if groups == 1:
        return call(block, x)
    buf = jnp.pad(x, [(0, groups * per - n)] + [(0, 0)] * (x.ndim - 1))
    buf = buf.reshape(groups, per, *x.shape[1:])

    def body(mdl: nn.Module, carry: tuple, _: None) -> tuple[tuple, None]:
        i, buf = carry
        y = call(mdl, jax.lax.dynamic_index_in_dim(buf, i, keepdims=False))
        return (i + 1, jax.lax.dynamic_update_index_in_dim(buf, y.astype(buf.dtype), i, 0)), None

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   length=groups)
    (_, buf), _ = scan(block, (jnp.int32(0), buf), None)
    return buf.reshape(groups * per, *x.shape[1:])[:n]


class DualPathLayer(nn.Module):
    """Sequence model along time (one sequence per band), then along bands (per frame).

    Each pass runs its sequences in groups of at most `group_tokens` tokens (`sequence_pass`).
    """

    time_mixer: SequenceConfig  # model of the time pass (Mamba2: chunk_size for ~T frames)
    band_mixer: SequenceConfig  # model of the band pass (Mamba2: chunk for K bands)
    group_tokens: int = 0  # tokens (sequences x length) per group of a pass; 0: all at once
    remat_blocks: bool = False  # recompute each block's forward (per group) in the backward
    param_dtype: Dtype = jnp.float32  # storage dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, t, k, d) -> (b, t, k, d) float32."""
        b, t, k, d = x.shape
        # Initialisation runs the plain forward: nn.scan must see the parameters' creation.
        remat = self.remat_blocks and not self.is_initializing()
        xt = jnp.transpose(x, (0, 2, 1, 3)).reshape(b * k, t, d)  # sequences over time
        time = sequence_block(self.time_mixer, self.param_dtype, "time")
        xt = sequence_pass(time, xt, self.group_tokens, remat)
        x = jnp.transpose(xt.reshape(b, k, t, d), (0, 2, 1, 3))  # (b, t, k, d)
        xk = x.reshape(b * t, k, d)  # sequences over bands
        band = sequence_block(self.band_mixer, self.param_dtype, "band")
        xk = sequence_pass(band, xk, self.group_tokens, remat)
        return xk.reshape(b, t, k, d)


def check_audio(audio: Any) -> jax.Array:
    """Validates a stereo batch (batch, 2, samples) of floats; returns it as a jax array."""
    shape = getattr(audio, "shape", None)
    dtype = getattr(audio, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"audio must be an array of shape (batch, 2, samples), got {type(audio)}")
    if len(shape) != 3 or shape[1] != 2:
        hint = " (mono or unbatched? add the missing axes)" if len(shape) < 3 or shape[1] == 1 \
            else ""
        raise ValueError(f"audio must have shape (batch, 2, samples) (stereo), got {tuple(shape)}"
                         f"{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"audio must be floating point with shape (batch, 2, samples), got dtype "
                         f"{dtype}; convert integer PCM to float in [-1, 1]")
    return jnp.asarray(audio)


class BSMamba2(nn.Module):
    """Stereo mixture waveform (b, 2, samples) -> vocal waveform (b, 2, samples), float32.

    STFT -> fold bands -> BandSplit -> depth x DualPathLayer -> L2RMSNorm -> MaskEstimator
    -> complex mask M -> iSTFT(X * M) trimmed to the input length. Fields = configs/bsmamba2.py
    get_model_config(); with mixer="transformer" the model is BS-RoFormer (configs/bsroformer.py),
    and the Mamba2 fields are unused.
    """

    dim: int = 256  # d, band token features
    depth: int = 6  # dual-path layers
    band_widths: tuple[int, ...] = ()  # F_k, bins per band; sum = n_fft // 2 + 1
    n_fft: int = 2048  # STFT size = window length
    hop_length: int = 441  # STFT hop
    expand: int = 4  # Mamba2 d_inner = expand * dim
    d_state: int = 128  # SSD state size
    headdim: int = 64  # SSD head size
    ngroups: int = 1  # B/C groups
    d_conv: int = 4  # depthwise conv kernel
    chunk_size: int = 256  # SSD chunk along time
    band_chunk_size: int = 64  # SSD chunk along bands
    mask_hidden_mult: int = 4  # mask estimator hidden = mult * dim
    mixer: str = "mamba2"  # sequence model of the passes: "mamba2" or "transformer"
    heads: int = 8  # transformer: attention heads
    dim_head: int = 48  # transformer: features per head
    ff_mult: int = 4  # transformer: feed-forward hidden = ff_mult * dim
    attn_dropout: float = 0.1  # transformer: on attention probabilities and output (train only)
    ff_dropout: float = 0.1  # transformer: inside and after the feed-forward (train only)
    attn_impl: str = "xla"  # transformer: "xla" or "cudnn" (fused GPU kernel, bf16 only)
    ssd_impl: str = "xla"  # "xla", "scan" or "pallas"
    dtype: Dtype = "float32"  # matmul / conv compute dtype (string or dtype)
    remat: str | bool = "none"  # "none", "layer" or "block": what the backward recomputes
    # Tokens per group of sequences in a dual-path pass (0: all at once). Bounds the activation
    # memory; the output does not depend on it, so a model file without it gets bounded memory.
    group_tokens: int = 16384
    param_dtype: Dtype = jnp.float32  # parameter storage dtype

    def _mixer(self, chunk_size: int, dtype: jnp.dtype) -> Mamba2Config:
        return Mamba2Config(d_model=self.dim, expand=self.expand, d_state=self.d_state,
                            headdim=self.headdim, ngroups=self.ngroups, d_conv=self.d_conv,
                            chunk_size=chunk_size, ssd_impl=self.ssd_impl, dtype=dtype)

    def _transformer(self, dtype: jnp.dtype, train: bool) -> TransformerConfig:
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"Unknown attn_impl {self.attn_impl!r}; use one of {ATTN_IMPLS}")
        if train and max(self.attn_dropout, self.ff_dropout) > 0 and not self.has_rng("dropout"):
            raise ValueError("train=True with dropout needs a 'dropout' rng: "
                             "model.apply(params, audio, train=True, rngs={'dropout': key})")
        return TransformerConfig(dim=self.dim, heads=self.heads, dim_head=self.dim_head,
                                 ff_mult=self.ff_mult, attn_dropout=self.attn_dropout,
                                 ff_dropout=self.ff_dropout, attn_impl=self.attn_impl,
                                 dtype=dtype, deterministic=not train)

    @nn.compact
    def __call__(self, audio: jax.Array, train: bool = False) -> jax.Array:
        """audio (b, 2, samples) float -> vocals (b, 2, samples) float32.

        train=True turns the transformer's dropout on (needs rngs={"dropout": key}); the
        Mamba2 model has no dropout and ignores it.
        """
        audio = check_audio(audio)
        if self.mixer not in MIXERS:
            raise ValueError(f"Unknown mixer {self.mixer!r}; use one of {MIXERS}")
        dtype = resolve_dtype(self.dtype)
        widths = tuple(int(w) for w in self.band_widths)
        bins = self.n_fft // 2 + 1
        if sum(widths) != bins:
            raise ValueError(f"band_widths sum to {sum(widths)} but n_fft={self.n_fft} gives "
                             f"{bins} bins; they must cover every bin exactly once")
        samples = audio.shape[-1]
        if samples <= self.n_fft // 2:
            raise ValueError(f"audio of shape (batch, 2, samples) needs samples > "
                             f"{self.n_fft // 2}, got {samples}")

        spec = stft(audio.astype(jnp.float32), self.n_fft, self.hop_length)  # (b, 2, f, t)
        x = BandSplit(widths, self.dim, dtype=dtype, param_dtype=self.param_dtype,
                      name="band_split")(fold_spectrum(spec))  # (b, t, k, d)
        remat = resolve_remat(self.remat)
        if self.mixer == "transformer":
            time_mixer = band_mixer = self._transformer(dtype, train)
        else:
            time_mixer = self._mixer(self.chunk_size, dtype)
            band_mixer = self._mixer(self.band_chunk_size, dtype)
        for i in range(self.depth):
            layer = DualPathLayer(time_mixer, band_mixer, group_tokens=self.group_tokens,
                                  remat_blocks=remat == "block", param_dtype=self.param_dtype,
                                  name=f"layer{i}")
            if remat == "layer" and not self.is_initializing():
                x = recompute_in_backward(layer, x)
            else:
                x = layer(x)
        x = L2RMSNorm(param_dtype=self.param_dtype, name="final_norm")(x)
        mask = MaskEstimator(widths, self.mask_hidden_mult * self.dim, dtype=dtype,
                             param_dtype=self.param_dtype, name="mask")(x)  # (b, t, 4f)
        vocals_spec = spec * unfold_mask(mask)  # complex multiply, float32
        return istft(vocals_spec, self.n_fft, self.hop_length, samples)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
