"""Peak memory and time of loading the weights of a full-size PyTorch BSMamba2 checkpoint.

    python benchmarks/torch_checkpoint.py CKPT [--weights raw,ema] [--json out.json]
    TORCH_PYTHON benchmarks/torch_checkpoint.py --make CKPT [--layout lightning|state_dict]
    python benchmarks/torch_checkpoint.py CKPT --weights raw --compare IN.npy REF.npy

The first form loads CKPT with `bsmamba2_jax.convert.load_torch_model` once per weights kind,
each in a fresh process, and prints: file size, bytes of tensor records read, wall time, the
process's peak RSS (VmHWM) and its RSS after the imports alone (the baseline), so "peak -
baseline" is what loading costs. The second form needs PyTorch (any Python that has torch, e.g.
a scratch venv; the project never does): it writes a file of the paper's shapes (48,098,188
parameters, random weights) with the authors' state_dict names, laid out as the authors'
Lightning training writes it (raw state_dict + STFT window buffers, Adam state, EMA tuple,
~770 MB) or as a bare state_dict (~193 MB). The third form converts CKPT, runs our model on
IN.npy in float32 and prints its relative L2 error against REF.npy, the output of
`benchmarks/torch_reference.py` (a float64 PyTorch forward of the authors' graph) on IN.npy, or
for a BS-RoFormer file of `benchmarks/roformer_reference.py` (the authors' own model code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from bsmamba2_jax import convert, torch_checkpoint as tc
import jax, flax, numpy as np  # what any caller of the converter has imported anyway
base = rss("VmRSS:")
read = [0]
original = tc.TorchCheckpoint.read_record
def counted(self, name, *part):
    data = original(self, name, *part)
    read[0] += len(data) if name.startswith("data/") else 0
    return data
tc.TorchCheckpoint.read_record = counted
t = time.perf_counter()
params, config, info = convert.load_torch_model({path!r}, {weights!r}, identify=False)
seconds = time.perf_counter() - t
param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
print(json.dumps({{"weights": {weights!r}, "seconds": seconds, "baseline_rss": base,
                  "peak_rss": rss("VmHWM:"), "read_bytes": read[0], "param_bytes": param_bytes,
                  "params": info["params"], "layout": info["layout"]}}))
"""


def measure(path: Path, weights: str) -> dict:
    code = CHILD.format(root=str(ROOT), path=str(path), weights=weights)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"loading {weights} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(path: Path, weights: str, inp: Path, ref: Path) -> dict:
    """Our model from `path` (through `bsmamba2_jax.loading.load_model`, which prints what it
    read), float32, on `inp` against the PyTorch reference output `ref`."""
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bsmamba2_jax.loading import load_model

    model, params, _ = load_model(path, weights=weights, report=print)
    ours = np.asarray(jax.jit(model.apply)(params, np.load(inp)), np.float64)
    want = np.load(ref).astype(np.float64)
    return {"weights": weights, "rel_l2": float(np.linalg.norm(ours - want) /
                                                 np.linalg.norm(want)),
            "max_abs": float(np.abs(ours - want).max()), "ref_rms": float(np.sqrt(
                np.mean(want ** 2)))}


