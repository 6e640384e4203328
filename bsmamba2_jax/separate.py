"""Separate songs into vocals and accompaniment with an exported BSMamba2 model.

    bsmamba2-separate song.wav [more.flac ...] -o OUTDIR --checkpoint model.msgpack
        [--format wav|flac|wav16|wav24] [--segment-seconds 8] [--overlap 0] [--batch-size 4]

Writes OUTDIR/<name>/vocals.<ext> and OUTDIR/<name>/accompaniment.<ext> (accompaniment =
mixture - vocals). The model file comes from `python -m bsmamba2_jax.export WORKDIR OUT`
(default: $BSMAMBA2_MODEL). Mono input is duplicated to stereo for the model and written back as
mono; other sample rates are resampled to the model's 44.1 kHz and back. Long files run segment by
segment (the paper's 8 s, non-overlapping by default) with a progress bar. Inputs are never
overwritten; an unreadable file is reported and skipped (exit status 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

MODEL_ENV = "BSMAMBA2_MODEL"
# --format -> (soundfile subtype, file extension)
FORMATS = {"wav": ("FLOAT", "wav"), "flac": ("PCM_24", "flac"), "wav16": ("PCM_16", "wav"),
           "wav24": ("PCM_24", "wav")}


class SeparationError(Exception):
    """A problem with one input file; reported, and the other files still run."""


def read_input(path: Path) -> tuple[np.ndarray, int]:
    """Any soundfile-readable file -> ((channels, samples) float32, sample rate)."""
    import soundfile as sf

    if not path.is_file():
        raise SeparationError(f"{path}: no such file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, OSError, ValueError) as e:
        raise SeparationError(f"{path}: cannot read it as audio ({e}); use wav, flac, ogg or "
                              "another format libsndfile reads") from e
    if audio.shape[0] == 0:
        raise SeparationError(f"{path}: the file holds no samples")
    if audio.shape[1] > 2:
        raise SeparationError(f"{path}: {audio.shape[1]} channels; only mono and stereo are "
                              "supported (downmix it first)")
    return audio.T.copy(), int(rate)


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """(channels, samples) polyphase resampling rate_in -> rate_out (identity when equal)."""
    if rate_in == rate_out:
        return audio
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    return resample_poly(audio, rate_out // g, rate_in // g, axis=-1).astype(np.float32)


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad the last axis to n samples."""
    if audio.shape[-1] >= n:
        return audio[..., :n]
    return np.pad(audio, ((0, 0), (0, n - audio.shape[-1])))


def separate_audio(vocals_fn: Callable[[np.ndarray], np.ndarray], audio: np.ndarray, rate: int,
                   model_rate: int = 44100) -> tuple[np.ndarray, np.ndarray]:
    """Vocals and accompaniment of one recording, at its own rate and channel count.

    Args:
      vocals_fn: stereo (2, n) float32 at model_rate -> vocals (2, n).
      audio: (channels, samples), 1 or 2 channels, at `rate`.
    Returns: (vocals, accompaniment), each shaped like `audio`; accompaniment = audio - vocals.
    """
    channels, n = audio.shape
    stereo = np.repeat(audio, 2, axis=0) if channels == 1 else audio
    x = resample(stereo, rate, model_rate)
    vocals = np.asarray(vocals_fn(x), dtype=np.float32)
    vocals = fit_length(resample(vocals, model_rate, rate), n)
    if channels == 1:
        vocals = vocals.mean(axis=0, keepdims=True)
    return vocals, audio - vocals


def write_output(path: Path, audio: np.ndarray, rate: int, fmt: str) -> None:
    import soundfile as sf

    subtype, _ = FORMATS[fmt]
    if subtype.startswith("PCM"):
        audio = np.clip(audio, -1.0, 1.0)  # integer formats would wrap around otherwise
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.ascontiguousarray(audio.T), rate, subtype=subtype)


def output_paths(inputs: Sequence[Path], out_dir: Path, fmt: str) -> list[dict[str, Path]]:
    """OUTDIR/<name>/{vocals,accompaniment}.<ext> per input; errors on clashes with inputs or
    with each other (two inputs of one name)."""
    _, ext = FORMATS[fmt]
    resolved_inputs = {p.resolve() for p in inputs}
    seen: dict[str, Path] = {}
    out = []
    for p in inputs:
        if p.stem in seen and seen[p.stem].resolve() != p.resolve():
            raise ValueError(f"{p} and {seen[p.stem]} would both write to {out_dir / p.stem}; "
                             "rename one or separate them into different --output folders")
        seen[p.stem] = p
        paths = {s: out_dir / p.stem / f"{s}.{ext}" for s in ("vocals", "accompaniment")}
        for q in paths.values():
            if q.resolve() in resolved_inputs:
                raise ValueError(f"output {q} is one of the inputs; choose another --output "
                                 "folder (inputs are never overwritten)")
        out.append(paths)
    return out


