"""Run logging: a progress line, metrics as JSON lines and TensorBoard events (process 0 only).

TensorBoard also gets, at each validation, the run's example windows (`validate.choose_examples`)
as audio and mel spectrograms (`MetricWriter.write_examples`): tags `examples/<k>/...`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from bsmamba2_jax import plots
from bsmamba2_jax.data.musdb import SAMPLE_RATE

if TYPE_CHECKING:
    from bsmamba2_jax.train.validate import ExampleWindow


class MetricWriter:
    """Writes workdir/metrics.jsonl and TensorBoard events in workdir/tensorboard/.

    Other processes get a writer that does nothing, so callers need no `if process_index == 0`.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.active:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - lives with the run
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: heavy import, optional at run time

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self._shown: set[int] = set()  # examples whose mixture and reference are written

    @property
    def tensorboard(self) -> bool:
        """Whether this writer writes TensorBoard events (process 0 with tensorboard on)."""
        return self._tb is not None

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.active:
            return
        record = {"step": int(step), **{prefix + k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def write_examples(self, step: int, examples: Sequence[ExampleWindow],
                       audio: Mapping[int, Mapping[str, np.ndarray]],
                       rate: int = SAMPLE_RATE) -> None:
        """The example windows' audio and mel spectrograms as TensorBoard summaries.

        For example k: `examples/k/estimate` (every validation), `examples/k/mixture`,
        `examples/k/reference` and the text `examples/k/about` (once per writer: they do not
        change), all mid (the channels' mean), 16-bit WAV at `rate`, clipped to [-1, 1]; and
        the image `examples/k/mel`: mel spectrograms of the reference, the estimate and the
        residual (estimate - reference), top to bottom, on one dB scale (`plots.PREVIEW_MEL`).

        Args:
          examples: the run's `validate.choose_examples`.
          audio: `validate.validate`'s kept windows, {index: {"mixture", "vocals", "estimate"}:
            (2, samples)}; must hold every example's index.
        """
        if self._tb is None:
            return
        for k, ex in enumerate(examples):
            # NaN/Inf (a diverging run) shown as silence: the scalars already report it.
            clip = {name: np.nan_to_num(np.asarray(x[:, ex.start:ex.start + ex.length],
                                                   np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                    for name, x in audio[ex.index].items()}
            tag = f"examples/{k}"
            if k not in self._shown:
                self._tb.add_text(f"{tag}/about", ex.about, int(step))
                for name, key in (("mixture", "mixture"), ("reference", "vocals")):
                    self._tb.add_audio(f"{tag}/{name}", _mid(clip[key]), int(step),
                                       sample_rate=rate)
                self._shown.add(k)
            self._tb.add_audio(f"{tag}/estimate", _mid(clip["estimate"]), int(step),
                               sample_rate=rate)
            residual = clip["estimate"] - clip["vocals"]
            image = plots.mel_strip([clip["vocals"], clip["estimate"], residual], rate,
                                    **plots.PREVIEW_MEL)
            self._tb.add_image(f"{tag}/mel", image, int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _mid(x: np.ndarray) -> np.ndarray:
    """(channels, samples) -> (samples, 1): the channels' mean, clipped to [-1, 1] (what a 16-bit
    WAV holds)."""
    return np.clip(x.mean(axis=0), -1.0, 1.0)[:, None]


class Progress:
    """Examples/s and ETA from wall time between calls (the first interval includes compilation)."""

    def __init__(self, first_step: int, total_steps: int, examples_per_step: int):
        self.total_steps = total_steps
        self.examples_per_step = examples_per_step
        self._t, self._step = time.perf_counter(), first_step

    def line(self, step: int, metrics: dict[str, float]) -> tuple[str, float]:
        now = time.perf_counter()
        rate = (step - self._step) * self.examples_per_step / max(now - self._t, 1e-9)
        self._t, self._step = now, step
        eta = (self.total_steps - step) * self.examples_per_step / max(rate, 1e-9)
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return (f"step {step}/{self.total_steps} {text} | {rate:.2f} ex/s "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"), rate
