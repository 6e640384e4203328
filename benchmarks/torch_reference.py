"""A float64 PyTorch forward of the authors' BSMamba2 from their state_dict (needs torch).

    TORCH_PYTHON benchmarks/torch_reference.py CKPT raw|ema IN.npy OUT.npy

Reads CKPT (the authors' Lightning checkpoint or a bare state_dict, with `torch.load(...,
weights_only=True)`), runs the network on IN.npy ((batch, 2, samples) float at 44.1 kHz, one
unpadded segment) in float64 and writes the vocals to OUT.npy. Written from the authors' model
code (EuiYeonKim/BSMamba2 `src/model/bs_model.py`, module_type "mamba2") and mamba_ssm 2.2.2's
Mamba2, independently of this project's JAX model; the SSD runs in its quadratic (masked
segment-sum) form instead of the Triton kernels. `benchmarks/torch_checkpoint.py --compare`
checks the converted model against OUT.npy. The project never needs torch; use any Python that
has it. A file whose pickle holds other classes (the authors' own checkpoint keeps an omegaconf
config) needs them allow-listed in torch.load; the files of `torch_checkpoint.py --make` do not.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

N_FFT, HOP = 2048, 441  # the authors' featurizer config


def load_state_dict(path: str, weights: str) -> dict[str, torch.Tensor]:
    """The model's float64 state_dict without prefix; EMA from optimizer_states[0]["ema"]."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in ckpt:
        sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()
              if k.startswith("model.")}
        if weights == "ema":  # model.parameters() order = state_dict order (no model buffers)
            sd = dict(zip(sd, ckpt["optimizer_states"][0]["ema"], strict=True))
    else:
        sd = ckpt
        if weights == "ema":
            raise SystemExit("a bare state_dict has no EMA weights")
    return {k: v.double() for k, v in sd.items()}


def l2_rms_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The authors' RMSNorm: F.normalize * sqrt(dim) * gamma."""
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1]) * gamma


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """mamba_ssm's RMSNorm."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mamba2(u: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    """mamba_ssm Mamba2 (ngroups 1, no d_mlp): u (b, l, d) -> (b, l, d)."""
    b, l, _ = u.shape
    heads, e = w[p + "dt_bias"].shape[0], w[p + "out_proj.weight"].shape[1]
    conv_w = w[p + "conv1d.weight"]
    channels, _, k = conv_w.shape
    n = (channels - e) // 2
    z, xbc, dt = torch.split(u @ w[p + "in_proj.weight"].T, [e, channels, heads], dim=-1)
    xbc = F.conv1d(xbc.transpose(1, 2), conv_w, w[p + "conv1d.bias"], padding=k - 1,
                   groups=channels)[..., :l].transpose(1, 2)
    x, B, C = torch.split(F.silu(xbc), [e, n, n], dim=-1)
    x = x.reshape(b, l, heads, e // heads)
    dt = F.softplus(dt + w[p + "dt_bias"])  # (b, l, h)
    A = -torch.exp(w[p + "A_log"])
    # h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t, unrolled:
    # y_t = sum_{s <= t} (C_t . B_s) exp(sum_{s < r <= t} dt_r A) dt_s x_s + D x_t.
    cum = torch.cumsum(dt * A, dim=1)
    seg = cum[:, :, None, :] - cum[:, None, :, :]  # (b, t, s, h)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool))[None, :, :, None]
    decay = torch.where(causal, torch.exp(seg.clamp(max=0)), 0.0)
    scores = torch.einsum("btn,bsn->bts", C, B)
    y = torch.einsum("bts,btsh,bsh,bshp->bthp", scores, decay, dt, x)
    y = (y + w[p + "D"][None, None, :, None] * x).reshape(b, l, e)
    y = rms_norm(y * F.silu(z), w[p + "norm.weight"])  # RMSNormGated, norm after the gate
    return y @ w[p + "out_proj.weight"].T


def bidirectional(u: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    """The authors' MambaBlock (bidirectional, one Block per direction): (b, l, d)."""
    fb, bb = p + "forward_blocks.0.", p + "backward_blocks.0."
    f = mamba2(rms_norm(u, w[fb + "norm.weight"]), w, fb + "mixer.") + u
    v = torch.flip(u, [1])
    r = torch.flip(mamba2(rms_norm(v, w[bb + "norm.weight"]), w, bb + "mixer.") + v, [1])
    out = F.conv_transpose1d(torch.cat([f, r], -1).transpose(1, 2), w[p + "linear.weight"],
                             w[p + "linear.bias"]).transpose(1, 2)
    return out + u


