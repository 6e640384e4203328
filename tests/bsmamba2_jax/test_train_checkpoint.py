"""Checkpointer: round trip with the data position, selection of the best steps, damaged steps
moved aside, loading weights for evaluation."""

from __future__ import annotations

import logging
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bsmamba2_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_ema_params,
    load_params,
)
from bsmamba2_jax.train.state import TrainState
from configs.bsmamba2 import get_config


def small_state(seed: int, step: int = 5) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {"params": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                         "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}}
    return TrainState(step=jnp.int32(step), params=params,
                      ema_params=jax.tree.map(lambda x: 0.5 * x, params),
                      opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                      nonfinite_run=jnp.int32(0), nonfinite_total=jnp.int32(2))


def data_iter():
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it), next(it)
    return it


def fresh_iter():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def abstract(state):
    return jax.eval_shape(lambda: state)


def damage(step_dir, item="train_state"):
    """Truncates every array file of an item: the directory looks complete but cannot be read."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array files under {step_dir / item}"
    for p in files:
        p.write_bytes(b"")


def assert_state_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_load(tmp_path):
    config = get_config("tiny")
    state = small_state(0)
    ckpt = Checkpointer(tmp_path, config)
    ckpt.save(5, state, data_iter(), force=True)
    assert ckpt.save_selected(5, state, {"loss": 1.0, "usdr": 1.5}) == ["best_loss", "best_usdr"]
    ckpt.wait()

    it = fresh_iter()
    restored = ckpt.restore_latest(abstract(state), it)
    ckpt.close()
    assert_state_equal(restored, state)
    assert next(it) == 2  # the data position came back too

    for path in (tmp_path, tmp_path / "checkpoints" / "5", tmp_path / "best_usdr" / "5",
                 tmp_path / "best_loss"):
        ema, cfg = load_ema_params(path)
        expected = 0.5 * np.asarray(state.params["params"]["w"])
        np.testing.assert_array_equal(ema["params"]["w"], expected)
        assert isinstance(ema["params"]["w"], np.ndarray)
        assert cfg.model.band_widths == config.model.band_widths  # tuples, as in the config
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_ema_params(tmp_path / "nothing")

    # The raw (optimizer) weights: from the train state (without reading the optimizer state)
    # or from a selected step, which keeps them as the authors' evaluation loads them.
    for path in (tmp_path / "checkpoints" / "5", tmp_path / "best_usdr" / "5"):
        raw, _, step = load_params(path, "raw")
        assert step == 5 and set(raw) == {"params"}
        np.testing.assert_array_equal(raw["params"]["w"], np.asarray(state.params["params"]["w"]))


def test_selection_keeps_the_best_and_loading_picks_them(tmp_path):
    config = get_config("tiny")  # keep_best = 2
    ckpt = Checkpointer(tmp_path, config)
    scores = {10: (3.0, 5.0), 20: (1.0, 4.0), 30: (2.0, 7.0), 40: (4.0, 6.0), 50: (5.0, 1.0)}
    for step, (loss, usdr) in scores.items():
        state = small_state(step, step)
        ckpt.save(step, state, data_iter(), force=True)
        ckpt.save_selected(step, state, {"loss": loss, "usdr": usdr})
        ckpt.wait()
    ckpt.close()
    steps = lambda name: sorted(int(p.name) for p in (tmp_path / name).iterdir())  # noqa: E731
    assert steps("best_loss") == [20, 30]  # the two lowest losses
    assert steps("best_usdr") == [30, 40]  # the two highest uSDRs
    assert steps("checkpoints") == [30, 40, 50]  # plus the last (keep_checkpoints = 3)

    def loaded_step(**kw):
        params, _, step = load_params(tmp_path, "raw", **kw)
        np.testing.assert_array_equal(params["params"]["w"],
                                      np.asarray(small_state(step).params["params"]["w"]))
        return step

    assert loaded_step() == 30  # default: the best validation uSDR
    assert loaded_step(select="best_usdr") == 30
    assert loaded_step(select="best_loss") == 20
    assert loaded_step(select="latest") == 50
    with pytest.raises(ValueError, match="Unknown selection 'best'"):
        load_params(tmp_path, select="best")


def save_steps(workdir, config, steps=(3, 6)) -> None:
    """Resume checkpoints of `small_state(step, step)` at each step."""
    ckpt = Checkpointer(workdir, config)
    for step in steps:
        ckpt.save(step, small_state(step, step), data_iter(), force=True)
        ckpt.wait()
    ckpt.close()


def test_damaged_newest_step_is_moved_aside_and_its_number_reused(tmp_path, caplog):
    config = get_config("tiny")
    save_steps(tmp_path, config)
    damage(tmp_path / "checkpoints" / "6")

    ckpt = Checkpointer(tmp_path, config)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore_latest(abstract(small_state(0)), fresh_iter())
    assert int(restored.step) == 3
    assert_state_equal(restored, small_state(3, 3))
    assert "Checkpoint step 6" in caplog.text and "6.damaged-1" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6.damaged-1"]
    # Training reaches step 6 again: a new step 6 is written next to the damaged one.
    ckpt.save(6, small_state(66, 6), data_iter(), force=True)
    ckpt.close()
    assert (tmp_path / "checkpoints" / "6").is_dir()
    assert (tmp_path / "checkpoints" / "6.damaged-1").is_dir()  # kept, never deleted


def test_no_readable_step_is_one_error_naming_the_folder(tmp_path):
    config = get_config("tiny")
    ckpt = Checkpointer(tmp_path, config)
    ckpt.save(3, small_state(3, 3), data_iter(), force=True)
    ckpt.close()
    damage(tmp_path / "checkpoints" / "3")
    damage(tmp_path / "checkpoints" / "3", "ema_params")
    with pytest.raises(CheckpointError, match=r"No readable checkpoint in .*checkpoints"):
        load_params(tmp_path, select="latest")
    assert (tmp_path / "checkpoints" / "3").is_dir()  # loading never moves anything
    ckpt = Checkpointer(tmp_path, config)
    with pytest.raises(CheckpointError, match=r"checkpoints: every step.*3\.damaged-1.*--restart"):
        ckpt.restore_latest(abstract(small_state(0)), fresh_iter())
    ckpt.close()


def test_a_step_of_another_model_is_an_error_and_stays_where_it_is(tmp_path):
    """A launch whose model differs from the saved one (its config or the code changed) is no
    damage of the checkpoints: nothing is moved aside."""
    config = get_config("tiny")
    save_steps(tmp_path, config)
    other = small_state(0)
    other.params["params"]["w"] = jnp.zeros((5, 3))
    other.ema_params["params"]["w"] = jnp.zeros((5, 3))
    ckpt = Checkpointer(tmp_path, config)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(abstract(other), fresh_iter())
    ckpt.close()
    message = str(e.value)
    assert "Checkpoint step 6" in message and "holds another model" in message
    assert "params/params/w is (4, 3) there" in message and "has (5, 3)" in message
    assert "--restart" in message and "another --workdir" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    # The right model still restores the newest step.
    ckpt = Checkpointer(tmp_path, config)
    assert int(ckpt.restore_latest(abstract(small_state(0)), fresh_iter()).step) == 6
    ckpt.close()


def test_loading_falls_back_past_a_damaged_step(tmp_path, caplog):
    config = get_config("tiny")
    ckpt = Checkpointer(tmp_path, config)
    for step, usdr in ((3, 2.0), (6, 5.0)):
        ckpt.save(step, small_state(step, step), data_iter(), force=True)
        ckpt.save_selected(step, small_state(step, step), {"loss": 1.0 / step, "usdr": usdr})
        ckpt.wait()
    ckpt.close()
    damage(tmp_path / "best_usdr" / "6", "ema_params")
    with caplog.at_level(logging.WARNING):
        params, _, step = load_params(tmp_path)
    assert step == 3 and "Skipping unreadable checkpoint" in caplog.text
    np.testing.assert_array_equal(params["params"]["w"],
                                  0.5 * np.asarray(small_state(3).params["params"]["w"]))


def test_checkpoint_of_older_code_with_a_prng_key_restores(tmp_path):
    """Runs saved before the state lost its unused PRNG key still resume."""
    state = small_state(1)
    old = {f: getattr(state, f) for f in ("step", "params", "opt_state", "nonfinite_run",
                                           "nonfinite_total")}
    old["rng"] = jax.random.PRNGKey(3)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                    item_names=("train_state", "ema_params", "data_iter",
                                                "config"))
    manager.save(5, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(old),
        ema_params=ocp.args.StandardSave(state.ema_params),
        data_iter=grain.checkpoint.CheckpointSave(data_iter())))
    manager.close()
    ckpt = Checkpointer(tmp_path, get_config("tiny"))
    restored = ckpt.restore_latest(abstract(state), fresh_iter())
    ckpt.close()
    assert_state_equal(restored, state)


def test_nothing_to_resume(tmp_path):
    ckpt = Checkpointer(tmp_path, get_config("tiny"))
    assert ckpt.restore_latest(abstract(small_state(0)), data_iter()) is None
    ckpt.close()
    shutil.rmtree(tmp_path / "checkpoints")
