"""What a launch may do to a workdir: resume checks, --restart, config history, metrics."""

from __future__ import annotations

import json

import pytest

from bsmamba2_jax.train import workdir as workdir_lib
from configs.bsmamba2 import get_config


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def old_run(tmp_path):
    """A workdir as train.py leaves it after a tiny run."""
    config = get_config("tiny")
    workdir_lib.record_config(tmp_path, config, workdir_lib.LaunchPlan(False, {}), 0)
    (tmp_path / "checkpoints" / "6").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6" / "x").write_text("state")
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "synthetic.json").write_text("{}")
    return config


def test_new_workdir_is_a_new_run(tmp_path):
    plan = workdir_lib.check_launch(tmp_path / "fresh", get_config("tiny"))
    assert plan == workdir_lib.LaunchPlan(resume=False, changes={})
    assert not (tmp_path / "fresh").exists()  # checking writes nothing
    (tmp_path / "derived" / "synthetic").mkdir(parents=True)  # data only: not a run
    assert not workdir_lib.check_launch(tmp_path / "derived", get_config("tiny")).resume


def test_incompatible_resume_names_the_fields_and_touches_nothing(tmp_path):
    old_run(tmp_path)
    before = snapshot(tmp_path)
    config = get_config("tiny")
    config.model.dim, config.optim.accum_steps, config.total_steps = 64, 3, 99
    with pytest.raises(ValueError) as e:
        workdir_lib.check_launch(tmp_path, config)
    message = str(e.value)
    assert "model.dim: 32 (run) -> 64 (this launch)" in message
    assert "optim.accum_steps: 2 (run) -> 3" in message
    assert "total_steps" not in message.split("Fields a resume may change")[0]  # resumable
    assert "--workdir" in message and "--restart" in message
    assert snapshot(tmp_path) == before


def test_compatible_change_is_kept_beside_the_old_config(tmp_path):
    old_run(tmp_path)
    original = (tmp_path / "config.json").read_text()
    config = get_config("tiny")
    config.total_steps, config.log_every = 60, 5
    plan = workdir_lib.check_launch(tmp_path, config)
    assert plan.resume and plan.changes == {"log_every": (1, 5), "total_steps": (6, 60)}
    assert workdir_lib.record_config(tmp_path, config, plan, 6).name == "config.6.json"
    assert workdir_lib.record_config(tmp_path, config, plan, 6).name == "config.6.2.json"
    assert (tmp_path / "config.json").read_text() == original  # never overwritten
    assert json.loads((tmp_path / "config.6.json").read_text())["total_steps"] == 60
    assert workdir_lib.run_config(tmp_path).total_steps == 60  # the newest applies next
    # The next launch compares with the newest config: nothing changed, nothing written.
    again = workdir_lib.check_launch(tmp_path, config)
    assert again.resume and again.changes == {}
    assert workdir_lib.record_config(tmp_path, config, again, 9) is None


def test_restart_moves_the_run_aside_and_keeps_the_data(tmp_path):
    old_run(tmp_path)
    before = snapshot(tmp_path)
    config = get_config("tiny")
    config.model.dim = 64
    plan = workdir_lib.check_launch(tmp_path, config, restart=True)
    assert plan.restart and not plan.resume
    dest = workdir_lib.move_run_aside(tmp_path)
    assert dest.parent == tmp_path / "previous_runs"
    moved = {k: v for k, v in before.items() if not k.startswith("synthetic")}
    assert snapshot(dest) == moved  # every run file, byte for byte
    assert snapshot(tmp_path / "synthetic") == {"synthetic.json": b"{}"}
    assert not workdir_lib.check_launch(tmp_path, config).resume  # the workdir is fresh


def test_run_files_without_a_config_are_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no config.json and no checkpoint.*--restart"):
        workdir_lib.check_launch(tmp_path, get_config("tiny"))


def test_metrics_after_the_restored_step_are_dropped(tmp_path):
    old_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a kill mid-write
    assert workdir_lib.drop_metrics_after(tmp_path, 3) == 4
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert workdir_lib.drop_metrics_after(tmp_path, 3) == 0
