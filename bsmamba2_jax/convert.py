"""The authors' PyTorch BSMamba2 and BS-RoFormer checkpoints -> our params and model file.

    python -m bsmamba2_jax.convert IN.ckpt OUT.msgpack [--weights raw|ema]

    from bsmamba2_jax.convert import load_torch_model
    params, config, info = load_torch_model("sota_model.ckpt", weights="raw")
    model = BSMamba2(**config["model"])
    vocals = model.apply(params, audio)              # audio (batch, 2, samples) at 44.1 kHz

(`bsmamba2_jax.loading.load_model` does the same for any source, these files included.)

Two layouts are read (with `torch_checkpoint`, so PyTorch is not needed and nothing in the file
runs):
  - "lightning": the authors' training checkpoint (EuiYeonKim/BSMamba2, PyTorch Lightning):
    `state_dict` holds the raw weights under `model.` plus the STFT window buffers
    `featurizer.window` / `inverse_featurizer.window` (checked to be our periodic Hann, not
    loaded); `optimizer_states[0]["ema"]` holds the EMA weights as a tuple in
    `model.parameters()` order (NeMo's EMA optimizer wrapper).
  - "state_dict": a bare state_dict of the same model without prefix (how
    Music-Source-Separation-Training publishes its BSMamba2).
`weights="raw"` loads the state_dict (what the authors' evaluation scores); `weights="ema"` the
EMA tuple (Lightning layout only).

Two of the authors' `module_type`s are read, each one `Architecture` entry (`ARCHITECTURES`):
"mamba2" (BSMamba2) and "transformer" (BS-RoFormer, `mixer="transformer"` here). The model's
shape (dim, depth, band widths, mixer sizes, mask-estimator hidden size) is read off the tensor
shapes; what the tensors cannot tell (hop length, ngroups vs d_state, chunk sizes, dropout rates,
compute dtype) comes from the checkpoint's recorded hyper-parameters where it has them, else
from `model_config` when given, else from the paper's values. Every tensor is used exactly once
(loaded, or checked when it is a fixed value our model computes itself, such as the rotary
frequencies) and every parameter leaf of `BSMamba2` filled exactly once, or a `ConversionError`
names the first key that does not fit. docs/DESIGN.md#checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax.torch_checkpoint import (
    Placeholder,
    TorchCheckpointError,
    TorchTensor,
    read_checkpoint,
)
from bsmamba2_jax.write_guard import OutputPathError, WriteError, check_output

WEIGHTS = ("raw", "ema")
SAMPLE_RATE = 44100  # the authors' and MSST's models are 44.1 kHz
SEGMENT_SECONDS = 8.0  # the paper's inference segment
DEFAULT_HOP_LENGTH = 441  # the authors' featurizer config and MSST's config_bs_mamba2_vocals
# Fields the tensors cannot tell; used when neither the checkpoint's hyper-parameters nor a
# model_config give them (float32 compute, so a conversion reproduces the PyTorch float32
# output). Each architecture adds its own (`Architecture.run_defaults`).
RUN_DEFAULTS = {"hop_length": DEFAULT_HOP_LENGTH, "dtype": "float32", "remat": "none",
                "group_tokens": 16384}
MAMBA2_RUN_DEFAULTS = {"ngroups": 1, "chunk_size": 256, "band_chunk_size": 64, "ssd_impl": "xla"}
FIELD_ORDER = ("dim", "depth", "band_widths", "n_fft", "hop_length", "expand", "d_state",
               "headdim", "ngroups", "d_conv", "chunk_size", "band_chunk_size", "mask_hidden_mult",
               "mixer", "heads", "dim_head", "ff_mult", "attn_dropout", "ff_dropout", "attn_impl",
               "ssd_impl", "dtype", "remat", "group_tokens")
LIGHTNING_BUFFERS = ("featurizer.window", "inverse_featurizer.window")


class ConversionError(ValueError):
    """The checkpoint does not fit BSMamba2 (or the given config); the message names the key."""


# --- the known releases --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Release:
    """A published checkpoint, recognised by size, then sha256."""

    name: str  # what we print
    file_name: str  # as published
    size: int  # bytes
    sha256: str
    layout: str  # "lightning" or "state_dict"
    where: str  # where users get it (this project never downloads anything)
    licence: str  # as stated by the publisher
    scores: str  # as published


RELEASES = (
    Release(
        name="BSMamba2, the authors' model (Kim & Choi)",
        file_name="sota_model.ckpt", size=770_628_060,
        sha256="b1fcf93fdd6f7bc79e5410b1330b3d0fd5a6ca6ea23a94730c684629c71cd5ca",
        layout="lightning",
        where="https://github.com/EuiYeonKim/BSMamba2 README, 'Pretrained Weights' table, row "
              "bsmamba2 (Google Drive: https://drive.google.com/file/d/"
              "1W-IX8I5B2g-8JA5Zaf-HkUul0MpOEBaZ/view)",
        licence="MIT as stated for the project in the repository README ('This project is "
                "licensed under the MIT License'); no separate statement for the weights",
        scores="cSDR 11.03 / uSDR 10.70 dB on MUSDB18-HQ test (vocals)"),
    Release(
        name="BSMamba2 vocals of Music-Source-Separation-Training v1.0.19 (ZFTurbo)",
        file_name="bs_mamba2_vocals.ckpt", size=192_610_602,
        sha256="fceb733b41742abb8df563092f4cb5bbc9243c6c03e7f34dc44c14e60732c72f",
        layout="state_dict",
        where="https://github.com/ZFTurbo/Music-Source-Separation-Training/releases/download/"
              "v1.0.19/bs_mamba2_vocals.ckpt (listed in docs/pretrained_models.md, with "
              "config_bs_mamba2_vocals.yaml; trained on MUSDB18 only)",
        licence="not stated for the weights (the repository's code is MIT-licensed)",
        scores="SDR vocals 8.82 on the Multisong dataset (as published)"),
)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed in `chunk`-byte reads."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    return sha256_file(path)


def identify_release(path: str | Path) -> tuple[Release | None, str | None, str]:
    """(release or None, sha256 if it was computed, a one-line note).

    Only a file with a known release's size is hashed, so other files cost nothing; a file is
    hashed once per process while its size and modification time stay (fine-tuning reads the
    raw and the EMA weights of one file).
    """
    stat = Path(path).stat()
    same_size = [r for r in RELEASES if r.size == stat.st_size]
    if not same_size:
        return None, None, "not a known release (no published file has its size)"
    digest = _cached_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    for r in same_size:
        if r.sha256 == digest:
            return r, digest, f"{r.name}: {r.file_name}, sha256 verified"
    names = ", ".join(r.file_name for r in same_size)
    return None, digest, (f"has the size of {names} but another sha256 ({digest[:12]}...): not "
                          "the published file (another checkpoint, or a damaged download)")


# --- what a checkpoint holds ---------------------------------------------------------------------

@dataclasses.dataclass
class TorchWeights:
    """The model tensors of a checkpoint, not yet read."""

    layout: str  # "lightning" or "state_dict"
    tensors: dict[str, TorchTensor]  # the model's state_dict without prefix, in file order
    buffers: dict[str, TorchTensor]  # Lightning state_dict entries outside the model
    ema: tuple | None  # optimizer_states[0]["ema"], or None
    meta: dict  # epoch, global_step, ema_step, ema_decay, hyper_parameters (plain)


def plain_hparams(x: Any, depth: int = 0) -> Any:
    """omegaconf containers (loaded as placeholders) -> plain dicts/lists, best effort.

    A DictConfig/ListConfig keeps its children in state["_content"], a value node its value in
    state["_val"], a dict subclass its items; anything else unknown becomes its placeholder's
    name. Deeper than 32 levels
    (or a cycle) becomes "<...>".
    """
    if depth > 32:
        return "<...>"
    if isinstance(x, Placeholder):
        state = x.state if isinstance(x.state, dict) else {}
        if "_content" in state:
            return plain_hparams(state["_content"], depth + 1)
        if "_val" in state:
            return plain_hparams(state["_val"], depth + 1)
        if x.items:  # a dict subclass, e.g. Lightning's AttributeDict
            return plain_hparams(x.items, depth + 1)
        return f"<{x.global_name}>"
    if isinstance(x, Mapping):
        return {str(k): plain_hparams(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_hparams(v, depth + 1) for v in x]
    if isinstance(x, TorchTensor):
        return f"<tensor {x.shape} {x.dtype}>"
    return x


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and len(x) > 0 and all(
        isinstance(k, str) and isinstance(v, TorchTensor) for k, v in x.items())


def split_layout(root: Any, path: Path) -> TorchWeights:
    """Finds the model tensors, buffers and EMA tuple in an unpickled checkpoint."""
    if isinstance(root, Mapping) and _is_state_dict(root.get("state_dict")):
        sd = root["state_dict"]
        tensors = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        buffers = {k: v for k, v in sd.items() if not k.startswith("model.")}
        if not tensors:
            raise ConversionError(f"{path}: its state_dict has no 'model.' entries (keys: "
                                  f"{_some(sd)}); expected the authors' Lightning checkpoint")
        ema, meta = None, {}
        opt = root.get("optimizer_states")
        if isinstance(opt, (list, tuple)) and opt and isinstance(opt[0], Mapping):
            if "ema" in opt[0]:
                ema = opt[0]["ema"]
                meta["ema_step"] = opt[0].get("current_step")
                meta["ema_decay"] = opt[0].get("decay")
        for k in ("epoch", "global_step"):
            if isinstance(root.get(k), int):
                meta[k] = root[k]
        hp = root.get("hyper_parameters")
        if hp is not None:
            meta["hyper_parameters"] = plain_hparams(hp)
        return TorchWeights("lightning", tensors, buffers, ema, meta)
    if _is_state_dict(root):
        return TorchWeights("state_dict", dict(root), {}, None, {})
    keys = list(root)[:8] if isinstance(root, Mapping) else type(root).__name__
    raise ConversionError(
        f"{path}: neither a Lightning checkpoint (a 'state_dict' of tensors) nor a bare "
        f"state_dict (found {keys}); expected the authors' sota_model.ckpt layout or a "
        "state_dict of their BSModel")


def _some(keys: Any, n: int = 5) -> str:
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --- mapping rules -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """One leaf of our params from one torch tensor, or from several stacked on a new axis 0.

    `shape` is what each torch tensor must have; `layout` turns it into our layout. A rule with
    `path=None` loads nothing: its tensor is a fixed value that our model computes itself (e.g.
    rotary frequencies), and `check(array)` raises ConversionError if it is not that value.
    """

    path: tuple[str, ...] | None  # leaf path under params["params"]; None: check only
    keys: tuple[str, ...]  # torch names (several: one per band of a group, stacked)
    shape: tuple[int, ...]  # expected torch shape of each
    layout: Callable[[np.ndarray], np.ndarray] = lambda a: a
    stack: bool = False  # stack the tensors of `keys` on a new axis 0
    check: Callable[[np.ndarray], None] | None = None  # for path=None


def linear_t(a: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> our kernel (in, out)."""
    return a.T


