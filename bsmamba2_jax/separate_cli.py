"""Separate songs into vocals and accompaniment with a BSMamba2 model.

    bsmamba2-separate song.wav [more.flac ...] -o OUTDIR [--checkpoint MODEL]
        [--weights raw|ema] [--dtype auto|float32|bfloat16|float16]
        [--format wav|flac|wav16|wav24] [--segment-seconds 8] [--overlap 0]
        [--batch-size auto|N] [--nonfinite error|zero] [--overwrite] [--no-progress]

Writes OUTDIR/<name>/vocals.<ext> and OUTDIR/<name>/accompaniment.<ext> (accompaniment =
mixture - vocals). MODEL is anything `bsmamba2_jax.loading.load_model` reads: a model file from
`python -m bsmamba2_jax.export`, a train.py workdir or a checkpoint step directory (default:
$BSMAMBA2_MODEL). Mono input is duplicated to stereo for the model and written back as mono; other
sample rates are resampled to the model's rate and back.

Files are streamed: read, resampled, cut into segments (the paper's 8 s, non-overlapping by
default; every last segment and a whole short track zero-padded to one segment), separated a batch
of segments at a time and written, so memory does not grow with the track's length, and reading
and writing overlap with the model. The batch of segments is chosen from the compiled forward's
memory and what the machine has (`--batch-size auto`).

Nothing is lost and nothing is silently wrong: the arguments and every input are checked before
the model runs (a missing, unreadable, truncated or non-finite file fails on its own, named, and
the others still run); outputs appear only when complete; inputs and the model are never
overwritten, and nothing is written into a train.py run that --checkpoint reads
(`bsmamba2_jax.write_guard`); an OUTDIR/<name>/ that holds an earlier separation is refused
unless --overwrite, which replaces it only once the new one is complete; a failed write (a full
disk) names the file and leaves no partial output; clipping in an integer format is reported
with its peak. Exit status: 0 all files separated, 1 some failed, 2 bad arguments or no model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bsmamba2_jax import audio_files
from bsmamba2_jax.data.musdb import SAMPLE_RATE
from bsmamba2_jax.write_guard import OutputGuard, OutputPathError, check_output, write_error

if TYPE_CHECKING:  # imported where used: it imports JAX, which takes seconds
    from bsmamba2_jax.inference import SegmentPlan

MODEL_ENV = "BSMAMBA2_MODEL"
# --format -> (soundfile format, subtype, file extension)
FORMATS = {"wav": ("WAV", "FLOAT", "wav"), "flac": ("FLAC", "PCM_24", "flac"),
           "wav16": ("WAV", "PCM_16", "wav"), "wav24": ("WAV", "PCM_24", "wav")}
DTYPES = ("auto", "float32", "bfloat16", "float16")
NONFINITE = ("error", "zero")
BLOCK_FRAMES = 1 << 16  # frames per read: large enough to be cheap, small next to a segment
STEMS = ("vocals", "accompaniment")
EXTENSIONS = tuple(sorted({ext for _, _, ext in FORMATS.values()}))  # of an earlier separation
FIX_WRITE = "or choose another -o folder"  # how a failed write's message ends


class SeparationError(Exception):
    """A problem with one input file; reported, and the other files still run."""


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class InputInfo:
    """What the pre-read of one input found."""

    path: Path
    frames: int  # samples per channel
    rate: int  # Hz
    channels: int  # 1 or 2
    nonfinite: int  # NaN / Inf samples (all channels)


def _open(path: Path) -> Any:
    import soundfile as sf

    try:
        return sf.SoundFile(str(path))
    except (RuntimeError, sf.LibsndfileError, OSError, ValueError) as e:
        raise SeparationError(f"{path}: cannot read it as audio ({e}); use wav, flac, ogg or "
                              "another format libsndfile reads") from e


def _blocks(f: Any, path: Path) -> Iterator[np.ndarray]:
    """(frames, channels) float32 blocks of an open SoundFile, decoding errors named."""
    import soundfile as sf

    pos = 0
    while True:
        try:
            block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError, OSError, ValueError) as e:
            raise SeparationError(f"{path}: cannot decode it after {pos} frames ({e}); the file "
                                  "is damaged or truncated") from e
        if len(block) == 0:
            return
        pos += len(block)
        yield block


def scan_input(path: str | Path, nonfinite: str = "error") -> InputInfo:
    """Reads an input once, checking everything that could make its separation wrong.

    Raises SeparationError naming the file: missing, a folder, unreadable, empty, more than two
    channels, shorter than its header says, or (with nonfinite="error") holding NaN/Inf samples.
    """
    path = Path(path)
    if path.is_dir():
        raise SeparationError(f"{path}: is a folder, not an audio file; pass the files in it "
                              f"(e.g. {path}/*.wav)")
    if not path.is_file():
        raise SeparationError(f"{path}: no such file")
    with _open(path) as f:
        frames, rate, channels = int(f.frames), int(f.samplerate), int(f.channels)
        if frames == 0:
            raise SeparationError(f"{path}: the file holds no samples")
        if channels > 2:
            raise SeparationError(f"{path}: {channels} channels; only mono and stereo are "
                                  "supported (downmix it first)")
        try:
            audio_files.check_complete(path, frames, rate, f.format)
        except audio_files.AudioFileError as e:
            raise SeparationError(str(e)) from e
        read = bad = 0
        first_bad = None
        for block in _blocks(f, path):
            finite = np.isfinite(block)
            if not finite.all():
                if first_bad is None:
                    first_bad = read + int(np.argmin(finite.all(axis=1)))
                bad += int(finite.size - finite.sum())
            read += len(block)
    if read != frames:
        raise SeparationError(f"{path}: short read: {read} of the {frames} frames its header "
                              "gives; the file is truncated or damaged")
    if bad and nonfinite == "error":
        raise SeparationError(
            f"{path}: {bad} non-finite samples (NaN or Inf), the first at "
            f"{first_bad / rate:.3f} s; repair the file, or pass --nonfinite zero to replace "
            "them by zeros")
    return InputInfo(path, frames, rate, channels, bad)


def read_blocks(info: InputInfo) -> Iterator[np.ndarray]:
    """(channels, n) float32 blocks of a scanned input, non-finite samples zeroed.

    (--nonfinite error has already rejected files that have any.) Raises SeparationError if the
    file no longer holds the frames the scan found.
    """
    read = 0
    with _open(info.path) as f:
        for block in _blocks(f, info.path):
            if info.nonfinite:
                block = np.where(np.isfinite(block), block, np.float32(0))
            read += len(block)
            yield np.ascontiguousarray(block.T)
    if read != info.frames:
        raise SeparationError(f"{info.path}: short read: {read} of {info.frames} frames; the "
                              "file changed or is damaged")


# ----------------------------------------------------------------------------- resampling


class Resampler:
    """Streaming polyphase resampling, equal to `scipy.signal.resample_poly` on the whole signal.

    push((c, n) block) -> the output samples that are final; finish() -> the rest. Input is
    processed in steps of `step` samples (a multiple of `down`, so every step starts on an output
    sample) with `context` samples of real signal on both sides, more than the filter's reach
    (10 * max(up, down) upsampled samples, scipy's default), so every output sees exactly the
    inputs it sees in the whole-signal call; only the signal's two ends see zeros, as there.
    """

    def __init__(self, rate_in: int, rate_out: int):
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self._buf: np.ndarray | None = None  # input from self._start on
        self._start = 0
        self._pos = 0  # next input position whose outputs are not out yet (multiple of down)
        self._channels = 0
        if self.identity:
            return  # no scipy import either: it takes seconds on a busy machine
        from scipy.signal import firwin

        max_rate = max(self.up, self.down)
        half_len = 10 * max_rate
        # resample_poly's default filter, made once (it casts it to the signal's float32).
        self.h = firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)).astype(
            np.float32)
        reach = -(-half_len // self.up) + 1
        self.context = -(-reach // self.down) * self.down
        self.step = -(-BLOCK_FRAMES // self.down) * self.down

    @property
    def identity(self) -> bool:
        return self.up == self.down

    def _resample(self, stop: int | None) -> np.ndarray:
        from scipy.signal import resample_poly

        a = max(0, self._pos - self.context)
        end = None if stop is None else stop + self.context - self._start
        y = resample_poly(self._buf[:, a - self._start:end], self.up, self.down, axis=-1,
                          window=self.h)
        off = (self._pos - a) * self.up // self.down
        count = None if stop is None else off + (stop - self._pos) * self.up // self.down
        return y[:, off:count]

    def push(self, block: np.ndarray) -> np.ndarray:
        self._channels = block.shape[0]
        if self.identity:
            return block
        self._buf = block if self._buf is None else np.concatenate([self._buf, block], -1)
        out = []
        while self._start + self._buf.shape[-1] >= self._pos + self.step + self.context:
            out.append(self._resample(self._pos + self.step))
            self._pos += self.step
            keep = max(0, self._pos - self.context)
            self._buf, self._start = self._buf[:, keep - self._start:], keep
        return np.concatenate(out, -1) if out else self._buf[:, :0]

    def finish(self) -> np.ndarray:
        if self.identity or self._buf is None:
            return np.zeros((self._channels, 0), np.float32)
        return self._resample(None)


def resampled_length(frames: int, rate_in: int, rate_out: int) -> int:
    """Output samples of resampling `frames` samples rate_in -> rate_out (resample_poly's)."""
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    return -(-frames * up // down)


def model_input(info: InputInfo, model_rate: int) -> Iterator[np.ndarray]:
    """The input as (2, n) float32 blocks at the model's rate (mono duplicated)."""
    resampler = Resampler(info.rate, model_rate)
    for block in read_blocks(info):
        stereo = np.repeat(block, 2, axis=0) if info.channels == 1 else block
        out = resampler.push(stereo)
        if out.shape[-1]:
            yield out
    tail = resampler.finish()
    if tail.shape[-1]:
        yield tail


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass
class StemStats:
    peak: float = 0.0
    clipped: int = 0  # samples beyond full scale (integer formats only)


class _KeptErrorFile:
    """A binary file for libsndfile's virtual I/O that keeps the OSError of a failed write.

    libsndfile reports any failed write as "System error."; keeping the OSError lets the message
    name the cause (a full disk) next to the file.
    """

    def __init__(self, path: Path):
        self.file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by OutputWriter
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view, done = memoryview(data), 0
        try:
            while self.error is None and done < len(view):
                wrote = self.file.write(view[done:])
                if not wrote:
                    raise OSError(errno.EIO, "the file takes no more bytes")
                done += wrote
        except OSError as e:
            self.error = e
        return done  # fewer bytes than given: libsndfile fails the write

    def readinto(self, buf: Any) -> int:
        return self.file.readinto(buf)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """Where one input's separation goes."""

    paths: dict[str, Path]  # stem -> OUTDIR/<name>/<stem>.<ext>
    overwrite: bool = False  # replace files found there (--overwrite)
    replaces: tuple[Path, ...] = ()  # the earlier separation's files there (--overwrite only)


class OutputWriter:
    """The `sink` of one file: vocals at the model's rate in, both stems written at the input's.

    Resamples the vocals back, averages them to mono for a mono input, reads the mixture again
    (block by block) for accompaniment = mixture - vocals, and writes both to hidden partial
    files that `commit` renames over the plan's paths (and, with --overwrite, in place of the
    earlier separation's files); `abort` removes them. A failed write (a full disk) is a
    write_guard.WriteError naming the file.
    """

    def __init__(self, info: InputInfo, plan: OutputPlan, fmt: str, model_rate: int):
        import soundfile as sf

        self.info, self.plan, self.fmt = info, plan, fmt
        self.paths = plan.paths
        container, subtype, _ = FORMATS[fmt]
        self.integer = subtype.startswith("PCM")
        self.bits = {"PCM_16": 16, "PCM_24": 24}.get(subtype, 32)
        self.resampler = Resampler(model_rate, info.rate)
        self.mixture = read_blocks(info)
        self._mix = np.zeros((info.channels, 0), np.float32)
        self.written = 0
        self.stats = {s: StemStats() for s in STEMS}
        self.partial = {s: p.with_name(f".{p.name}.partial") for s, p in self.paths.items()}
        self.raw: dict[str, _KeptErrorFile] = {}
        self.files: dict[str, Any] = {}
        try:
            for stem, p in self.partial.items():
                try:
                    self.raw[stem] = _KeptErrorFile(p)
                except OSError as e:
                    raise write_error(self.paths[stem], e, FIX_WRITE) from e
                with self._named_write_errors():
                    self.files[stem] = sf.SoundFile(self.raw[stem], "w", samplerate=info.rate,
                                                    channels=info.channels, subtype=subtype,
                                                    format=container)
        except BaseException:
            self.abort()
            raise

    @contextlib.contextmanager
    def _named_write_errors(self) -> Iterator[None]:
        """libsndfile's "System error." (soundfile's failed-write assertion) -> WriteError."""
        try:
            yield
        except (RuntimeError, AssertionError) as e:
            for stem, raw in self.raw.items():
                if raw.error is not None:
                    raise write_error(self.paths[stem], raw.error, FIX_WRITE) from e
            raise

    def _mixture(self, n: int) -> np.ndarray:
        parts, have = [self._mix], self._mix.shape[-1]
        while have < n:
            block = next(self.mixture, None)
            if block is None:
                raise SeparationError(f"{self.info.path}: short read of the mixture; the file "
                                      "changed or is damaged")
            parts.append(block)
            have += block.shape[-1]
        mix = parts[0] if len(parts) == 1 else np.concatenate(parts, -1)
        out, self._mix = mix[:, :n], mix[:, n:]
        return out

    def _write(self, vocals: np.ndarray) -> None:
        n = min(vocals.shape[-1], self.info.frames - self.written)  # resampling may overshoot
        if n <= 0:
            return
        vocals = vocals[:, :n]
        if self.info.channels == 1:
            vocals = vocals.mean(axis=0, keepdims=True)
        stems = {"vocals": vocals, "accompaniment": self._mixture(n) - vocals}
        for stem, audio in stems.items():
            if self.integer:  # float formats keep any level; only integer ones clip
                magnitude = np.abs(audio)
                peak = float(magnitude.max())
                stats = self.stats[stem]
                stats.peak = max(stats.peak, peak)
                if peak > 1.0:
                    stats.clipped += int(np.count_nonzero(magnitude > 1.0))
                    audio = np.clip(audio, -1.0, 1.0)  # integers would wrap around otherwise
            with self._named_write_errors():
                self.files[stem].write(np.ascontiguousarray(audio.T))
        self.written += n

    def __call__(self, vocals: np.ndarray) -> None:
        self._write(self.resampler.push(vocals))

    def commit(self) -> list[str]:
        """Flushes, checks the length, renames the partial files; returns clipping warnings."""
        self._write(self.resampler.finish())
        if self.written < self.info.frames:  # never with resample_poly's lengths; kept safe
            self._write(np.zeros((2, self.info.frames - self.written), np.float32))
        self.mixture.close()
        with self._named_write_errors():
            for f in self.files.values():
                f.close()  # writes the header: a full disk can fail here too
        for raw in self.raw.values():
            raw.file.close()
        if not self.plan.overwrite:
            there = [p for p in self.paths.values() if p.exists()]
            if there:
                raise SeparationError(f"{self.info.path}: {there[0]} appeared while separating "
                                      "(another run?); nothing replaced: pass --overwrite to "
                                      "replace it, or choose another -o folder")
        for stem, p in self.partial.items():
            os.replace(p, self.paths[stem])
        for old in self.plan.replaces:  # the earlier separation in another format
            if old not in self.paths.values():
                old.unlink(missing_ok=True)
        warnings = []
        for stem, s in self.stats.items():
            if s.clipped:
                total = self.info.frames * self.info.channels
                warnings.append(
                    f"{self.paths[stem]}: peak {s.peak:.3f} ({20 * math.log10(s.peak):+.1f} dB "
                    f"over full scale): {s.clipped} samples ({100 * s.clipped / total:.2f}%) "
                    f"clipped in the {self.bits}-bit output; use --format wav (32-bit float, no "
                    "clipping) or lower the input's level")
        return warnings

    def abort(self) -> None:
        self.mixture.close()
        for f in self.files.values():
            try:
                f.close()
            except (RuntimeError, AssertionError, OSError):
                pass  # the write that failed is reported; the partial file goes anyway
        for raw in self.raw.values():
            raw.file.close()
        for p in self.partial.values():
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Separator:
    """A model ready to run: fn maps (batch_size, 2, segment) float32 -> vocals, same shape."""

    fn: Callable[[np.ndarray], Any]
    rate: int  # the model's sample rate, Hz
    segment: int  # samples per segment
    overlap: float  # segment overlap fraction
    batch_size: int  # segments per fn call
    description: str = ""  # what was loaded, for the log
    call_bytes: int = 0  # memory one fn call needs (compiled memory analysis), 0 if unknown


def load_separator(checkpoint: str | Path, *, weights: str | None = None, dtype: str = "auto",
                   segment_seconds: float | None = None, overlap: float = 0.0,
                   batch_size: int | str = "auto") -> Separator:
    """Loads a model, checks the segment length against it and compiles its forward once.

    batch_size "auto": the most segments per call that fit the memory budget
    (`inference.memory_budget`), at most `inference.default_max_batch()`. Raises ValueError
    naming the flag for a segment too short for the model's STFT.
    """
    import jax

    from bsmamba2_jax import inference
    from bsmamba2_jax.loading import load_model

    overrides: dict[str, Any] = {}
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        # Same numbers: Pallas off-GPU is interpret mode (slow), cuDNN attention is GPU-only.
        overrides["ssd_impl"] = "xla"
        overrides["attn_impl"] = "xla"
        # CPUs emulate bf16 matmuls: float32 is faster there, and more accurate.
        if dtype == "auto":
            dtype = "float32"
    if dtype != "auto":
        overrides["dtype"] = dtype
    model, params, config = load_model(checkpoint, weights=weights, overrides=overrides)
    rate = int(config.get("sample_rate", SAMPLE_RATE))
    seconds = float(config.get("segment_seconds", 8.0) if segment_seconds is None
                    else segment_seconds)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--segment-seconds={seconds:g} must be a positive number of seconds "
                         "(the paper uses 8)")
    segment = int(round(seconds * rate))
    minimum = model.n_fft // 2 + 1  # the STFT's reflect padding needs more than n_fft // 2
    if segment < minimum:
        raise ValueError(f"--segment-seconds={seconds:g} gives {segment} samples; this model's "
                         f"STFT needs at least {minimum} ({minimum / rate:.3f} s); the paper "
                         "uses 8")
    params = jax.device_put(params)
    budget = inference.memory_budget()

    def compile_at(b: int) -> inference.CompiledForward:
        return inference.compile_forward(model.apply, params, b, 2, segment)

    if batch_size == "auto":
        forward = inference.choose_batch_size(compile_at, budget, inference.default_max_batch())
    else:
        forward = compile_at(int(batch_size))
    gib = forward.call_bytes / 2**30
    if budget is not None and forward.call_bytes > budget:
        fix = ("lower --batch-size (or use auto)" if forward.batch > 1 else
               "shorter --segment-seconds (at some cost in quality)")
        print(f"warning: one model call on {forward.batch} x {seconds:g} s needs {gib:.2f} GiB, "
              f"more than the {budget / 2**30:.2f} GiB budget (half of available memory on a "
              f"CPU); it may run out of memory: {fix}", file=sys.stderr)
    what = (f"{config.get('source', checkpoint)} ({config.get('weights')} weights"
            f"{'' if config.get('step') is None else ', step ' + str(config['step'])}), "
            f"{model.dtype}, {forward.batch} x {seconds:g} s segments per call ({gib:.2f} GiB)")
    compiled = forward.fn
    inference.release_freed_memory()  # the compiler's freed heap: lowers the separation's peak
    return Separator(lambda x: compiled(params, x), rate, segment, overlap, forward.batch, what,
                     forward.call_bytes)


# ----------------------------------------------------------------------------- files


@dataclasses.dataclass
class FileResult:
    path: Path
    error: str | None = None
    seconds: float = 0.0  # audio duration
    wall: float = 0.0  # separation time, reading and writing included
    segments: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)


def output_paths(inputs: Sequence[Path], out_dir: Path, fmt: str, *, overwrite: bool = False,
                 reads: Sequence[Path] = ()) -> list[OutputPlan | str]:
    """Per input: where its stems go (OUTDIR/<name>/<stem>.<ext>), or why they cannot go there.

    Refused: an output that is one of the inputs or of `reads` (the model), a second input of
    the same name, a folder blocked by a file, an output path that is a folder, and a folder
    that already holds a separation (vocals.* or accompaniment.*) unless `overwrite`; then the
    new files replace the earlier ones, including those of another format.
    """
    ext = FORMATS[fmt][2]
    guard = OutputGuard([*inputs, *reads])
    seen: dict[str, Path] = {}
    out: list[OutputPlan | str] = []
    for p in inputs:
        folder = out_dir / p.stem
        paths = {s: folder / f"{s}.{ext}" for s in STEMS}
        if p.stem in seen and seen[p.stem].resolve() != p.resolve():
            out.append(f"{p}: {seen[p.stem]} already writes to {folder}; rename one or separate "
                       "them into different -o folders")
            continue
        seen.setdefault(p.stem, p)
        if folder.exists() and not folder.is_dir():
            out.append(f"{p}: the output folder {folder} is blocked by a file of that name; "
                       "move it or choose another -o folder")
            continue
        if any(q.is_dir() for q in paths.values()):
            out.append(f"{p}: an output path in {folder} is a folder; move it or choose another "
                       "-o folder")
            continue
        earlier = tuple(q for q in (folder / f"{s}.{e}" for s in STEMS for e in EXTENSIONS)
                        if q.is_file())
        try:
            for q in (*paths.values(), *(earlier if overwrite else ())):
                guard.check(q, name="its output")
        except OutputPathError as e:
            out.append(f"{p}: {e}")
            continue
        if earlier and not overwrite:
            names = ", ".join(q.name for q in earlier)
            out.append(f"{p}: {folder} already holds a separation ({names}); pass --overwrite "
                       "to replace it (once the new one is complete), or choose another -o "
                       "folder")
            continue
        out.append(OutputPlan(paths, overwrite, earlier if overwrite else ()))
    return out


def segment_plan(separator: Separator, info: InputInfo) -> SegmentPlan:
    """How `separate_file` cuts this input (at the model's rate); progress counts `count`."""
    from bsmamba2_jax import inference

    length = resampled_length(info.frames, info.rate, separator.rate)
    return inference.plan_segments(length, separator.segment, separator.overlap)


def separate_file(separator: Separator, info: InputInfo, output: OutputPlan, fmt: str,
                  progress: bool = False, on_batch: Callable[[int], None] | None = None
                  ) -> FileResult:
    """Separates one scanned input into its two output files (written only when complete).

    on_batch: called with the number of segments of each batch once it is separated (of
    `segment_plan(...).count`); an exception it raises stops the file, whose outputs are then
    removed.
    """
    from tqdm import tqdm

    from bsmamba2_jax import inference

    start = time.perf_counter()
    plan = segment_plan(separator, info)
    folder = output.paths["vocals"].parent
    made_folder = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e, FIX_WRITE) from e
    writer = None
    try:
        writer = OutputWriter(info, output, fmt, separator.rate)
        with tqdm(total=plan.count, unit="seg", leave=False, disable=not progress,
                  dynamic_ncols=True, desc=info.path.name) as bar:
            def advance(real: int) -> None:
                bar.update(real)
                if on_batch is not None:
                    on_batch(real)

            inference.separate_stream(separator.fn, model_input(info, separator.rate), plan,
                                      separator.batch_size, writer, on_batch=advance)
        warnings = writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        if made_folder:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return FileResult(info.path, seconds=info.frames / info.rate,
                      wall=time.perf_counter() - start, segments=plan.count, warnings=warnings)


