"""`train_and_evaluate` called in this process on the tiny config: a short run, a resume with
`total_steps` at or below its step, then a fine-tune run started from its weights
(`config.init_from`)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from bsmamba2_jax.train.checkpoint import load_params
from tests.bsmamba2_jax.test_train_examples import read_events
from tests.bsmamba2_jax.test_train_loop import restore_numpy
from tests.bsmamba2_jax.train_helpers import max_abs_diff, tiny_config
from train import train_and_evaluate


def run_config(root, steps: int):
    config = tiny_config()
    config.data.root = str(root)
    config.data.segment_seconds = 0.25
    config.data.validation_windows = 3
    config.total_steps = steps
    config.async_checkpointing = False
    config.tensorboard = True  # with the example windows' audio and spectrograms
    return config


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, synthetic_root):
    workdir = tmp_path_factory.mktemp("first")
    return workdir, train_and_evaluate(run_config(synthetic_root, 4), workdir)


@pytest.mark.slow
def test_train_and_evaluate_in_process(first_run):
    workdir, val = first_run
    assert set(val) == {"loss", "usdr", "usdr_mixture_baseline", "usdr_gain", "windows"}
    assert val["windows"] == 3 and val["loss"] > 0
    assert val["usdr_gain"] == pytest.approx(val["usdr"] - val["usdr_mixture_baseline"])
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["val/usdr"] for r in lines if "val/usdr" in r] == [val["usdr"]]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 4
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "4"]
    for selection in ("best_usdr", "best_loss"):  # the only validated step is in both
        assert sorted(p.name for p in (workdir / selection).iterdir()) == ["4"]
    # Two updates (accum_steps = 2) moved the raw weights away from their EMA.
    raw, _, step = load_params(workdir, "raw")
    ema, _, _ = load_params(workdir, "ema")
    assert step == 4 and max_abs_diff(raw, ema) > 1e-6
    # TensorBoard: the scalars, and the audio of every validation window (3 < the 4 asked for).
    values = [(e.step, v) for e in read_events(workdir / "tensorboard") for v in e.summary.value]
    assert [step for step, v in values if v.tag == "val/usdr"] == [4]
    shown = {v.tag: v.audio for step, v in values if v.HasField("audio") and step == 4}
    assert sorted(shown) == [f"examples/{k}/{name}" for k in range(3)
                             for name in ("estimate", "mixture", "reference")]
    assert {(a.sample_rate, a.num_channels, a.length_frames) for a in shown.values()} == {
        (44100, 1, int(0.25 * 44100))}
    assert sum(v.HasField("image") for _, v in values) == 3


@pytest.mark.slow
def test_total_steps_at_or_below_the_runs_step(first_run, synthetic_root, caplog):
    """Below: an error naming the flag and the fix, nothing recorded. Equal (a finished run
    launched again): says so and trains nothing."""
    workdir, _ = first_run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"config.total_steps=2 is below the step this run "
                                         r"resumes at \(4\).*--config.total_steps=N with N > 4"):
        train_and_evaluate(run_config(synthetic_root, 2), workdir)
    with caplog.at_level(logging.WARNING):
        assert train_and_evaluate(run_config(synthetic_root, 4), workdir) == {}
    assert "already at step 4 = config.total_steps: nothing to train" in caplog.text
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before  # no config.4.json, no metrics, no checkpoint
    assert after[workdir / "run.lock"] == b""  # taken and released


@pytest.mark.slow
def test_init_from_starts_from_the_loaded_weights(first_run, synthetic_root, tmp_path, caplog):
    source, _ = first_run
    config = run_config(synthetic_root, 1)
    config.init_from = str(source)

    # The weights fix the model: another size is an error naming the field, written nowhere.
    other = run_config(synthetic_root, 1)
    other.init_from, other.model.dim = str(source), 64
    with pytest.raises(ValueError, match=r"model\.dim=32 \(weights\) vs 64 \(config\)"):
        train_and_evaluate(other, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()

    workdir = tmp_path / "finetune"
    train_and_evaluate(config, workdir)
    # Step 1 of accum_steps = 2 completes no update: the state holds the loaded weights as
    # they were, and a fresh optimizer that has accumulated one gradient.
    raw, _, _ = load_params(source, "raw")
    ema, _, _ = load_params(source, "ema")
    state = restore_numpy(workdir / "checkpoints" / "1", "train_state")
    assert max_abs_diff(state["params"], raw) == 0.0
    assert max_abs_diff(restore_numpy(workdir / "checkpoints" / "1", "ema_params"), ema) == 0.0
    assert int(state["opt_state"]["gradient_step"]) == 0
    assert int(state["opt_state"]["mini_step"]) == 1
    assert max(float(np.max(np.abs(x))) for x in
               _leaves(state["opt_state"]["inner_opt_state"])) == 0.0  # Adam moments fresh

    # A resumed run continues from its own checkpoint: init_from is no longer read.
    config.total_steps, config.init_from = 2, str(tmp_path / "gone")
    with caplog.at_level(logging.INFO):
        train_and_evaluate(config, workdir)
    assert "init_from" in caplog.text and "ignored" in caplog.text
    resumed = restore_numpy(workdir / "checkpoints" / "2", "train_state")
    assert int(resumed["step"]) == 2 and int(resumed["opt_state"]["gradient_step"]) == 1


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