def conv_transpose_k1(a: np.ndarray) -> np.ndarray:
    """torch ConvTranspose1d(kernel 1) weight (in, out, 1) -> our kernel (in, out)."""
    return a[:, :, 0]


def depthwise_conv(a: np.ndarray) -> np.ndarray:
    """torch depthwise Conv1d weight (c, 1, K) -> ours (K, c); tap K-1 is the current step."""
    return a[:, 0, :].T


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one authors' `module_type` maps onto our dual-path layers.

    infer(shapes, dim, model_config) -> (fields, evidence): BSMamba2 fields read off the shapes
      of `layers.*` (evidence: field -> the torch key it came from).
    layer_rules(i, config) -> rules of dual-path layer i (torch keys without the `model.` prefix;
      tensors our model computes itself get check-only rules, `Rule(path=None, check=...)`).
    outside_parameters(key) -> True for state_dict entries that `model.parameters()` does not
      yield (buffers, and the later appearances of a module shared between layers), which are
      therefore not in the EMA tuple.
    """

    name: str  # the authors' module_type; also our `mixer` value
    title: str  # what we print
    marker: str  # a key of layer 0 that only this architecture has
    infer: Callable[[Mapping[str, tuple], int, Mapping], tuple[dict, dict]]
    layer_rules: Callable[[int, Mapping], list[Rule]]
    outside_parameters: Callable[[str], bool] = lambda key: False
    run_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hparams: tuple[str, ...] = ()  # fields read from the authors' model config when recorded


def _mamba2_infer(shapes: Mapping[str, tuple], dim: int,
                  model_config: Mapping) -> tuple[dict, dict]:
    p = "layers.0.0.forward_blocks.0.mixer."
    need = ("out_proj.weight", "dt_bias", "conv1d.weight", "in_proj.weight")
    for k in need:
        if p + k not in shapes:
            raise ConversionError(f"missing key {p + k}: not the authors' Mamba2 layer layout")
    out_proj, conv = shapes[p + "out_proj.weight"], shapes[p + "conv1d.weight"]
    heads = shapes[p + "dt_bias"][0]
    e = out_proj[1]
    if len(conv) != 3 or conv[1] != 1:
        raise ConversionError(f"{p}conv1d.weight has shape {conv}, expected a depthwise "
                              "(channels, 1, kernel) Conv1d")
    conv_dim, _, d_conv = conv
    checks = [(e % dim == 0, f"{p}out_proj.weight {out_proj}: d_inner {e} is not a multiple "
                             f"of dim {dim}"),
              (e % heads == 0, f"{p}dt_bias: {heads} heads do not divide d_inner {e}"),
              (conv_dim > e and (conv_dim - e) % 2 == 0,
               f"{p}conv1d.weight {conv}: {conv_dim} channels is not d_inner {e} + 2 x "
               "ngroups x d_state")]
    for ok, msg in checks:
        if not ok:
            raise ConversionError(msg)
    gn = (conv_dim - e) // 2  # ngroups * d_state: the tensors cannot tell them apart
    ngroups = int(model_config.get("ngroups", MAMBA2_RUN_DEFAULTS["ngroups"]))
    if gn % ngroups:
        raise ConversionError(f"{p}conv1d.weight {conv}: ngroups x d_state = {gn} is not a "
                              f"multiple of the config's ngroups={ngroups}")
    fields = {"expand": e // dim, "headdim": e // heads, "d_state": gn // ngroups,
              "ngroups": ngroups, "d_conv": d_conv}
    evidence = {"expand": p + "out_proj.weight", "headdim": p + "dt_bias",
                "d_state": p + "conv1d.weight", "d_conv": p + "conv1d.weight"}
    return fields, evidence


def _mamba2_direction(src: str, dst: tuple[str, ...], c: Mapping) -> list[Rule]:
    """One direction (Block: pre-norm + mamba_ssm Mamba2) of a bidirectional block."""
    d = c["dim"]
    e = c["expand"] * d
    h = e // c["headdim"]
    gn = c["ngroups"] * c["d_state"]
    m = src + "mixer."
    mx = dst + ("mixer",)
    return [
        Rule(dst + ("norm", "weight"), (src + "norm.weight",), (d,)),
        Rule(mx + ("dt_bias",), (m + "dt_bias",), (h,)),
        Rule(mx + ("A_log",), (m + "A_log",), (h,)),
        Rule(mx + ("D",), (m + "D",), (h,)),
        Rule(mx + ("in_proj", "kernel"), (m + "in_proj.weight",), (2 * e + 2 * gn + h, d),
             linear_t),
        Rule(mx + ("conv_weight",), (m + "conv1d.weight",), (e + 2 * gn, 1, c["d_conv"]),
             depthwise_conv),
        Rule(mx + ("conv_bias",), (m + "conv1d.bias",), (e + 2 * gn,)),
        Rule(mx + ("norm", "weight"), (m + "norm.weight",), (e,)),
        Rule(mx + ("out_proj", "kernel"), (m + "out_proj.weight",), (d, e), linear_t),
    ]


def _mamba2_layer_rules(i: int, c: Mapping) -> list[Rule]:
    d = c["dim"]
    rules = []
    # layers.i.0 runs along time, layers.i.1 along bands (the authors' BSModel.forward).
    for j, axis in enumerate(("time", "band")):
        src, dst = f"layers.{i}.{j}.", (f"layer{i}", axis)
        rules += _mamba2_direction(src + "forward_blocks.0.", dst + ("forward",), c)
        rules += _mamba2_direction(src + "backward_blocks.0.", dst + ("backward",), c)
        # The merge is a ConvTranspose1d(2d -> d, kernel 1) over concat(forward, backward).
        rules += [Rule(dst + ("merge", "kernel"), (src + "linear.weight",), (2 * d, d, 1),
                       conv_transpose_k1),
                  Rule(dst + ("merge", "bias"), (src + "linear.bias",), (d,))]
    return rules


# --- BS-RoFormer (module_type "transformer") ------------------------------------------------------

# One pass of the authors' BSModel(module_type="transformer") is `Transformer(depth=1)`:
# `layers.L.j.layers.0.0` its Attention, `layers.L.j.layers.0.1` its FeedForward (j = 0: time,
# j = 1: bands); bandsplitmodel.yaml sets time_module_depth = freq_module_depth = 1.
_INNER_DEPTH = re.compile(r"layers\.(\d+)\.([01])\.layers\.([1-9]\d*)\.")
_ROTARY = re.compile(r"layers\.([1-9]\d*)\.[01]\.layers\.0\.0\.rotary_embed\.freqs")


def _transformer_infer(shapes: Mapping[str, tuple], dim: int,
                       model_config: Mapping) -> tuple[dict, dict]:
    deeper = next((k for k in shapes if _INNER_DEPTH.match(k)), None)
    if deeper is not None:
        m = _INNER_DEPTH.match(deeper)
        raise ConversionError(
            f"{deeper}: the {('time', 'band')[int(m.group(2))]} transformer of layer "
            f"{m.group(1)} has more than one attention + feed-forward layer "
            "(time_module_depth / freq_module_depth > 1); BS-RoFormer here has one per pass, as "
            "the authors' bandsplitmodel.yaml")
    p = "layers.0.0.layers.0."
    for k in ("0.to_qkv.weight", "0.to_gates.weight", "1.net.1.weight"):
        if p + k not in shapes:
            raise ConversionError(f"missing key {p + k}: not the authors' transformer layer "
                                  "layout")
    qkv, gates, hidden = (shapes[p + k] for k in ("0.to_qkv.weight", "0.to_gates.weight",
                                                  "1.net.1.weight"))
    heads = gates[0]
    if heads < 1 or qkv[0] % (3 * heads):
        raise ConversionError(f"{p}0.to_qkv.weight {qkv}: {qkv[0]} rows are not 3 x heads "
                              f"({heads}, from {p}0.to_gates.weight) x dim_head")
    if (qkv[0] // (3 * heads)) % 2:
        raise ConversionError(f"{p}0.to_qkv.weight {qkv}: dim_head {qkv[0] // (3 * heads)} is "
                              "odd; rotary embeddings rotate feature pairs")
    if hidden[0] % dim:
        raise ConversionError(f"{p}1.net.1.weight {hidden}: feed-forward size {hidden[0]} is "
                              f"not a multiple of dim {dim}")
    fields = {"mixer": "transformer", "heads": heads, "dim_head": qkv[0] // (3 * heads),
              "ff_mult": hidden[0] // dim}
    evidence = {"mixer": p + "0.to_qkv.weight", "heads": p + "0.to_gates.weight",
                "dim_head": p + "0.to_qkv.weight", "ff_mult": p + "1.net.1.weight"}
    return fields, evidence


def _rotary_check(key: str, dim_head: int) -> Callable[[np.ndarray], None]:
    """Check of a `rotary_embed.freqs` tensor: rotary-embedding-torch's default frequencies.

    rtol 1e-6: PyTorch's float32 pow differs from our float64-then-rounded values by an ulp.
    """
    from bsmamba2_jax.roformer import rotary_frequencies

    want = rotary_frequencies(dim_head)

    def check(a: np.ndarray) -> None:
        if a.shape != want.shape or not np.allclose(a, want, rtol=1e-6, atol=0.0):
            diff = (float(np.max(np.abs(a / want - 1.0))) if a.shape == want.shape
                    else f"shape {a.shape}")
            raise ConversionError(
                f"{key} is not 10000^(-2i/{dim_head}), rotary-embedding-torch's default "
                f"frequencies (max relative difference {diff}); this model computes those "
                "and cannot take other rotary settings (theta, freqs_for, learned_freq)")
    return check


def _transformer_direction(src: str, dst: tuple[str, ...], c: Mapping) -> list[Rule]:
    """One pass (time or bands): attention `src`0.*, feed-forward `src`1.*."""
    d, h, e = c["dim"], c["heads"], c["dim_head"]
    hidden = c["ff_mult"] * d
    a, f = src + "0.", src + "1.net."
    at, ff = dst + ("attn",), dst + ("ff",)
    return [
        Rule(None, (a + "rotary_embed.freqs",), (e // 2,),
             check=_rotary_check(a + "rotary_embed.freqs", e)),
        Rule(at + ("norm", "gamma"), (a + "norm.gamma",), (d,)),
        # Rows ordered (qkv, head, feature), as our to_qkv kernel's columns.
        Rule(at + ("to_qkv", "kernel"), (a + "to_qkv.weight",), (3 * h * e, d), linear_t),
        Rule(at + ("to_gates", "kernel"), (a + "to_gates.weight",), (h, d), linear_t),
        Rule(at + ("to_gates", "bias"), (a + "to_gates.bias",), (h,)),
        Rule(at + ("to_out", "kernel"), (a + "to_out.0.weight",), (d, h * e), linear_t),
        # FeedForward.net = Sequential(RMSNorm, Linear, GELU, Dropout, Linear, Dropout).
        Rule(ff + ("norm", "gamma"), (f + "0.gamma",), (d,)),
        Rule(ff + ("hidden", "kernel"), (f + "1.weight",), (hidden, d), linear_t),
        Rule(ff + ("hidden", "bias"), (f + "1.bias",), (hidden,)),
        Rule(ff + ("out", "kernel"), (f + "4.weight",), (d, hidden), linear_t),
        Rule(ff + ("out", "bias"), (f + "4.bias",), (d,)),
    ]


def _transformer_layer_rules(i: int, c: Mapping) -> list[Rule]:
    rules = []
    for j, axis in enumerate(("time", "band")):
        rules += _transformer_direction(f"layers.{i}.{j}.layers.0.", (f"layer{i}", axis), c)
    return rules


def _shared_rotary(key: str) -> bool:
    # BSModel builds one RotaryEmbedding for all time transformers and one for all band ones:
    # its `freqs` (a Parameter with requires_grad=False) is in every layer's state_dict but
    # yielded once by model.parameters(), at layer 0, so only there in the EMA tuple.
    return _ROTARY.fullmatch(key) is not None


ARCHITECTURES = {
    "mamba2": Architecture("mamba2", "BSMamba2", "layers.0.0.forward_blocks.0.mixer.dt_bias",
                           _mamba2_infer, _mamba2_layer_rules,
                           run_defaults=MAMBA2_RUN_DEFAULTS),
    "transformer": Architecture(
        "transformer", "BS-RoFormer", "layers.0.0.layers.0.0.to_qkv.weight",
        _transformer_infer, _transformer_layer_rules, outside_parameters=_shared_rotary,
        # Not in the weights: the authors' bandsplitmodel.yaml values (training only).
        run_defaults={"attn_dropout": 0.1, "ff_dropout": 0.1, "attn_impl": "xla"},
        hparams=("attn_dropout", "ff_dropout")),
}


def _common_rules(c: Mapping) -> list[Rule]:
    """Band split, final norm and the (single) mask estimator: the same for every mixer."""
    from bsmamba2_jax.model import band_groups

    d, hidden = c["dim"], c["mask_hidden_mult"] * c["dim"]
    rules = [Rule(("final_norm", "gamma"), ("final_norm.gamma",), (d,))]
    k0 = 0
    for gi, (m, w) in enumerate(band_groups(tuple(c["band_widths"]))):
        ks = range(k0, k0 + m)
        k0 += m
        bs = tuple(f"band_split.to_features.{k}." for k in ks)
        me = tuple(f"mask_estimators.0.to_freqs.{k}.0." for k in ks)
        rules += [
            Rule(("band_split", f"norm{gi}"), tuple(b + "0.gamma" for b in bs), (4 * w,),
                 stack=True),
            Rule(("band_split", f"proj{gi}", "kernel"), tuple(b + "1.weight" for b in bs),
                 (d, 4 * w), linear_t, stack=True),
            Rule(("band_split", f"proj{gi}", "bias"), tuple(b + "1.bias" for b in bs), (d,),
                 stack=True),
            # MLP(d -> hidden -> 8w) = Sequential(Linear, Tanh, Linear) at indices 0 and 2.
            Rule(("mask", f"hidden{gi}", "kernel"), tuple(x + "0.weight" for x in me),
                 (hidden, d), linear_t, stack=True),
            Rule(("mask", f"hidden{gi}", "bias"), tuple(x + "0.bias" for x in me), (hidden,),
                 stack=True),
            Rule(("mask", f"out{gi}", "kernel"), tuple(x + "2.weight" for x in me),
                 (8 * w, hidden), linear_t, stack=True),
            Rule(("mask", f"out{gi}", "bias"), tuple(x + "2.bias" for x in me), (8 * w,),
                 stack=True),
        ]
    return rules


def conversion_rules(config: Mapping, architecture: str = "mamba2") -> list[Rule]:
    """Every leaf of BSMamba2(**config) with the torch tensors it is made of."""
    arch = ARCHITECTURES[architecture]
    rules = _common_rules(config)
    for i in range(config["depth"]):
        rules += arch.layer_rules(i, config)
    return rules


# --- shape inference -----------------------------------------------------------------------------

def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    """How many consecutive indices n from 0 have a key matching pattern.format(n)."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in shapes):
        n += 1
    return n