def forward(audio: torch.Tensor, w: dict) -> torch.Tensor:
    """(b, 2, samples) mixture -> (b, 2, samples) vocals, as the authors' BSModel + iSTFT."""
    b, c, samples = audio.shape
    dims = []
    while f"band_split.to_features.{len(dims)}.0.gamma" in w:
        dims.append(w[f"band_split.to_features.{len(dims)}.0.gamma"].shape[0])
    depth = 0
    while f"layers.{depth}.0.linear.weight" in w:
        depth += 1
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    spec = torch.stft(audio.reshape(b * c, samples), N_FFT, HOP, N_FFT, window, center=True,
                      pad_mode="reflect", return_complex=True)
    frames = spec.shape[-1]
    spec = torch.view_as_real(spec.reshape(b, c, -1, frames))  # (b, c, f, t, 2)
    spec = spec.permute(0, 2, 1, 3, 4).reshape(b, -1, frames, 2)  # (b, (f c), t, 2)
    x = spec.permute(0, 2, 1, 3).reshape(b, frames, -1)  # (b, t, (f c 2))
    x = torch.stack([
        l2_rms_norm(part, w[f"band_split.to_features.{k}.0.gamma"])
        @ w[f"band_split.to_features.{k}.1.weight"].T + w[f"band_split.to_features.{k}.1.bias"]
        for k, part in enumerate(torch.split(x, dims, dim=-1))], dim=-2)  # (b, t, k, d)
    bands, dim = x.shape[2], x.shape[3]
    for i in range(depth):
        xt = bidirectional(x.transpose(1, 2).reshape(b * bands, frames, dim), w, f"layers.{i}.0.")
        x = xt.reshape(b, bands, frames, dim).transpose(1, 2)
        x = bidirectional(x.reshape(b * frames, bands, dim), w, f"layers.{i}.1.")
        x = x.reshape(b, frames, bands, dim)
    x = l2_rms_norm(x, w["final_norm.gamma"])
    masks = []
    for k in range(bands):
        p = f"mask_estimators.0.to_freqs.{k}.0."
        h = torch.tanh(x[:, :, k] @ w[p + "0.weight"].T + w[p + "0.bias"])
        masks.append(F.glu(h @ w[p + "2.weight"].T + w[p + "2.bias"], dim=-1))
    mask = torch.cat(masks, -1).reshape(b, frames, -1, 2).transpose(1, 2)  # (b, (f c), t, 2)
    out = torch.view_as_complex(spec.contiguous()) * torch.view_as_complex(mask.contiguous())
    out = out.reshape(b, -1, c, frames).transpose(1, 2).reshape(b * c, -1, frames)
    vocals = torch.istft(out, N_FFT, HOP, N_FFT, window, center=True, length=samples)
    return vocals.reshape(b, c, samples)


def main() -> None:
    if len(sys.argv) != 5 or sys.argv[2] not in ("raw", "ema"):
        raise SystemExit(__doc__)
    path, weights, inp, out = sys.argv[1:]
    torch.set_num_threads(2)
    with torch.no_grad():
        vocals = forward(torch.from_numpy(np.load(inp)).double(), load_state_dict(path, weights))
    np.save(out, vocals.numpy())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