def load_separator(model_file: str | Path, *, segment_seconds: float | None, overlap: float,
                   batch_size: int, progress: bool) -> tuple[Callable, int]:
    """(vocals_fn with a progress bar over segments, the model's sample rate)."""
    import jax
    from tqdm import tqdm

    from bsmamba2_jax import inference
    from bsmamba2_jax.loading import load_model

    overrides = None
    if jax.default_backend() != "gpu":
        overrides = {"ssd_impl": "xla"}  # same numbers; Pallas off-GPU is interpret mode (slow)
    model, params, config = load_model(model_file, overrides=overrides)
    rate = int(config.get("sample_rate", 44100))
    seconds = float(segment_seconds or config.get("segment_seconds", 8.0))
    params = jax.device_put(params)
    apply = jax.jit(model.apply)

    def vocals_fn(stereo: np.ndarray) -> np.ndarray:
        plan = inference.plan_segments(stereo.shape[-1], int(round(seconds * rate)), overlap)
        with tqdm(total=plan.count, unit="seg", leave=False, disable=not progress,
                  dynamic_ncols=True) as bar:
            def fn(segments: np.ndarray) -> np.ndarray:
                out = np.asarray(apply(params, segments))
                bar.update(min(len(segments), plan.count - bar.n))
                return out

            return inference.separate_with(fn, stereo[None], plan, batch_size)[0]

    return vocals_fn, rate


def run(inputs: Sequence[str | Path], out_dir: str | Path, model_file: str | Path, *,
        fmt: str = "wav", segment_seconds: float | None = None, overlap: float = 0.0,
        batch_size: int = 4, progress: bool = True,
        vocals_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        model_rate: int = 44100) -> int:
    """Separates every input; returns the number of files that failed.

    `vocals_fn` (stereo (2, n) at model_rate -> vocals) replaces the model, for tests.
    """
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    inputs = [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    targets = output_paths(inputs, out_dir, fmt)
    if vocals_fn is None:
        vocals_fn, model_rate = load_separator(model_file, segment_seconds=segment_seconds,
                                               overlap=overlap, batch_size=batch_size,
                                               progress=progress)
    failed = 0
    for path, paths in tqdm(list(zip(inputs, targets, strict=True)), unit="file",
                            disable=not progress or len(inputs) == 1, dynamic_ncols=True):
        try:
            audio, rate = read_input(path)
        except SeparationError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        vocals, accompaniment = separate_audio(vocals_fn, audio, rate, model_rate)
        write_output(paths["vocals"], vocals, rate, fmt)
        write_output(paths["accompaniment"], accompaniment, rate, fmt)
        print(f"{path} -> {paths['vocals'].parent}")
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bsmamba2-separate",
        description="Split songs into vocals and accompaniment with a BSMamba2 model file.")
    parser.add_argument("inputs", nargs="+", help="audio files (wav, flac, ogg, ...)")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder; each input gets OUTPUT/<name>/")
    parser.add_argument("--checkpoint", default=os.environ.get(MODEL_ENV),
                        help=f"model file from `python -m bsmamba2_jax.export` "
                             f"(default: ${MODEL_ENV})")
    parser.add_argument("--format", choices=sorted(FORMATS), default="wav",
                        help="wav = float32 wav (default), flac = 24-bit flac, wav16/wav24 = PCM")
    parser.add_argument("--segment-seconds", type=float, default=None,
                        help="segment length (default: the model's training length, 8 s)")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="segment overlap fraction in [0, 1); 0 = the paper's protocol")
    parser.add_argument("--batch-size", type=int, default=4, help="segments per model call")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error(f"no model: pass --checkpoint MODEL_FILE or set ${MODEL_ENV} (make one "
                     "with `python -m bsmamba2_jax.export WORKDIR model.msgpack`)")
    if not 0.0 <= args.overlap < 1.0:
        parser.error(f"--overlap={args.overlap} must be in [0, 1)")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    try:
        failed = run(args.inputs, args.output, args.checkpoint, fmt=args.format,
                     segment_seconds=args.segment_seconds, overlap=args.overlap,
                     batch_size=args.batch_size, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