def make(path: Path, layout: str, seed: int = 0) -> None:
    """Writes a paper-size checkpoint with PyTorch (authors' names, random weights)."""
    import math

    import torch
    from torch import nn

    # configs/bsmamba2.py PAPER_BAND_WIDTHS, spelled out: this runs without the project's deps.
    PAPER_BAND_WIDTHS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
    torch.manual_seed(seed)
    dim, depth, expand, d_state, headdim, d_conv = 256, 6, 4, 128, 64, 4
    e, heads = expand * dim, expand * dim // headdim
    conv_dim = e + 2 * d_state

    class Weight(nn.Module):
        def __init__(self, n: int, name: str = "weight"):
            super().__init__()
            self.register_parameter(name, nn.Parameter(1 + 0.1 * torch.randn(n)))

    class Mixer(nn.Module):  # mamba_ssm Mamba2: own parameters first, then submodules
        def __init__(self):
            super().__init__()
            self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.rand(heads) * 0.1 + 1e-3)))
            self.A_log = nn.Parameter(torch.log(1 + 15 * torch.rand(heads)))
            self.D = nn.Parameter(1 + 0.1 * torch.randn(heads))
            self.in_proj = nn.Linear(dim, 2 * e + 2 * d_state + heads, bias=False)
            self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim,
                                    padding=d_conv - 1)
            self.norm = Weight(e)
            self.out_proj = nn.Linear(e, dim, bias=False)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mixer = Weight(dim), Mixer()

    class BiBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.forward_blocks = nn.ModuleList([Block()])
            self.backward_blocks = nn.ModuleList([Block()])
            self.linear = nn.ConvTranspose1d(2 * dim, dim, 1)

    class BSModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleList([BiBlock(), BiBlock()])
                                         for _ in range(depth)])
            self.final_norm = Weight(dim, "gamma")
            self.band_split = nn.Module()
            self.band_split.to_features = nn.ModuleList([
                nn.Sequential(Weight(4 * w, "gamma"), nn.Linear(4 * w, dim))
                for w in PAPER_BAND_WIDTHS])
            est = nn.Module()
            est.to_freqs = nn.ModuleList([
                nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.Tanh(),
                                            nn.Linear(4 * dim, 8 * w)), nn.GLU(dim=-1))
                for w in PAPER_BAND_WIDTHS])
            self.mask_estimators = nn.ModuleList([est])

    model = BSModel()
    n = sum(p.numel() for p in model.parameters())
    if n != 48_098_188:
        raise AssertionError(f"{n} parameters, the paper config has 48,098,188")
    if layout == "state_dict":
        torch.save(model.state_dict(), path)
        return

    class Lightning(nn.Module):  # the authors' PLModel: featurizers, then the model
        def __init__(self):
            super().__init__()
            self.featurizer, self.inverse_featurizer = nn.Module(), nn.Module()
            for f in (self.featurizer, self.inverse_featurizer):
                f.register_buffer("window", torch.hann_window(2048))
            self.model = model

    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) / math.sqrt(p.numel())
    opt.step()  # Adam's exp_avg / exp_avg_sq: the bulk of the file
    ema = tuple(p.detach() + 0.01 * torch.randn_like(p) for p in model.parameters())
    torch.save({
        "epoch": 1999, "global_step": 200_000, "pytorch-lightning_version": "2.2.1",
        "state_dict": Lightning().state_dict(),
        "loops": {}, "callbacks": {"EMA": {}}, "lr_schedulers": [],
        "optimizer_states": [{"opt": opt.state_dict(), "ema": ema, "current_step": 200_000,
                              "decay": 0.999, "every_n_steps": 1}],
        "hyper_parameters": {"cfg": {"model": {"dim": dim, "depth": depth,
                                               "module_type": "mamba2"}}},
    }, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--weights", default="raw,ema", help="comma-separated: raw, ema")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--make", action="store_true", help="write CHECKPOINT (needs torch)")
    parser.add_argument("--layout", choices=("lightning", "state_dict"), default="lightning")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("IN.npy", "REF.npy"),
                        help="check the converted model's output against a reference output")
    args = parser.parse_args()
    if args.make:
        make(args.checkpoint, args.layout)
        print(f"wrote {args.checkpoint} ({args.checkpoint.stat().st_size:,} bytes)")
        return
    if args.compare:
        if args.weights not in ("raw", "ema"):
            parser.error("--compare checks one kind of weights: --weights raw or --weights ema")
        r = compare(args.checkpoint, args.weights, *args.compare)
        print(f"{r['weights']} weights vs reference: relative L2 {r['rel_l2']:.2e}, "
              f"max |diff| {r['max_abs']:.2e} (reference RMS {r['ref_rms']:.2e})")
        return
    size = args.checkpoint.stat().st_size
    print(f"{args.checkpoint} ({size:,} bytes), load {os.getloadavg()[0]:.1f}")
    print(f"{'weights':8} {'layout':10} {'read MB':>8} {'params MB':>9} {'seconds':>8} "
          f"{'baseline MB':>11} {'peak MB':>8} {'peak-base':>9}")
    rows = []
    for weights in args.weights.split(","):
        r = measure(args.checkpoint, weights)
        rows.append(r)
        print(f"{weights:8} {r['layout']:10} {r['read_bytes'] / 1e6:8.1f} "
              f"{r['param_bytes'] / 1e6:9.1f} {r['seconds']:8.2f} {r['baseline_rss'] / 1e6:11.1f} "
              f"{r['peak_rss'] / 1e6:8.1f} {(r['peak_rss'] - r['baseline_rss']) / 1e6:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": str(args.checkpoint), "size": size,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
