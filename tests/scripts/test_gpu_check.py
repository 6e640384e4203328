"""scripts/gpu_check: a hung step is cut at its part's budget and the other parts still run; the
dry mode runs every step on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import gpu_check

REPO = Path(__file__).resolve().parents[2]


def _parts(steps_by_part: dict[str, list[list[str]]], budget: float) -> list[gpu_check.Part]:
    return [gpu_check.Part(name, budget,
                           lambda out, dry, cmds=cmds: [gpu_check.Step(f"s{i}", c)
                                                        for i, c in enumerate(cmds)], name)
            for name, cmds in steps_by_part.items()]


def test_a_hung_step_is_killed_at_its_budget_and_later_parts_run(tmp_path, monkeypatch):
    hang = [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '60'])"]
    write = [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w').write('yes')"]
    monkeypatch.setattr(gpu_check, "PARTS", _parts({"slow": [hang, write], "next": [write]}, 3.0))
    t0 = time.monotonic()
    rc = gpu_check.run(tmp_path, dry=False, parts=None, total_s=60.0)
    assert time.monotonic() - t0 < 15  # the sleeping grandchild was killed with its group
    record = json.loads((tmp_path / "parts.json").read_text())
    steps = {(p["name"], s["name"]): s["status"] for p in record["parts"] for s in p["steps"]}
    assert steps == {("slow", "s0"): "timeout", ("slow", "s1"): "skipped (budget)",
                     ("next", "s0"): "ok"}
    assert (tmp_path / "ran").read_text() == "yes" and rc == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| slow | s0 | timeout |" in summary and "| next | s0 | ok |" in summary


def test_the_total_budget_caps_every_part(tmp_path, monkeypatch):
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(gpu_check, "PARTS", _parts({"a": [hang], "b": [hang]}, 30.0))
    t0 = time.monotonic()
    gpu_check.run(tmp_path, dry=False, parts=None, total_s=4.0)
    assert time.monotonic() - t0 < 15
    record = json.loads((tmp_path / "parts.json").read_text())
    assert [p["steps"][0]["status"] for p in record["parts"]] == ["timeout", "skipped (budget)"]


def test_summary_tabulates_rows_of_any_schema(tmp_path):
    (tmp_path / "train_x.json").write_text(json.dumps(
        {"rows": [{"impl": "pallas", "batch": 5, "step_s": 0.25}, {"impl": "xla", "oom": True}]}))
    (tmp_path / "inference.json").write_text(json.dumps(
        {"rows": [{"dtype": "bfloat16", "wall_seconds": 12.5}]}))
    gpu_check.write_summary(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| impl | batch | step_s | oom |" in summary
    assert "| xla | - | - | True |" in summary and "| bfloat16 | 12.5 |" in summary
    assert "## SSD speed\n\nnot measured" in summary


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    """The whole check on the CPU (tiny shapes, the tiny config, a 10 s track): every step that
    does not need the card passes; mamba_ssm's column is skipped without a CUDA device."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3000)
    record = json.loads((out / "parts.json").read_text())
    assert [p["name"] for p in record["parts"]] == [p.name for p in gpu_check.PARTS]
    failed = [(p["name"], s["name"], s["status"]) for p in record["parts"] for s in p["steps"]
              if s["status"] != "ok"]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:])
    summary = (out / "summary.md").read_text()
    assert "| tiny-time | 2 | bfloat16 | fwdbwd | pallas_triton |" in summary
    assert "| tiny-time | 2 | bfloat16 | fwdbwd | pallas_mosaic |" in summary
    assert "mamba_ssm column" in summary
    assert json.loads((out / "inference.json").read_text())["rows"][0]["wall_seconds"] > 0
