"""Run logging: a progress line, metrics as JSON lines and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


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

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
