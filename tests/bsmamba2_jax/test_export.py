"""The exported model file: one self-contained file, same weights, same outputs."""

from __future__ import annotations

import json
import os

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


def _train_run(tmp_path):
    """A workdir laid out like train.py's: config.json and one step's EMA weights."""
    ocp = pytest.importorskip("orbax.checkpoint")
    _, params, config = tiny_model_and_params()
    run = tmp_path / "run"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(run / "checkpoints" / "12" / "ema_params", params)
    (run / "config.json").write_text(config.to_json())
    return run


def test_export_never_writes_over_its_input_or_into_the_run(tmp_path, capsys):
    run = _train_run(tmp_path)
    model = export.export(run, tmp_path / "m.msgpack")
    linked = tmp_path / "linked.msgpack"
    os.link(model, linked)  # the same file under another name
    files = {p: p.read_bytes() for p in (model, run / "config.json")}
    cases = [(model, model, "is the input"), (model, linked, "is the input"),
             (run, run / "config.json", f"lies inside the train.py run {run}"),
             (run / "checkpoints/12", run / "model.msgpack", f"lies inside the train.py run {run}"),
             (run / "checkpoints", run / "checkpoints/12/x.msgpack", "lies inside")]
    for source, out, says in cases:
        with pytest.raises(SystemExit) as e:
            export.main([str(source), str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"OUT {out} {says}" in err, err
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]
    # The run's eval/ folder takes results; beside the run is fine too.
    assert export.main([str(run), str(run / "eval/m.msgpack")]) == 0
    assert export.main([str(run / "checkpoints/12"), str(tmp_path / "run-12.msgpack")]) == 0


def test_a_model_file_whose_config_does_not_fit_its_weights_is_named(tmp_path, capsys):
    from bsmamba2_jax import separate_cli

    _, params, config = tiny_model_and_params()
    edited = config.copy_and_resolve_references()
    edited.model.dim = config.model.dim * 2  # e.g. a hand-edited config
    path = export.save_model(tmp_path / "edited.msgpack", params, edited)
    with pytest.raises(ValueError, match=rf"{path}: its weights do not fit its model config "
                                         rf"BSMamba2\(.*dim={edited.model.dim}.*\): params/"):
        load_model(path)
    song = tmp_path / "song.wav"
    sf = pytest.importorskip("soundfile")
    sf.write(str(song), np.zeros((4410, 2), np.float32) + 0.1, 44100)
    assert separate_cli.main([str(song), "-o", str(tmp_path / "out"), "--checkpoint",
                              str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "do not fit" in err
    assert export.main([str(path), str(tmp_path / "again.msgpack")]) == 1
    assert "its weights do not fit its model config" in capsys.readouterr().err
    assert not (tmp_path / "again.msgpack").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_named_and_keeps_the_earlier_file(tmp_path, capsys):
    """The partial model file sits on a full device (/dev/full: writes fail with ENOSPC, as on
    a full disk)."""
    _, params, config = tiny_model_and_params()
    source = export.save_model(tmp_path / "m.msgpack", params, config)
    out = tmp_path / "out.msgpack"
    out.write_bytes(b"an earlier model file")
    (tmp_path / f".out.msgpack.{os.getpid()}.partial").symlink_to("/dev/full")
    assert export.main([str(source), str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write {out}: the disk is full (No space left on device); nothing was "
        "left behind: free some space there or choose another OUT\n")
    assert out.read_bytes() == b"an earlier model file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.msgpack", "out.msgpack"]
