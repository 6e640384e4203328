"""BS-RoFormer on MUSDB18-HQ vocals: the paper's baseline, the authors' model and the same recipe.

    python train.py --config=configs/bsroformer.py           # the paper's BS-RoFormer (Table I)
    python train.py --config=configs/bsroformer.py:d256      # the same at BSMamba2's width
    python train.py --config=configs/bsroformer.py:demo      # small model, synthetic data, CPU
    configs/bsroformer.py:tiny                               # the tests' model

configs/bsmamba2.py with the sequence model of the dual-path passes swapped for a transformer
(`mixer="transformer"`, bsmamba2_jax/roformer.py): band split, mask estimator, data, optimizer,
EMA and schedule are the same, as in the authors' code (one `BSModel` class and one training
config for both).

Size: the paper's Table I gives BS-RoFormer D = 384, L = 6, 72.2M parameters; with the authors'
transformer sizes (`bandsplitmodel.yaml`: heads 8, dim_head 48) that is 72,173,292 here, so the
default is dim 384. The yaml's dim 256 belongs to its BSMamba2 setting (`module_type: "mamba2"`);
`:d256` is BS-RoFormer at that width, 36,847,468 parameters. Table I also lists a different
training set-up for BS-RoFormer (float16, 4 GPUs x batch 4, 4 accumulation steps: effective
batch 64 against BSMamba2's 60); this config keeps BSMamba2's recipe, change
`data.batch_size` / `optim.accum_steps` to follow Table I instead.

Logging is configs/bsmamba2.py's too: `tensorboard_examples` (validation windows whose audio and
mel spectrograms TensorBoard shows at each validation; 0 = scalars only) and `tensorboard`.
"""

from __future__ import annotations

import ml_collections

from configs import bsmamba2

VARIANTS = ("", "d256", "demo", "tiny")
# BSMamba2-only fields of configs/bsmamba2.py, removed here so that a flag naming one is an error.
MAMBA2_FIELDS = ("expand", "d_state", "headdim", "ngroups", "d_conv", "chunk_size",
                 "band_chunk_size", "ssd_impl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "" (the paper's BS-RoFormer), "d256" (at dim 256), "demo" (CPU demo on synthetic
    data) or "tiny" (tests)."""
    variant = arg or ""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/bsroformer.py; "
                         f"choose one of {VARIANTS}")
    config = bsmamba2.get_config("" if variant == "d256" else variant)
    config.variant = variant
    m = config.model
    for field in MAMBA2_FIELDS:
        del m[field]
    m.mixer = "transformer"  # each pass: pre-norm rotary attention + feed-forward
    m.dim = 256 if variant == "d256" else 384 if variant == "" else m.dim  # D, Table I: 384
    m.heads = 8  # attention heads
    m.dim_head = 48  # features per head (heads * dim_head = 384)
    m.ff_mult = 4  # feed-forward hidden = ff_mult * dim
    m.attn_dropout = 0.1  # on attention probabilities and after the output projection (training)
    m.ff_dropout = 0.1  # after the GELU and after the feed-forward (training)
    # "cudnn": jax.nn.dot_product_attention's fused GPU kernel (bf16 only) for the dropout-free
    # calls (evaluation, separation); training with attn_dropout > 0 forms the probabilities
    # explicitly, (sequences, heads, l, l) in memory, whatever this says.
    m.attn_impl = "xla"
    if variant in ("demo", "tiny"):
        m.heads = 2
        m.dim_head = 16
    return config
