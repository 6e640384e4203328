"""A full-size BS-RoFormer checkpoint written by the authors' own model code, with its outputs.

    git clone https://github.com/EuiYeonKim/BSMamba2 .peer/BSMamba2      # ignored, never committed
    TORCH_PYTHON benchmarks/roformer_reference.py OUT_DIR [--dim 256] [--seconds 8] [--seed 0]
        [--dtype float64|float32] [--authors .peer/BSMamba2]
    python benchmarks/torch_checkpoint.py OUT_DIR/rf256_lightning.ckpt --weights raw \
        --compare OUT_DIR/rf256_input.npy OUT_DIR/rf256_expected_raw.npy

Builds the authors' `BSModel(module_type="transformer")` (their `src/model/bs_model.py` and
`modules/attend.py`, imported from a checkout of their repository; needs torch, einops, beartype,
packaging and rotary-embedding-torch) at full size (depth 6, heads 8, dim_head 48, the paper's 62
bands, stereo, one stem), with random weights (norm gains 1 +- 0.1, biases +- 0.02 on top of
torch's init), in eval mode, and writes to OUT_DIR:

    rf<dim>_lightning.ckpt    as the authors' Lightning training saves it: state_dict = raw
                              weights under `model.` + the two STFT window buffers;
                              optimizer_states[0]["ema"] = EMA tensors in model.parameters()
                              order (every trainable one perturbed by 5 %); epoch, global_step,
                              a plain-dict hyper_parameters
    rf<dim>_state_dict.ckpt   the bare state_dict of the raw weights
    rf<dim>_input.npy         (1, 2, seconds * 44100) float32, N(0, 0.3^2)
    rf<dim>_expected_raw.npy  the vocals of the raw weights: iSTFT(model(STFT(input))), n_fft
    rf<dim>_expected_ema.npy  2048, hop 441, periodic Hann, centred, one unpadded segment; the
                              model in --dtype (float64: the reference; the authors' forward
                              casts the mask to float32 either way)

Only the transformer path of their module is used: their imports of mamba_ssm (a CUDA package)
are satisfied by empty stand-ins. The project never needs torch; use any Python that has it.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
N_FFT, HOP, RATE = 2048, 441, 44100
MAMBA_SSM_NAMES = {  # what bs_model.py imports from mamba_ssm at module level
    "mamba_ssm.modules.mamba_simple": ("Mamba",),
    "mamba_ssm.modules.mamba2": ("Mamba2",),
    "mamba_ssm.modules.block": ("Block",),
    "mamba_ssm.models.mixer_seq_simple": ("_init_weights",),
    "mamba_ssm.ops.triton.layer_norm": ("RMSNorm",),
    "mamba_ssm.modules.mlp": ("GatedMLP",),
}


def import_bs_model(authors: Path) -> types.ModuleType:
    """The authors' `model.bs_model` module, without their package __init__ (which imports the
    Lightning module and its training dependencies) and with mamba_ssm stood in for."""
    src = authors / "src" / "model"
    if not (src / "bs_model.py").is_file():
        raise SystemExit(f"{src / 'bs_model.py'} not found: clone "
                         "https://github.com/EuiYeonKim/BSMamba2 into .peer/BSMamba2 or pass "
                         "--authors")
    for name, attrs in MAMBA_SSM_NAMES.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        for attr in attrs:
            setattr(sys.modules[name], attr, None)
    package = types.ModuleType("model")
    package.__path__ = [str(src)]
    sys.modules["model"] = package
    return importlib.import_module("model.bs_model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--authors", type=Path, default=ROOT / ".peer" / "BSMamba2")
    args = parser.parse_args()

    import torch

    bs_model = import_bs_model(args.authors)
    torch.manual_seed(args.seed)
    model = bs_model.BSModel(dim=args.dim, depth=6, stereo=True, num_stems=1, dim_head=48,
                             heads=8, attn_dropout=0.1, ff_dropout=0.1, flash_attn=False,
                             mask_estimator_depth=2, module_type="transformer").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
        ema = tuple(p.detach() * (1 + 0.05 * torch.randn_like(p)) if p.requires_grad
                    else p.detach().clone() for p in model.parameters())
    window = torch.hann_window(N_FFT)
    sd = collections.OrderedDict(("model." + k, v) for k, v in model.state_dict().items())
    sd["featurizer.window"] = window.clone()
    sd["inverse_featurizer.window"] = window.clone()
    root = {"epoch": 41, "global_step": 4200, "state_dict": sd,
            "optimizer_states": [{"opt": {}, "ema": ema, "current_step": 4200, "decay": 0.999,
                                  "every_n_steps": 1}],
            "hyper_parameters": {"model": {"dim": args.dim, "depth": 6,
                                           "module_type": "transformer", "dim_head": 48,
                                           "heads": 8, "attn_dropout": 0.1,
                                           "ff_dropout": 0.1}}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"rf{args.dim}"
    torch.save(root, f"{stem}_lightning.ckpt")
    torch.save(model.state_dict(), f"{stem}_state_dict.ckpt")
    n = sum(p.numel() for p in model.parameters())
    print(f"{stem}_lightning.ckpt, {stem}_state_dict.ckpt: {n:,} parameters "
          f"({len(ema)} in model.parameters(), {len(model.state_dict())} state_dict entries)")

    rng = np.random.default_rng(args.seed)
    audio = (0.3 * rng.standard_normal((1, 2, int(round(args.seconds * RATE))))).astype(
        np.float32)
    np.save(f"{stem}_input.npy", audio)
    dtype = getattr(torch, args.dtype)

    def forward(net: torch.nn.Module) -> np.ndarray:
        x = torch.from_numpy(audio).to(dtype)
        win = window.to(dtype)
        spec = torch.stft(x.reshape(-1, x.shape[-1]), N_FFT, HOP, window=win, center=True,
                          return_complex=True).reshape(1, 2, N_FFT // 2 + 1, -1)
        with torch.no_grad():
            y = net.to(dtype)(spec)[:, 0]  # (batch, channels, bins, frames)
        y = torch.istft(y.reshape(-1, *y.shape[-2:]), N_FFT, HOP, window=win, center=True,
                        length=x.shape[-1])
        return y.reshape(1, 2, -1).numpy()

    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(ema_model.parameters(), ema, strict=True):
            p.copy_(e)
    for kind, net in (("raw", model), ("ema", ema_model)):
        np.save(f"{stem}_expected_{kind}.npy", forward(net))
        print(f"wrote {stem}_expected_{kind}.npy ({args.dtype} forward)")


if __name__ == "__main__":
    main()
