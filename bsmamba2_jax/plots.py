"""Figures: mel spectrograms like the paper's Fig. 2, and the input-length sweep (Table IV).

Mel spectrograms of mixture, reference and estimates over one time range:

    python -m bsmamba2_jax.plots --track MUSDB_TRACK_DIR --estimate EST/vocals.wav \
        [--estimate OTHER/vocals.wav --label BSMamba2 --label other] --start 30 --duration 8 \
        -o fig2.png
    python -m bsmamba2_jax.plots --mixture mix.wav --reference vocals.wav --estimate est.wav ...

Estimates come from `evaluate.py --write_audio` (WORKDIR/eval/<split>/<model key>/<run>/audio/
<track>/) or from `bsmamba2-separate`. Channels are averaged; spectra are power mel spectrograms in
dB relative to the loudest bin of all panels, so the panels share one colour scale.

The same spectrograms as pixel arrays (`mel_images`, `mel_strip`: no figure, no axes) go into
TensorBoard at each validation and into the HTML evaluation report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, rate: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular filters, equally spaced on the mel scale, peak 1: (n_mels, n_fft // 2 + 1)."""
    fmax = rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= rate/2, got {fmin=}, {fmax=}, {rate=}")
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.clip(np.minimum(up, down), 0.0, None)