def infer_model_config(shapes: Mapping[str, tuple],
                       model_config: Mapping | None = None) -> tuple[dict, str, dict]:
    """BSMamba2 fields read off the torch shapes (model keys without prefix).

    Returns (fields, architecture name, evidence: field -> torch key it was read from).
    """
    model_config = model_config or {}
    for key in ("band_split.to_features.0.0.gamma", "final_norm.gamma",
                "mask_estimators.0.to_freqs.0.0.0.weight"):
        if key not in shapes:
            raise ConversionError(f"missing key {key}: not a state_dict of the authors' BSModel "
                                  f"(keys start with {_some(shapes)})")
    arch = [a for a in ARCHITECTURES.values() if a.marker in shapes]
    if not arch:
        raise ConversionError(
            f"layer 0 ({_some(k for k in shapes if k.startswith('layers.0.'))}) matches no "
            f"known module_type ({', '.join(ARCHITECTURES)})")
    arch = arch[0]
    dim = shapes["final_norm.gamma"][0]
    bands = _count(shapes, "band_split.to_features.{}.")
    dims_in = [shapes[f"band_split.to_features.{k}.0.gamma"][0] for k in range(bands)]
    odd = [k for k, x in enumerate(dims_in) if x % 4]
    if odd:
        raise ConversionError(
            f"band_split.to_features.{odd[0]}.0.gamma has {dims_in[odd[0]]} features, not "
            "4 x bins (stereo x complex): a mono (stereo=False) model, which BSMamba2 does not "
            "support")
    widths = tuple(x // 4 for x in dims_in)
    bins = sum(widths)
    stems = _count(shapes, "mask_estimators.{}.")
    if stems != 1:
        raise ConversionError(f"mask_estimators.0 .. {stems - 1}: {stems} stems; BSMamba2 "
                              "estimates one (vocals)")
    mlp = "mask_estimators.0.to_freqs.0.0.{}.weight"
    mlp_re = re.compile(r"mask_estimators\.0\.to_freqs\.0\.0\.(\d+)\.weight")
    linears = sorted(int(m.group(1)) for k in shapes if (m := mlp_re.fullmatch(k)))
    if linears != [0, 2]:
        raise ConversionError(f"mask_estimators.0.to_freqs.0.0: a mask-estimator MLP of depth "
                              f"{len(linears)} (Linear layers at {linears}); BSMamba2 has depth 2 "
                              "(Linear, Tanh, Linear)")
    hidden = shapes[mlp.format(0)][0]
    if hidden % dim:
        raise ConversionError(f"{mlp.format(0)} {shapes[mlp.format(0)]}: hidden size {hidden} is "
                              f"not a multiple of dim {dim}")
    fields = {"dim": dim, "depth": _count(shapes, "layers.{}."), "band_widths": widths,
              "n_fft": 2 * (bins - 1), "mask_hidden_mult": hidden // dim}
    evidence = {"dim": "final_norm.gamma", "depth": "layers.N", "band_widths":
                "band_split.to_features.N.0.gamma", "n_fft": "band_split.to_features.N.0.gamma",
                "mask_hidden_mult": mlp.format(0)}
    more, more_evidence = arch.infer(shapes, dim, model_config)
    fields.update(more)
    evidence.update(more_evidence)
    return fields, arch.name, evidence


def resolve_config(inferred: Mapping, evidence: Mapping, model_config: Mapping | None,
                   architecture: str = "mamba2", recorded: Mapping | None = None) -> dict:
    """The BSMamba2 kwargs: inferred fields, checked against model_config, plus run fields.

    Lowest to highest precedence: RUN_DEFAULTS, the architecture's run_defaults, `recorded`
    (training-only fields the checkpoint's hyper-parameters hold, e.g. dropout rates),
    model_config, and the inferred fields, which model_config must agree with.
    """
    arch = ARCHITECTURES[architecture]
    config = {**RUN_DEFAULTS, **arch.run_defaults, **(recorded or {})}
    if model_config:
        given = model_config.get("mixer", "mamba2")  # BSMamba2's default
        if given != arch.name:
            raise ConversionError(
                f"mixer: the checkpoint is a {arch.title} model (module_type {arch.name!r}, "
                f"from {arch.marker}), the model config says mixer={given!r}")
        for field, value in inferred.items():
            if field in model_config and _norm(model_config[field]) != _norm(value):
                raise ConversionError(
                    f"{field}: the checkpoint has {value} (from {evidence.get(field, field)}), "
                    f"the model config says {model_config[field]}")
        config.update({k: _norm(v) for k, v in model_config.items()})
    config.update(inferred)
    order = [f for f in FIELD_ORDER if f in config]  # as configs/bsmamba2.py lists them
    return {k: config[k] for k in order + [k for k in config if k not in FIELD_ORDER]}


def _norm(v: Any) -> Any:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v


def _plain_config(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"model_config must be a dict or ConfigDict of BSMamba2 fields, got "
                        f"{type(config).__name__}")
    return dict(config.get("model", config))


# --- checks and assembly -------------------------------------------------------------------------

def check_tensors(rules: list[Rule], shapes: Mapping[str, tuple], config: Mapping) -> None:
    """Each torch key used by exactly one rule with the expected shape; no key left over."""
    wanted: dict[str, tuple] = {}
    for r in rules:
        for k in r.keys:
            if k in wanted:
                raise AssertionError(f"mapping bug: {k} used twice")
            wanted[k] = r.shape
    summary = ", ".join(f"{f}={config[f]}" for f in ("dim", "depth", "expand", "d_state",
                                                     "headdim", "ngroups", "d_conv")
                        if f in config)
    for k, shape in shapes.items():  # file order: the first misfit is named
        if k in wanted and tuple(shape) != wanted[k]:
            raise ConversionError(f"{k} has shape {tuple(shape)}, expected {wanted[k]} for "
                                  f"BSMamba2({summary})")
    missing = [k for k in wanted if k not in shapes]
    if missing:
        raise ConversionError(f"{missing[0]} is missing from the checkpoint (expected for "
                              f"BSMamba2({summary}); {len(missing)} missing in all)")
    extra = [k for k in shapes if k not in wanted]
    if extra:
        raise ConversionError(f"{len(extra)} tensors of the checkpoint have no place in "
                              f"BSMamba2({summary}): {_some(extra)}")


def expected_leaves(config: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Leaf path -> shape of BSMamba2(**config).init, without computing anything."""
    from bsmamba2_jax.model import BSMamba2

    # The parameters do not depend on how the scan runs: trace the plain jnp path.
    return dict(_leaf_shapes(BSMamba2(**{**config, "ssd_impl": "xla", "attn_impl": "xla",
                                         "remat": "none"})))


@functools.lru_cache(maxsize=4)
def _leaf_shapes(model: Any) -> tuple:
    import jax
    import jax.numpy as jnp

    # Tracing the paper model's init takes ~1 s of CPU; converting raw and EMA weights of one
    # file (fine-tuning needs both) traces it once.
    audio = jax.ShapeDtypeStruct((1, 2, model.n_fft + 1), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), audio)
    return tuple((tuple(p.key for p in path), tuple(leaf.shape))
                 for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])


def check_leaves(rules: list[Rule], config: Mapping) -> None:
    """Each parameter leaf of BSMamba2(**config) filled by exactly one rule, with its shape."""
    leaves = expected_leaves(config)
    made: dict[tuple[str, ...], tuple[int, ...]] = {}
    for r in rules:
        if r.path is None:
            continue
        path = ("params",) + r.path
        if path in made:
            raise AssertionError(f"mapping bug: leaf {'/'.join(path)} filled twice")
        one = r.layout(np.zeros(r.shape, np.float32)).shape
        made[path] = ((len(r.keys),) if r.stack else ()) + tuple(one)
    missing = [p for p in leaves if p not in made]
    extra = [p for p in made if p not in leaves]
    wrong = [p for p in made if p in leaves and made[p] != leaves[p]]
    if missing or extra or wrong:
        raise ConversionError(
            "the mapping does not fit BSMamba2's parameters: "
            f"unfilled {_some('/'.join(p) for p in missing)}; "
            f"unknown {_some('/'.join(p) for p in extra)}; "
            f"wrong shape {_some(f'{chr(47).join(p)} {made[p]} vs {leaves[p]}' for p in wrong)}")


def build_params(rules: list[Rule], tensors: Mapping[str, TorchTensor]) -> dict:
    """{"params": nested dict of float32 arrays}, reading each tensor's bytes once."""
    out: dict = {}
    for r in rules:
        arrays = []
        for k in r.keys:
            t = tensors[k]
            if not (t.dtype.startswith("float") or t.dtype == "bfloat16"):
                raise ConversionError(f"{k} is {t.dtype}, expected a floating-point weight")
            arrays.append(r.layout(t.numpy().astype(np.float32, copy=False)))
        leaf = np.stack(arrays) if r.stack else arrays[0]
        if r.path is None:
            r.check(leaf)
            continue
        node = out
        for name in r.path[:-1]:
            node = node.setdefault(name, {})
        node[r.path[-1]] = np.ascontiguousarray(leaf, dtype=np.float32)
    return {"params": out}


def check_window(name: str, tensor: TorchTensor, n_fft: int) -> None:
    """The authors' STFT window buffers must be the periodic Hann of n_fft our STFT uses."""
    from bsmamba2_jax.audio import hann_window

    w = tensor.numpy().astype(np.float64)
    want = hann_window(n_fft).astype(np.float64)
    if w.shape != want.shape or not np.allclose(w, want, atol=1e-6):
        kind = ("a symmetric Hann" if w.shape == want.shape and np.allclose(
            w, np.hanning(n_fft), atol=1e-6) else f"shape {w.shape}, not a periodic Hann")
        raise ConversionError(f"{name} is {kind} window; this model's STFT uses the periodic "
                              f"Hann of n_fft={n_fft} (torch.hann_window), so the weights would "
                              "not fit it")


def ema_tensors(weights: TorchWeights, arch: str, path: Path) -> dict[str, TorchTensor]:
    """The EMA tuple named by the model's parameter names: state_dict order, without the entries
    model.parameters() does not yield (`Architecture.outside_parameters`)."""
    if weights.ema is None:
        what = ("a bare state_dict" if weights.layout == "state_dict" else
                "a Lightning checkpoint whose optimizer_states[0] has no 'ema' entry")
        raise ConversionError(f"{path} has no EMA weights ({what}); use weights='raw' "
                              "(--weights raw)")
    outside = ARCHITECTURES[arch].outside_parameters
    names = [k for k in weights.tensors if not outside(k)]
    ema = weights.ema
    if not isinstance(ema, (list, tuple)) or len(ema) != len(names):
        n = len(ema) if isinstance(ema, (list, tuple)) else type(ema).__name__
        raise ConversionError(f"{path}: optimizer_states[0]['ema'] holds {n} entries, the "
                              f"model has {len(names)} parameters; it does not belong to this "
                              "state_dict")
    for i, (name, t) in enumerate(zip(names, ema, strict=True)):
        if not isinstance(t, TorchTensor) or t.shape != weights.tensors[name].shape:
            got = t.shape if isinstance(t, TorchTensor) else type(t).__name__
            raise ConversionError(f"{path}: optimizer_states[0]['ema'][{i}] has shape {got}, "
                                  f"parameter {i} ({name}) has {weights.tensors[name].shape}; "
                                  "the EMA tuple is not in model.parameters() order")
    return dict(zip(names, ema, strict=True))


def load_torch_model(path: str | Path, weights: str = "raw", model_config: Any = None,
                     identify: bool = True) -> tuple[dict, dict, dict]:
    """Reads an authors'-layout BSMamba2 or BS-RoFormer checkpoint into this project's params.

    Args:
      path: a torch.save file: the authors' Lightning checkpoint or a bare state_dict, of their
        BSModel with module_type "mamba2" or "transformer".
      weights: "raw" (the state_dict) or "ema" (optimizer_states[0]["ema"], Lightning only).
      model_config: BSMamba2 fields (dict or ConfigDict, or a run config with a "model"
        section) to check the checkpoint against; its non-shape fields (hop_length, ngroups,
        chunk sizes, dropout rates, ssd_impl, attn_impl, dtype, remat, group_tokens) are used.
        None: read everything off the tensors and the checkpoint's recorded hyper-parameters.
      identify: recognise the known releases (size, then a streamed sha256).
    Returns:
      (params, config, info): params {"params": ...} of float32 np.ndarray for
      `BSMamba2(**config["model"]).apply`; config the model-file dict {"model": {...},
      "sample_rate": 44100, "segment_seconds": 8.0}; info what was loaded (release, layout,
      weights, architecture, epoch, global_step, ...; `describe(info)` prints it).
    Raises:
      ConversionError, TorchCheckpointError (both ValueError), FileNotFoundError.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"Unknown weights {weights!r}; use 'raw' or 'ema'")
    path = Path(path)
    release, digest, note = identify_release(path) if identify else (None, None, "not checked")
    given = _plain_config(model_config)
    with read_checkpoint(path) as ckpt:
        tw = split_layout(ckpt.root, path)
        shapes = {k: t.shape for k, t in tw.tensors.items()}
        try:
            inferred, arch, evidence = infer_model_config(shapes, given)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
        hparams = tw.meta.get("hyper_parameters") or {}
        module_type = _hparam(hparams, ("model", "module_type"))
        if module_type is not None and module_type != arch:
            raise ConversionError(f"{path}: hyper_parameters say module_type={module_type!r} but "
                                  f"the tensors are a {arch!r} model")
        hop = _hparam(hparams, ("featurizer", "direct_transform", "hop_length"))
        if isinstance(hop, int):  # not in the weights, but the authors' config records it
            inferred["hop_length"] = hop
            evidence["hop_length"] = "hyper_parameters featurizer.direct_transform"
        recorded = {f: v for f in ARCHITECTURES[arch].hparams
                    if isinstance(v := _hparam(hparams, ("model", f)), (int, float))
                    and not isinstance(v, bool)}
        config = resolve_config(inferred, evidence, given, arch, recorded)
        rules = conversion_rules(config, arch)
        try:
            check_tensors(rules, shapes, config)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
        check_leaves(rules, config)
        for name in LIGHTNING_BUFFERS:
            if name in tw.buffers:
                check_window(name, tw.buffers.pop(name), config["n_fft"])
        if tw.buffers:
            raise ConversionError(f"{path}: state_dict entries outside 'model.' that this "
                                  f"converter does not know: {_some(tw.buffers)}")
        if weights == "raw":
            source = tw.tensors
        else:
            # Fixed tensors outside the EMA tuple (a shared module's later appearances) are
            # only checked: their state_dict copies serve.
            ema = ema_tensors(tw, arch, path)
            fixed = {k for r in rules if r.path is None for k in r.keys if k not in ema}
            source = {**{k: tw.tensors[k] for k in fixed}, **ema}
        params = build_params(rules, source)
    info = {
        "file": path.name, "size": path.stat().st_size, "sha256": digest,
        "release": release.name if release else None, "release_note": note,
        "layout": tw.layout, "weights": weights, "architecture": arch,
        "params": int(sum(a.size for a in _leaves(params))),
        **{k: v for k, v in tw.meta.items() if k != "hyper_parameters" and v is not None},
    }
    model_file_config = {"model": config, "sample_rate": SAMPLE_RATE,
                         "segment_seconds": SEGMENT_SECONDS}
    return params, model_file_config, info


def _leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, Mapping):
        return [a for v in tree.values() for a in _leaves(v)]
    return [tree]


def _dig(tree: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _hparam(hparams: Any, keys: tuple[str, ...]) -> Any:
    """A field of the authors' Hydra config as the checkpoint records it, or None.

    The authors' PLModel passes its whole config to `save_hyperparameters`, which Lightning
    records as that config (keys model, featurizer, ...); the project's fixture nests it under
    "cfg". Both are tried.
    """
    for prefix in ((), ("cfg",)):
        value = _dig(hparams, prefix + keys)
        if value is not None:
            return value
    return None


def describe(info: Mapping) -> str:
    """What `load_torch_model` loaded, in a few lines for users."""
    lines = [f"{info['file']} ({info['size']:,} bytes): {info['release_note']}"]
    for r in RELEASES:
        if r.name == info.get("release"):
            lines.append(f"published scores: {r.scores}; licence: {r.licence}")
    title = ARCHITECTURES[info["architecture"]].title if "architecture" in info else "model"
    where = [f"{title}, {info['layout']} layout", f"{info['weights']} weights",
             f"{info['params']:,} parameters"]
    for k in ("epoch", "global_step", "ema_step", "ema_decay"):
        if k in info:
            where.append(f"{k} {info[k]}")
    lines.append("loaded " + ", ".join(where))
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bsmamba2_jax.convert",
        description="Convert the authors' PyTorch BSMamba2 or BS-RoFormer checkpoint (Lightning "
                    ".ckpt or bare state_dict) to this project's model file. Nothing in the file "
                    "is executed.")
    parser.add_argument("checkpoint", help="IN.ckpt, e.g. sota_model.ckpt or "
                                           "bs_mamba2_vocals.ckpt")
    parser.add_argument("out", help="OUT.msgpack, the model file to write")
    parser.add_argument("--weights", choices=WEIGHTS, default="raw",
                        help="raw: the state_dict (what the authors' evaluation scores, default); "
                             "ema: the EMA weights of the Lightning checkpoint")
    args = parser.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    if out.is_dir():
        parser.error(f"{out} is a folder; give a file name such as {out / 'bsmamba2.msgpack'}")
    try:
        check_output(out, [src], name="OUT")
    except OutputPathError as e:
        parser.error(str(e))
    from bsmamba2_jax.export import save_model

    try:
        params, config, info = load_torch_model(src, args.weights)
    except (FileNotFoundError, TorchCheckpointError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(info))
    source = {k: info[k] for k in ("file", "sha256", "release", "layout", "epoch",
                                   "global_step") if info.get(k) is not None}
    try:
        path = save_model(out, params, config, weights=info["weights"], source=source)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
