"""The exported model file: one self-contained file, same weights, same outputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from bsmamba2_jax import export
from bsmamba2_jax.loading import build_model, load_model
from tests.bsmamba2_jax.tiny_model import tiny_model_and_params


def _leaves_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_same_params_config_and_output(tmp_path):
    model, params, config = tiny_model_and_params()
    path = export.save_model(tmp_path / "m.msgpack", params, config, step=7)
    assert [p.name for p in tmp_path.iterdir()] == ["m.msgpack"]  # one file, no temp left
    loaded, cfg = export.load_model(path)
    _leaves_equal(params, loaded)
    assert cfg["model"] == dict(config.model.to_dict())
    assert cfg["sample_rate"] == 44100 and cfg["step"] == 7
    assert "root" not in json.dumps(cfg)  # no dataset paths in the file
    rebuilt = build_model(cfg["model"])
    x = (0.1 * np.random.default_rng(1).standard_normal((1, 2, 8820))).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(params, x)),
                                  np.asarray(jax.jit(rebuilt.apply)(loaded, x)))


def test_export_cli_from_checkpoint_dir(tmp_path):
    """A checkpoint laid out like train.py's (orbax ema_params item + config.json)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    _, params, config = tiny_model_and_params()
    workdir = tmp_path / "run"
    step_dir = workdir / "checkpoints" / "12"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(step_dir / "ema_params", params)
    (workdir / "config.json").write_text(config.to_json())
    out = tmp_path / "exported.msgpack"
    assert export.main([str(workdir), str(out)]) == 0
    loaded, cfg = export.load_model(out)
    _leaves_equal(params, loaded)
    assert cfg["step"] == 12
    assert tuple(cfg["model"]["band_widths"]) == tuple(config.model.band_widths)
    # Every tool reads the same weights from the checkpoint directly or from the exported file.
    for source in (workdir, out):
        model, got, cfg = load_model(source)
        _leaves_equal(params, got)
        assert model.band_widths == tuple(config.model.band_widths)
        assert cfg["step"] == 12 and cfg["weights"] == "ema"


def test_load_model_overrides_only_execution_fields(tmp_path):
    _, params, config = tiny_model_and_params()
    path = export.save_model(tmp_path / "m.msgpack", params, config)
    model, _, _ = load_model(path, overrides={"ssd_impl": "scan"})
    assert model.ssd_impl == "scan" and model.dim == config.model.dim
    with pytest.raises(ValueError, match="model.dim comes from the checkpoint"):
        load_model(path, overrides={"dim": 8})
    with pytest.raises(ValueError, match="holds the ema weights only"):
        load_model(path, weights="raw")
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_model(tmp_path / "missing")


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a bsmamba2-jax model file"):
        export.load_model(bad)
    with pytest.raises(FileNotFoundError, match="export it first"):
        export.load_model(tmp_path)
