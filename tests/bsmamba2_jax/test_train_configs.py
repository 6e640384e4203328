"""Configs: every variant builds, inits and takes a train step; bad values are named errors;
which config changes a resume may take."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bsmamba2_jax.train import config_check
from bsmamba2_jax.train.build import build
from configs import bsmamba2
from tests.bsmamba2_jax.train_helpers import max_abs_diff, random_batch, stable_seed

PAPER_PARAMS = 48_098_188  # the paper's 48.1 M


@pytest.mark.parametrize("variant", [
    pytest.param("", marks=pytest.mark.slow), pytest.param("demo", marks=pytest.mark.slow),
    "tiny"])
def test_every_variant_builds_inits_and_steps(variant):
    config = bsmamba2.get_config(variant)
    config_check.check_config(config)
    config.model.dtype = "float32"  # CPUs emulate bf16 matmuls: keep the test fast
    parts = build(config)
    state0 = jax.device_get(jax.jit(parts.init_fn)(jax.random.PRNGKey(config.seed)))
    n_params = sum(x.size for x in jax.tree.leaves(state0.params))
    if variant == "":
        assert n_params == PAPER_PARAMS
    seed = stable_seed("variant step", variant)
    state, metrics = jax.jit(parts.train_step)(state0, random_batch(seed, 1, 4410))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), seed
    # One micro-batch completes an update exactly when there is no accumulation.
    updates = config.optim.accum_steps == 1
    assert int(metrics["updated"]) == int(updates), seed
    assert (max_abs_diff(state.params, state0.params) > 0) == updates, seed


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="'paper2'.*'demo', 'tiny'"):
        bsmamba2.get_config("paper2")


def test_variants_differ_only_in_their_blocks():
    paper, demo = bsmamba2.get_config(), bsmamba2.get_config("demo")
    changed = config_check.config_changes(paper, demo)
    assert "model.dim" in changed and "data.segment_seconds" in changed
    assert changed["model.dim"] == (256, 32)  # demo's dim is set in one place only
    assert "optim.b1" not in changed and "data.sample_rate" not in changed


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("ckpt_every", 0, "integer >= 1"),
    ("log_every", 0, "integer >= 1"),
    ("eval_every", -1, "integer >= 0"),
    ("keep_checkpoints", 0, "integer >= 1"),
    ("keep_best", -1, "integer >= 0"),
    ("total_steps", 0, "integer >= 1"),
    ("eval_batch_size", 0, "integer >= 1"),
    ("data.batch_size", 0, "integer >= 1"),
    ("data.validation_windows", 0, "integer >= 1"),
    ("data.segment_seconds", 0.0, "finite number in"),
    ("data.segment_seconds", float("nan"), "finite number in"),
    ("data.segment_seconds", 0.01, "finite number in"),  # shorter than the loss's STFT
    ("data.silence_prob", 1.5, r"\[0.0, 1.0\]"),
    ("data.gain_max", 0.1, "finite number in"),  # below gain_min
    ("ema_decay", 1.0, r"\[0.0, 1.0\)"),
    ("optim.lr", 0.0, r"\(0.0, inf\)"),
    ("optim.accum_steps", 0, "integer >= 1"),
    ("seed", -1, "integer in"),
    ("mesh.fsdp", 0, "integer >= 1"),
    ("data.synthetic_seconds", 0.5, "finite number in"),  # tracks shorter than a segment
])
def test_bad_values_name_the_field_and_range(field, value, allowed):
    config = bsmamba2.get_config("tiny")
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(ValueError, match=rf"config\.{field}=.*{allowed}.*--config\.{field}"):
        config_check.check_config(config)


def test_batch_must_split_over_processes():
    config = bsmamba2.get_config("tiny")
    config_check.check_config(config, process_count=2)
    with pytest.raises(ValueError, match="data.batch_size=4.*multiple of the 3 processes"):
        config_check.check_config(config, process_count=3)


def test_resumable_and_incompatible_changes():
    old, new = bsmamba2.get_config("tiny"), bsmamba2.get_config("tiny")
    new.total_steps, new.log_every, new.model.dim = 60, 2, 64
    new.model.band_widths = (16, 32, 64, 128, 256, 529)  # equal: not a change
    changes = config_check.config_changes(old.to_dict(), new)
    assert changes == {"log_every": (1, 2), "model.dim": (32, 64), "total_steps": (6, 60)}
    assert config_check.incompatible(changes) == {"model.dim": (32, 64)}
    # Lists (from JSON) equal tuples; a field only one side has is not a change.
    as_json = old.to_dict()
    as_json["model"]["band_widths"] = list(as_json["model"]["band_widths"])
    as_json["removed_field"] = 1
    assert config_check.config_changes(as_json, old) == {}
