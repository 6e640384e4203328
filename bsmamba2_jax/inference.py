"""Whole-track separation by segments, streamed with bounded memory (docs/DESIGN.md#evaluation).

The protocol is the authors' separator (`src/separator.py` of github.com/EuiYeonKim/BSMamba2):
non-overlapping segments of 8 s, concatenated, every last one zero-padded to a full segment. A
track shorter than one segment is zero-padded to one segment as well: the bidirectional time pass
sees the padding, so the result depends on it, and the authors' numbers were made this way. With
`overlap > 0` segments overlap by that fraction and are blended by overlap-add with a fade window,
divided by the summed window, so the blend is exact: an identity model returns its input.

Two ways in:
  - `separate_vocals(model, params, audio)`: whole tracks in memory, for evaluation and notebooks;
  - `separate_stream(fn, blocks, plan, batch_size, sink)`: a track as an iterator of blocks in, the
    finished output handed to `sink` block by block. Reading and segmenting run on one background
    thread, the overlap-add and `sink` on another, `fn` on the calling thread, so file I/O overlaps
    with the model and memory holds a few batches, whatever the track's length. Every `fn` call
    gets the same shape (the last batch is zero-filled), so a jitted `fn` compiles once.

The in-memory `split_segments` / `overlap_add` are the obviously-right references the streamed path
is tested against. `compile_forward` and `choose_batch_size` size the batch of segments from XLA's
compiled memory analysis and the memory the machine has.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bsmamba2_jax.data.musdb import SAMPLE_RATE


class SegmentPlan(NamedTuple):
    """How a track of `length` samples is cut: segment starts are i * hop, i < count."""

    length: int  # samples of the track
    segment: int  # samples per segment
    hop: int  # samples between segment starts
    count: int  # number of segments

    @property
    def padded_length(self) -> int:
        return (self.count - 1) * self.hop + self.segment


def plan_segments(length: int, segment: int, overlap: float = 0.0) -> SegmentPlan:
    """Segments of `segment` samples, overlapping by the fraction `overlap`, covering `length`.

    Every segment has `segment` samples: the last one, and the only one of a track shorter than a
    segment, are zero-padded (the authors' separator does the same).
    """
    if length < 1 or segment < 1:
        raise ValueError(f"length={length} and segment={segment} must be positive")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap} must be a fraction in [0, 1)")
    if length <= segment:
        return SegmentPlan(length, segment, segment, 1)
    hop = max(1, segment - int(round(overlap * segment)))
    count = 1 + -(-(length - segment) // hop)
    return SegmentPlan(length, segment, hop, count)


def fade_window(segment: int, hop: int) -> np.ndarray:
    """(segment,) float32: 1 in the middle, linear fades over the overlap (segment - hop) at
    both ends. Strictly positive, so the summed window never vanishes; all ones when hop ==
    segment (plain concatenation)."""
    fade = segment - hop
    w = np.ones(segment, np.float64)
    if fade > 0:
        ramp = np.arange(1, fade + 1) / (fade + 1)  # never 0 nor 1
        w[:fade] = ramp
        w[segment - fade:] = ramp[::-1]
    return w.astype(np.float32)


# ----------------------------------------------------------------------------- in-memory references


def split_segments(audio: np.ndarray, plan: SegmentPlan) -> np.ndarray:
    """audio (b, c, length) -> segments (b, count, c, segment), the tail zero-padded."""
    b, c, n = audio.shape
    padded = np.zeros((b, c, plan.padded_length), np.float32)
    padded[..., :n] = audio
    starts = np.arange(plan.count) * plan.hop
    idx = starts[:, None] + np.arange(plan.segment)[None, :]  # (count, segment)
    return np.transpose(padded[:, :, idx], (0, 2, 1, 3))


def overlap_add(segments: np.ndarray, plan: SegmentPlan,
                window: np.ndarray | None = None) -> np.ndarray:
    """segments (b, count, c, segment) -> (b, c, length): sum of window * segment / summed window.

    `window` defaults to `fade_window(segment, hop)`.
    """
    b, count, c, seg = segments.shape
    window = fade_window(seg, plan.hop) if window is None else window
    out = np.zeros((b, c, plan.padded_length), np.float64)
    total = np.zeros(plan.padded_length, np.float64)
    for i in range(count):
        s = i * plan.hop
        out[:, :, s:s + seg] += segments[:, i] * window
        total[s:s + seg] += window
    return (out / total)[..., :plan.length].astype(np.float32)


# ----------------------------------------------------------------------------- streaming pieces


def iter_segments(blocks: Iterable[np.ndarray], plan: SegmentPlan) -> Iterator[np.ndarray]:
    """Cuts a track given as consecutive blocks (c, n_i) into the plan's segments (c, segment).

    Holds at most one segment plus one block; each sample is copied about once (blocks are
    joined only when a segment is complete). The segments may be views: do not write to them.
    Raises ValueError when the blocks add up to more or fewer than `plan.length` samples (a file
    shorter than its header said, for example).
    """
    pending: list[np.ndarray] = []  # consecutive blocks from track position `start` on
    have = 0  # samples in pending
    start = 0
    seen = 0
    i = 0
    for block in blocks:
        block = np.asarray(block, np.float32)
        seen += block.shape[-1]
        if seen > plan.length:
            raise ValueError(f"the track has more than the {plan.length} samples planned")
        pending.append(block)
        have += block.shape[-1]
        if i < plan.count and start + have >= i * plan.hop + plan.segment:
            buf = pending[0] if len(pending) == 1 else np.concatenate(pending, axis=-1)
            while i < plan.count and start + buf.shape[-1] >= i * plan.hop + plan.segment:
                s = i * plan.hop - start
                yield buf[:, s:s + plan.segment]
                i += 1
                drop = min(i * plan.hop - start, buf.shape[-1])  # no later segment needs these
                buf, start = buf[:, drop:], start + drop
            pending, have = [buf], buf.shape[-1]
    if seen != plan.length:
        raise ValueError(f"the track ended after {seen} of {plan.length} samples")
    if i < plan.count:  # the zero-padded tail
        buf = np.concatenate(pending, axis=-1)
        while i < plan.count:
            s = i * plan.hop - start
            seg = np.zeros((buf.shape[0], plan.segment), np.float32)
            part = buf[:, s:s + plan.segment]
            seg[:, :part.shape[-1]] = part
            yield seg
            i += 1


def iter_batches(segments: Iterable[np.ndarray], batch_size: int
                 ) -> Iterator[tuple[np.ndarray, int]]:
    """Segments (c, seg) -> (batch (batch_size, c, seg), number of real segments in it).

    The last batch is zero-filled to batch_size, so every batch has one shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    batch: np.ndarray | None = None
    real = 0
    for seg in segments:
        if batch is None:
            batch = np.zeros((batch_size,) + seg.shape, np.float32)
        batch[real] = seg
        real += 1
        if real == batch_size:
            yield batch, real
            batch, real = None, 0
    if real:
        yield batch, real


class OverlapAdd:
    """Streaming `overlap_add`: feed output segments in order, get finished samples back.

    Gives the same float32 numbers as `overlap_add` (same float64 sums in the same order) while
    holding one segment of accumulator.
    """

    def __init__(self, plan: SegmentPlan, channels: int, window: np.ndarray | None = None):
        self.plan = plan
        self.window = fade_window(plan.segment, plan.hop) if window is None else window
        self._out = np.zeros((channels, plan.segment), np.float64)  # from segment i's start
        self._total = np.zeros(plan.segment, np.float64)
        self._i = 0

    def add(self, segment: np.ndarray) -> np.ndarray:
        """segment (c, seg) of index i -> the finished samples [i * hop, next start) (c, k)."""
        plan, i = self.plan, self._i
        if i >= plan.count:
            raise ValueError(f"all {plan.count} segments were already added")
        start = i * plan.hop
        end = plan.length if i == plan.count - 1 else min((i + 1) * plan.hop, plan.length)
        k = max(0, end - start)
        self._i += 1
        if plan.hop == plan.segment:
            # No overlap: window 1, summed window 1, so the blend is the segment itself, exactly.
            return np.array(segment[:, :k], np.float32)
        self._out += segment * self.window
        self._total += self.window
        done = (self._out[:, :k] / self._total[:k]).astype(np.float32)
        # Shift the accumulator to the next segment's start; the new tail starts at zero.
        shift = plan.hop
        self._out[:, :-shift] = self._out[:, shift:]
        self._out[:, -shift:] = 0
        self._total[:-shift] = self._total[shift:]
        self._total[-shift:] = 0
        return done


_DONE = object()


class _Failed(NamedTuple):
    error: BaseException


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up (False) once `stop` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    """Blocking get that gives up (returns _DONE) once `stop` is set."""
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                return _DONE


def separate_stream(fn: Callable[[np.ndarray], Any], blocks: Iterable[np.ndarray],
                    plan: SegmentPlan, batch_size: int, sink: Callable[[np.ndarray], None], *,
                    on_batch: Callable[[int], None] | None = None, depth: int = 2) -> None:
    """Runs `fn` over a streamed track and hands the finished output to `sink`, in order.

    Args:
      fn: (batch_size, c, segment) float32 -> (batch_size, c, segment); always this shape.
      blocks: the track as consecutive (c, n_i) float32 blocks, `plan.length` samples in all;
        iterated on a background thread (so reading and decoding overlap with `fn`).
      plan: from `plan_segments`.
      batch_size: segments per `fn` call.
      sink: called with consecutive (c, k) float32 blocks of the output, `plan.length` samples in
        all, on a second background thread (so writing overlaps with `fn`).
      on_batch: called on the calling thread with the number of real segments after each batch.
      depth: batches queued on each side; memory is about (2 * depth + 2) batches.
    Raises whatever the blocks, `fn` or `sink` raised, after stopping both threads.
    """
    stop = threading.Event()  # set: the threads stop taking work
    inputs: queue.Queue = queue.Queue(depth)
    outputs: queue.Queue = queue.Queue(depth)
    sink_errors: list[BaseException] = []

    def produce() -> None:
        try:
            for item in iter_batches(iter_segments(blocks, plan), batch_size):
                if not _put(inputs, item, stop):
                    return
            _put(inputs, _DONE, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            _put(inputs, _Failed(e), stop)

    def consume() -> None:
        ola: OverlapAdd | None = None
        while (item := outputs.get()) is not _DONE:
            if stop.is_set():
                continue  # drain, so the calling thread never blocks on a full queue
            try:
                out, real = item
                if ola is None:
                    ola = OverlapAdd(plan, channels=out.shape[1])
                for seg in out[:real]:
                    sink(ola.add(seg))
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                sink_errors.append(e)
                stop.set()

    reader = threading.Thread(target=produce, name="separate-read", daemon=True)
    writer = threading.Thread(target=consume, name="separate-write", daemon=True)
    reader.start()
    writer.start()
    try:
        while True:
            item = _get(inputs, stop)
            if item is _DONE:
                break
            if isinstance(item, _Failed):
                raise item.error
            batch, real = item
            out = np.asarray(fn(batch), np.float32)
            if out.shape != batch.shape:
                raise ValueError(f"the model returned shape {out.shape} for a batch of shape "
                                 f"{batch.shape}; it must return the same shape")
            _put(outputs, (out, real), stop)
            if on_batch is not None:
                on_batch(real)
    except BaseException:
        stop.set()
        raise
    finally:
        outputs.put(_DONE)  # the writer drains to _DONE, so this never blocks for long
        writer.join()
        stop.set()
        reader.join()
    if sink_errors:
        raise sink_errors[0]


def separate_with(fn: Callable[[np.ndarray], Any], audio: np.ndarray, plan: SegmentPlan,
                  batch_size: int) -> np.ndarray:
    """In memory: runs `fn` (n, c, segment) -> (n, c, segment) over every track's segments.

    audio (b, c, length) -> (b, c, length) float32. Each track is streamed on its own; calls get
    min(batch_size, plan.count) segments (no all-padding batch for a short track).
    """
    audio = np.asarray(audio, np.float32)
    out = np.empty(audio.shape, np.float32)
    for k, track in enumerate(audio):
        pos = 0

        def sink(block: np.ndarray, k: int = k) -> None:
            nonlocal pos
            out[k, :, pos:pos + block.shape[-1]] = block
            pos += block.shape[-1]

        separate_stream(fn, [track], plan, min(batch_size, plan.count), sink)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: Any, params: Any, audio: jax.Array) -> jax.Array:
    return model.apply(params, audio)


def separate_vocals(model: Any, params: Any, audio: Any, segment_seconds: float = 8.0,
                    overlap: float = 0.0, batch_size: int = 4,
                    sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Vocals of whole tracks held in memory.

    Args:
      model: a `BSMamba2` (any Flax module mapping (n, 2, samples) -> (n, 2, samples)).
      params: its variables, as given to `model.apply`.
      audio: (2, samples) or (batch, 2, samples) float, numpy or jax.
      segment_seconds: segment length; every segment, a short track's only one included, is
        zero-padded to this length.
      overlap: fraction of a segment shared with the next, in [0, 1); 0 = the paper's
        concatenated segments, > 0 = overlap-add with a fade window.
      batch_size: segments per model call.
      sample_rate: Hz, to turn segment_seconds into samples.
    Returns:
      vocals as a float32 numpy array of the input's shape.
    """
    shape = getattr(audio, "shape", None)
    if shape is None or len(shape) not in (2, 3) or shape[-2] != 2:
        raise ValueError(f"audio must have shape (2, samples) or (batch, 2, samples) (stereo), "
                         f"got {shape}")
    if not jnp.issubdtype(audio.dtype, jnp.floating):
        raise ValueError(f"audio must be floating point, got dtype {audio.dtype}")
    x = np.asarray(audio, np.float32)
    x3 = x[None] if x.ndim == 2 else x
    plan = plan_segments(x3.shape[-1], int(round(segment_seconds * sample_rate)), overlap)
    out = separate_with(lambda seg: _apply(model, params, seg), x3, plan, batch_size)
    return out[0] if x.ndim == 2 else out


# ----------------------------------------------------------------------------- memory


class CompiledForward(NamedTuple):
    """A forward compiled for one batch shape, and the memory one call needs."""

    fn: Callable[[Any, Any], Any]  # (params, (batch, c, segment) float32) -> same shape
    batch: int
    call_bytes: int  # temporaries + input + output of one call (the params are resident)


def compile_forward(apply: Callable[[Any, Any], Any], params: Any, batch: int, channels: int,
                    segment: int) -> CompiledForward:
    """Compiles `apply(params, audio)` for audio (batch, channels, segment) float32.

    The memory comes from XLA's compiled memory analysis; where a backend gives none, it is
    estimated as 8x the input and output (no backend used by this project lacks it).
    """
    spec = jax.ShapeDtypeStruct((batch, channels, segment), jnp.float32)
    compiled = jax.jit(apply).lower(params, spec).compile()
    io = 2 * batch * channels * segment * 4
    stats = compiled.memory_analysis()
    temp = getattr(stats, "temp_size_in_bytes", None) if stats is not None else None
    call_bytes = int(temp) + io if temp is not None else 8 * io
    return CompiledForward(compiled, batch, call_bytes)


def memory_budget(device: Any = None) -> int | None:
    """Bytes that one forward call may use, or None when unknown.

    On a GPU/TPU: 90% of the device memory not in use (the params are already there). On the
    CPU: half of MemAvailable (/proc/meminfo), leaving room for other programs and for the page
    cache, which MemAvailable counts as free.
    """
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(0.9 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return None


def choose_batch_size(compile_at: Callable[[int], CompiledForward], budget: int | None,
                      max_batch: int) -> CompiledForward:
    """The largest batch <= max_batch whose compiled forward fits in `budget` bytes.

    compile_at(b) compiles the forward for batch b. Batch 1 is compiled first and sizes the
    guess budget // (its memory); the guess is compiled and checked, and halved until it fits.
    Batch 1 is returned when nothing larger fits (or the budget is unknown) — the caller warns
    when even that exceeds the budget.
    """
    one = compile_at(1)
    if budget is None or max_batch <= 1:
        return one
    b = min(max_batch, budget // max(one.call_bytes, 1))
    while b > 1:
        c = compile_at(b)
        if c.call_bytes <= budget:
            return c
        b //= 2
    return one


def release_freed_memory() -> None:
    """Hands memory freed by Python and XLA back to the OS (glibc's malloc_trim; a no-op
    elsewhere).

    Compiling the paper model leaves ~0.2 GB of freed heap that glibc keeps mapped; separation's
    peak is this baseline plus one call's temporaries, so trimming it lowers the peak RSS.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_max_batch(device: Any = None) -> int:
    """Segments per call worth batching: 1 on a CPU, 8 elsewhere.

    On a CPU one 8 s segment already keeps every core busy; batching measured no faster per
    segment (benchmarks/RESULTS.md, Separation) and multiplies the memory.
    """
    device = device or jax.devices()[0]
    return 1 if device.platform == "cpu" else 8
