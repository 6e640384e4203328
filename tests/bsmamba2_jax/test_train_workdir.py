"""What a launch may do to a workdir: resume checks, --restart, config history, metrics, a run
whose checkpoints are gone, unreadable config files, unusable workdir paths."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from bsmamba2_jax.train import workdir as workdir_lib
from configs.bsmamba2 import get_config


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def fake_step(step_dir, config, items=("train_state", "ema_params")):
    """A step directory laid out as Orbax writes it (arrays replaced by a stand-in file), with
    the copy of its config every step keeps."""
    for item in items:
        (step_dir / item).mkdir(parents=True)
        (step_dir / item / "d").write_text("arrays")
    (step_dir / "config").mkdir()
    (step_dir / "config" / "metadata").write_text(config.to_json())


def old_run(tmp_path):
    """A workdir as train.py leaves it after a tiny run (6 steps, checkpoints at 3 and 6, step
    6 validated)."""
    config = get_config("tiny")
    workdir_lib.record_config(tmp_path, config, workdir_lib.LaunchPlan(False, {}), 0)
    for step in (3, 6):
        fake_step(tmp_path / "checkpoints" / str(step), config)
    for folder in ("best_usdr", "best_loss"):
        fake_step(tmp_path / folder / "6", config, ("params", "ema_params"))
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
    where = "config.json, checkpoints/6, checkpoints/3"
    assert f"model.dim: 32 ({where}) -> 64 (this launch)" in message
    assert f"optim.accum_steps: 2 ({where}) -> 3" in message
    assert "edited by hand" not in message  # the config file and the checkpoints agree
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


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    """An editor strips the final newline: that record is complete, not a partial write."""
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 7)]
    lines[-1] = json.dumps({"step": 6, "val/usdr": 4.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # no final newline
    assert workdir_lib.drop_metrics_after(tmp_path, 6) == 0
    # The newline is back, so the next record (appended by the resumed run) has its own line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "train/loss": 0.1}) + "\n")
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[5] == {"step": 6, "val/usdr": 4.5}


def test_only_unparseable_tails_and_later_steps_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    foreign = b"# a note \xe9 (latin-1, not JSON)"
    path.write_bytes(b'{"step": 1, "a": 1}\n' + foreign + b'\n{"step": 2, "a": 2}\n'
                     b'{"step": 3, "a": 3}\n{"step": 4, "a"')  # the tail: a kill mid-write
    assert workdir_lib.drop_metrics_after(tmp_path, 2) == 2  # step 3 and the partial tail
    assert path.read_bytes() == b'{"step": 1, "a": 1}\n' + foreign + b'\n{"step": 2, "a": 2}\n'


@pytest.mark.parametrize("gone", ["damaged", "deleted"])
def test_run_without_a_checkpoint_names_what_is_there_and_the_ways_out(tmp_path, gone):
    config = old_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    if gone == "damaged":  # what restoring does to steps it cannot read
        for step in (3, 6):
            (ckpts / str(step)).rename(ckpts / f"{step}.damaged-1")
    else:
        shutil.rmtree(ckpts)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        workdir_lib.check_launch(tmp_path, config)
    message = str(e.value)
    assert "holds a run but no checkpoint to resume it from" in message
    assert "best_usdr/ holds step 6" in message and "metrics.jsonl runs to step 6" in message
    if gone == "damaged":
        assert "3.damaged-1, 6.damaged-1" in message
        assert f"mv {ckpts / '6.damaged-1'} {ckpts / '6'}" in message
    else:
        assert "checkpoints/ is missing" in message and "mv " not in message
    assert "--restart" in message and "another --workdir" in message
    assert snapshot(tmp_path) == before
    # --restart is one way out: the run moves aside and the workdir starts fresh.
    assert workdir_lib.check_launch(tmp_path, config, restart=True).restart


def test_run_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    """Nothing is lost: the records of steps before the first checkpoint are replayed."""
    config = get_config("tiny")  # ckpt_every = 3
    workdir_lib.record_config(tmp_path, config, workdir_lib.LaunchPlan(False, {}), 0)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert workdir_lib.check_launch(tmp_path, config).resume
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl runs to step 3"):
        workdir_lib.check_launch(tmp_path, config)


def test_empty_folders_of_a_launch_stopped_early_are_no_run(tmp_path):
    """SIGTERM before config.json was written leaves the checkpoint managers' empty folders,
    the data caches and the lock file: the same command must start."""
    for folder in ("checkpoints", "best_loss", "best_usdr", "synthetic/train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "activity-train-0123.json").write_text("{}")
    (tmp_path / "run.lock").write_text('{"pid": 1}')
    (tmp_path / "metrics.jsonl").touch()
    assert workdir_lib.check_launch(tmp_path, get_config("tiny")) == workdir_lib.LaunchPlan(
        resume=False, changes={})


def test_hand_edited_config_json_is_a_config_mismatch(tmp_path):
    """config.json edited to another model: reported against the checkpoints' own config
    (whose weights would otherwise fail to restore and be moved aside as damaged)."""
    old_run(tmp_path)
    edited = json.loads((tmp_path / "config.json").read_text())
    edited["model"]["dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(edited))
    before = snapshot(tmp_path)
    launch = get_config("tiny")
    launch.model.dim = 64  # agrees with the edited file
    with pytest.raises(ValueError) as e:
        workdir_lib.check_launch(tmp_path, launch)
    assert "model.dim: 32 (checkpoints/6, checkpoints/3) -> 64 (this launch)" in str(e.value)
    assert "config.json disagrees with the config saved in checkpoints/6 in model.dim" in str(
        e.value) and "edited by hand" in str(e.value)
    with pytest.raises(ValueError, match=r"(?s)model.dim: 64 \(config.json\) -> 32.*edited by"):
        workdir_lib.check_launch(tmp_path, get_config("tiny"))  # agrees with the checkpoints
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"total_steps": 6,', "not valid JSON: Expecting property name"),
    (b'{"seed": "caf\xe9"}', "not UTF-8 text"),
    (b"[1, 2]", "JSON list, not an object"),
])
def test_unreadable_config_file_names_the_file_and_the_fix(tmp_path, content, problem):
    old_run(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError) as e:
        workdir_lib.check_launch(tmp_path, get_config("tiny"))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'config.json'} is not a readable run config")
    assert problem in message and "checkpoints/<step>/config/metadata" in message
    assert "\n" not in message
    # The fix it names works: moved aside, the config comes from the newest checkpoint.
    (tmp_path / "config.json").rename(tmp_path / "config.json.bad")
    assert workdir_lib.check_launch(tmp_path, get_config("tiny")).resume


def test_unusable_workdir_paths_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--workdir=.*file/run/a lies under .*file, which is "
                                         "a file, not a folder"):
        workdir_lib.check_launch(tmp_path / "file" / "run" / "a", get_config("tiny"))
    with pytest.raises(ValueError, match=r"--workdir=.*file is a file; pass a folder"):
        workdir_lib.check_launch(tmp_path / "file", get_config("tiny"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("where", ["workdir", "parent"])
def test_read_only_workdir_is_named(tmp_path, where):
    folder = tmp_path / "ro"
    if where == "workdir":
        old_run(folder)
    else:
        folder.mkdir()
    folder.chmod(0o555)
    try:
        workdir = folder if where == "workdir" else folder / "new"
        with pytest.raises(ValueError, match="is not writable.*pass another --workdir"):
            workdir_lib.check_launch(workdir, get_config("tiny"))
    finally:
        folder.chmod(0o755)
