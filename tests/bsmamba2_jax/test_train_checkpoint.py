"""Checkpointer: round trip with the data position, loading EMA weights for evaluation."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.train.checkpoint import Checkpointer, load_ema_params, load_params
from bsmamba2_jax.train.state import TrainState
from configs.bsmamba2 import get_config


def small_state(seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {"params": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                         "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}}
    return TrainState(step=jnp.int32(5), params=params,
                      ema_params=jax.tree.map(lambda x: 0.5 * x, params),
                      opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                      rng=jax.random.PRNGKey(seed), nonfinite_run=jnp.int32(0),
                      nonfinite_total=jnp.int32(2))


def data_iter():
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it), next(it)
    return it


def test_round_trip_and_load_ema(tmp_path):
    config = get_config("tiny")
    state = small_state(0)
    ckpt = Checkpointer(tmp_path, config)
    ckpt.save(5, state, data_iter(), force=True)
    ckpt.save_best(5, state, usdr=1.5)
    ckpt.wait()

    fresh_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
    restored = ckpt.restore_latest(jax.eval_shape(lambda: state), fresh_iter)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert next(fresh_iter) == 2  # the data position came back too

    for path in (tmp_path, tmp_path / "checkpoints" / "5", tmp_path / "best" / "5"):
        ema, cfg = load_ema_params(path)
        expected = 0.5 * np.asarray(state.params["params"]["w"])
        np.testing.assert_array_equal(ema["params"]["w"], expected)
        assert isinstance(ema["params"]["w"], np.ndarray)
        assert cfg.model.band_widths == config.model.band_widths  # tuples, as in the config
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_ema_params(tmp_path / "nothing")

    # The raw (optimizer) weights come from the train state, without reading the optimizer state.
    raw, _, step = load_params(tmp_path / "checkpoints" / "5", "raw")
    assert step == 5
    np.testing.assert_array_equal(raw["params"]["w"], np.asarray(state.params["params"]["w"]))
    assert set(raw) == {"params"}


def test_nothing_to_resume(tmp_path):
    ckpt = Checkpointer(tmp_path, get_config("tiny"))
    assert ckpt.restore_latest(jax.eval_shape(lambda: small_state(0)), data_iter()) is None
    ckpt.close()