def mel_power(audio: np.ndarray, rate: int, n_fft: int = 2048, hop: int = 441,
              n_mels: int = 128, fmax: float | None = None) -> np.ndarray:
    """(channels, samples) or (samples,) -> mel power (n_mels, frames), channels averaged first.

    Periodic Hann window, frames start every `hop` samples (no centre padding).
    """
    x = np.asarray(audio, dtype=np.float64)
    x = x.mean(axis=0) if x.ndim == 2 else x
    if x.shape[-1] < n_fft:
        x = np.pad(x, (0, n_fft - x.shape[-1]))
    n = 1 + (x.shape[-1] - n_fft) // hop
    idx = np.arange(n)[:, None] * hop + np.arange(n_fft)[None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spec = np.abs(np.fft.rfft(x[idx] * window, axis=-1)) ** 2  # (frames, bins)
    return (spec @ mel_filterbank(n_fft, n_mels, rate, fmax=fmax).T).T  # spec @ fb.T: 7x faster


# Small mel images for many at a time (TensorBoard, the HTML report): 96 bands, a column every
# 20 ms; a 4 s clip is 96 x 197 pixels.
PREVIEW_MEL = {"n_mels": 96, "hop": 882}


def mel_db(mels: Sequence[np.ndarray], floor_db: float = -80.0) -> list[np.ndarray]:
    """Power mel spectrograms -> dB relative to the loudest bin of all of them, floored at
    `floor_db`: one colour scale for panels that are compared. All silent: every bin at 0 dB."""
    ref = max(float(np.max(m)) for m in mels) or 1.0
    return [10 * np.log10(np.maximum(m, ref * 10 ** (floor_db / 10)) / ref) for m in mels]


def colour_image(db: np.ndarray, floor_db: float = -80.0, cmap: str = "magma") -> np.ndarray:
    """(n_mels, frames) dB in [floor_db, 0] -> (n_mels, frames, 3) uint8 RGB image with the low
    frequencies at the bottom, coloured as `plot_mel_panels` colours them."""
    import matplotlib

    level = np.clip(1.0 - np.asarray(db, np.float64) / floor_db, 0.0, 1.0)[::-1]
    rgb = matplotlib.colormaps[cmap](level)[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def mel_images(audios: Sequence[np.ndarray], rate: int, *, n_mels: int = 128, hop: int = 441,
               fmax: float = 16000.0, floor_db: float = -80.0) -> list[np.ndarray]:
    """One (n_mels, frames, 3) uint8 image per audio ((channels, samples) each), on one shared
    dB scale (`mel_db`); a column every `hop` samples."""
    fmax = min(fmax, rate / 2)
    mels = [mel_power(a, rate, hop=hop, n_mels=n_mels, fmax=fmax) for a in audios]
    return [colour_image(db, floor_db) for db in mel_db(mels, floor_db)]


def mel_strip(audios: Sequence[np.ndarray], rate: int, gap: int = 3, **kwargs: Any) -> np.ndarray:
    """`mel_images` stacked top to bottom with `gap` white rows between them: (height, frames, 3)
    uint8, for TensorBoard's image summaries. The audios must have the same length."""
    images = mel_images(audios, rate, **kwargs)
    white = np.full((gap, images[0].shape[1], 3), 255, np.uint8)
    rows = [images[0]]
    for image in images[1:]:
        rows += [white, image]
    return np.concatenate(rows, axis=0)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """(height, width, 3) uint8 -> PNG file (its folder is created)."""
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, image, format="png")
    return path


def plot_mel_panels(panels: Sequence[tuple[str, np.ndarray]], rate: int, path: str | Path, *,
                    start: float = 0.0, title: str | None = None, floor_db: float = -80.0,
                    n_mels: int = 128, fmax: float = 16000.0) -> Path:
    """One mel-spectrogram row per (label, audio (channels, samples)) panel, shared dB scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("nothing to plot: pass at least one (label, audio) panel")
    fmax = min(fmax, rate / 2)
    dbs = mel_db([mel_power(a, rate, n_mels=n_mels, fmax=fmax) for _, a in panels], floor_db)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels) + 0.6), sharex=True,
                             squeeze=False)
    image = None
    for ax, (label, audio), db in zip(axes[:, 0], panels, dbs, strict=True):
        seconds = np.asarray(audio).shape[-1] / rate
        image = ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=floor_db, vmax=0,
                          extent=(start, start + seconds, 0, n_mels))
        ax.set_ylabel("mel bin")
        ax.set_title(label, fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="dB", shrink=0.9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(sweeps: Mapping[str, Mapping[float, Mapping[str, Any]]], path: str | Path,
               title: str | None = None) -> Path:
    """Table IV as a figure: uSDR (mean) and cSDR (median) against the segment length.

    Args:
      sweeps: {model label: {segment seconds: {"usdr": dB or None, "csdr": dB or None}}}; one
        line per model in each of the two panels.
      path: output image (.png, .pdf); its folder is created.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sweeps:
        raise ValueError("nothing to plot: pass at least one model's sweep")
    lengths = sorted({s for sweep in sweeps.values() for s in sweep})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for ax, key, name in zip(axes, ("usdr", "csdr"), ("uSDR (mean)", "cSDR (median)"),
                             strict=True):
        for label, sweep in sweeps.items():
            xs = sorted(sweep)
            ys = [np.nan if sweep[s][key] is None else float(sweep[s][key]) for s in xs]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{s:g}" for s in lengths])
        ax.set_xlabel("inference segment length (s)")
        ax.set_ylabel(f"{name}, dB")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _read_range(path: Path, start: float, duration: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    info = sf.info(str(path))
    first = int(round(start * info.samplerate))
    if first >= info.frames:
        raise ValueError(f"--start {start} s is past the end of {path} "
                         f"({info.frames / info.samplerate:.1f} s)")
    frames = -1 if duration is None else int(round(duration * info.samplerate))
    audio, rate = sf.read(str(path), start=first, frames=frames, dtype="float32", always_2d=True)
    return audio.T, rate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsmamba2_jax.plots",
                                     description="Mel spectrograms like the paper's Fig. 2.")
    parser.add_argument("--track", help="MUSDB18-HQ track folder (mixture.wav, vocals.wav)")
    parser.add_argument("--mixture", help="mixture file (instead of --track)")
    parser.add_argument("--reference", help="reference vocals file (instead of --track)")
    parser.add_argument("--estimate", action="append", default=[], help="estimate file(s)")
    parser.add_argument("--label", action="append", default=[], help="name per --estimate")
    parser.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds to show")
    parser.add_argument("--title", default=None)
    parser.add_argument("-o", "--output", required=True, help="output image (.png, .pdf)")
    args = parser.parse_args(argv)
    mixture = Path(args.mixture) if args.mixture else (
        Path(args.track) / "mixture.wav" if args.track else None)
    reference = Path(args.reference) if args.reference else (
        Path(args.track) / "vocals.wav" if args.track else None)
    if args.label and len(args.label) != len(args.estimate):
        parser.error(f"{len(args.label)} --label for {len(args.estimate)} --estimate")
    labels = args.label or [f"estimate: {Path(e).parent.name}/{Path(e).name}"
                            for e in args.estimate]
    files = [(n, p) for n, p in (("mixture", mixture), ("reference vocals", reference)) if p]
    files += [(lab, Path(e)) for lab, e in zip(labels, args.estimate, strict=True)]
    if not files:
        parser.error("nothing to plot: pass --track or --mixture/--reference and/or --estimate")
    panels, rates = [], set()
    try:
        for label, path in files:
            audio, rate = _read_range(path, args.start, args.duration)
            panels.append((label, audio))
            rates.add(rate)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(rates) != 1:
        print(f"error: the files have different sample rates {sorted(rates)}", file=sys.stderr)
        return 1
    out = plot_mel_panels(panels, rates.pop(), args.output, start=args.start, title=args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