def run(inputs: Sequence[str | Path], out_dir: str | Path,
        separator: Separator | Callable[[], Separator], *, fmt: str = "wav",
        nonfinite: str = "error", progress: bool = True, overwrite: bool = False,
        model: str | Path | None = None) -> list[FileResult]:
    """Separates every input, each on its own; returns one FileResult per input (in order).

    Every input is checked (and read once) before the model is loaded; `separator` is either
    ready or a function that loads it, called only if some input passed. Per-file problems are
    FileResult.error (an OUT/<name>/ that holds a separation already is one, unless
    `overwrite`); a bad argument raises ValueError. model: the path the separator reads, kept
    safe from outputs as the inputs are (never written over, nothing written into its run).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is not one of {sorted(FORMATS)}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"--nonfinite={nonfinite!r} is not one of {NONFINITE}")
    inputs = [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"-o {out_dir} is a file; give a folder (created if missing)")
    reads = [] if model is None else [Path(model)]
    try:  # -o itself only receives OUT/<name>/ folders, each checked below
        check_output(out_dir, [*inputs, *reads], name="-o", whole=False)
    except OutputPathError as e:
        raise ValueError(str(e)) from e
    results = [FileResult(p) for p in inputs]
    ready: list[tuple[FileResult, InputInfo, OutputPlan]] = []
    plans = output_paths(inputs, out_dir, fmt, overwrite=overwrite, reads=reads)
    for result, plan in zip(results, plans, strict=True):
        try:
            if isinstance(plan, str):
                raise SeparationError(plan)
            info = scan_input(result.path, nonfinite)
        except SeparationError as e:
            result.error = str(e)
            print(f"error: {e}", file=sys.stderr)
            continue
        if info.nonfinite:
            result.warnings.append(f"{info.path}: {info.nonfinite} non-finite samples (NaN or "
                                   "Inf) replaced by zeros (--nonfinite zero)")
        ready.append((result, info, plan))
    if not ready:
        return results
    if not isinstance(separator, Separator):
        separator = separator()
        print(f"model: {separator.description}", file=sys.stderr)
    for result, info, plan in ready:
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        try:
            done = separate_file(separator, info, plan, fmt, progress)
        except (SeparationError, OSError, ValueError, RuntimeError) as e:
            # RuntimeError covers libsndfile's errors and XLA's (out of memory, for one).
            result.error = str(e) if isinstance(e, SeparationError) else f"{info.path}: {e}"
            print(f"error: {result.error}", file=sys.stderr)
            continue
        result.seconds, result.wall, result.segments = done.seconds, done.wall, done.segments
        result.warnings += done.warnings
        for w in done.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{info.path} -> {plan.paths['vocals'].parent} ({result.seconds:.1f} s of audio in "
              f"{result.wall:.1f} s, {result.segments} segments)")
    return results


# ----------------------------------------------------------------------------- command line


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (the paper uses "
                                         f"8), got {text!r}")
    return value


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (0 = the paper's "
                                         f"protocol), got {text!r}")
    return value


def add_separation_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and separation flags, shared by every command that separates: --checkpoint,
    --weights, --dtype, --format, --segment-seconds, --overlap, --batch-size, --nonfinite."""
    parser.add_argument("--checkpoint", default=os.environ.get(MODEL_ENV),
                        help="model file from `python -m bsmamba2_jax.export`, a train.py workdir "
                             f"or a checkpoint step directory (default: ${MODEL_ENV})")
    parser.add_argument("--weights", choices=("raw", "ema"), default=None,
                        help="which weights of a checkpoint that has both (default: EMA for a "
                             "training checkpoint; a model file holds one kind)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="compute dtype (default auto: float32 on a CPU, which emulates "
                             "bf16; the model's own, bfloat16 for the paper, on a GPU)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="wav",
                        help="wav = 32-bit float wav (default, never clips), flac = 24-bit "
                             "flac, wav16/wav24 = PCM wav")
    parser.add_argument("--segment-seconds", type=_seconds, default=None,
                        help="segment length in seconds (default: the model's training "
                             "length, 8 s for the paper)")
    parser.add_argument("--overlap", type=_overlap, default=0.0,
                        help="segment overlap fraction in [0, 1); 0 = the paper's protocol")
    parser.add_argument("--batch-size", type=_batch_size, default="auto",
                        help="segments per model call: auto (default) picks what fits in memory, "
                             "or a whole number >= 1")
    parser.add_argument("--nonfinite", choices=NONFINITE, default="error",
                        help="input samples that are NaN or Inf: error (default) fails that "
                             "file; zero replaces them by zeros with a warning")


def check_model_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through `parser.error` (status 2) when --checkpoint is missing or names nothing."""
    if not args.checkpoint:
        parser.error(f"no model: pass --checkpoint MODEL_FILE or set ${MODEL_ENV} (make one "
                     "with `python -m bsmamba2_jax.export WORKDIR model.msgpack`)")
    if not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or folder")


def separator_from_args(args: argparse.Namespace) -> Separator:
    """`load_separator` with the flags of `add_separation_arguments`."""
    return load_separator(args.checkpoint, weights=args.weights, dtype=args.dtype,
                          segment_seconds=args.segment_seconds, overlap=args.overlap,
                          batch_size=args.batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bsmamba2-separate",
        description="Split songs into vocals and accompaniment with a BSMamba2 model.")
    parser.add_argument("inputs", nargs="+", help="audio files (wav, flac, ogg, ...)")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder (created if missing); each input gets OUTPUT/<name>/"
                             ", refused if that already holds a separation (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier separation in OUTPUT/<name>/ (its vocals.* "
                             "and accompaniment.*; nothing else there), once the new one is "
                             "complete")
    add_separation_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_argument(parser, args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"-o {out_dir} is a file; give a folder (created if missing)")
    try:
        results = run(args.inputs, out_dir, lambda: separator_from_args(args), fmt=args.format,
                      nonfinite=args.nonfinite, progress=not args.no_progress,
                      overwrite=args.overwrite, model=args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if r.error]
    if len(results) > 1 or failed:
        print(f"separated {len(results) - len(failed)} of {len(results)} files into {out_dir}"
              + (f"; {len(failed)} failed:" if failed else ""), file=sys.stderr)
        for r in failed:
            print(f"  {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
