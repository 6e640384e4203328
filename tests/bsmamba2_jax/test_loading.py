"""loading.load_model / read_weights on the authors' PyTorch checkpoints, and the tools built on
them (export, evaluate.py): expected outputs, what is reported, what is read, named errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from bsmamba2_jax import convert, export, loading
from bsmamba2_jax import torch_checkpoint as tc

DATA = Path(__file__).parent.parent / "data"
MAMBA = DATA / "authors_ckpt"
AUTHORS = MAMBA / "authors_tiny.ckpt"  # Lightning layout, raw + EMA
MSST = MAMBA / "msst_tiny.ckpt"  # bare state_dict
ROFORMER = DATA / "authors_roformer" / "roformer.ckpt"  # Lightning layout, raw only

# (file, weights, input, expected output, parameters, layout, architecture, step)
CASES = {
    "lightning-raw": (AUTHORS, "raw", MAMBA / "input.npy", MAMBA / "expected_raw.npy", 744_212,
                      "lightning", "mamba2", 1200),
    "lightning-ema": (AUTHORS, "ema", MAMBA / "input.npy", MAMBA / "expected_ema.npy", 744_212,
                      "lightning", "mamba2", 1200),
    "state_dict-raw": (MSST, "raw", MAMBA / "input.npy", MAMBA / "expected_raw.npy", 744_212,
                       "state_dict", "mamba2", None),
    # PyTorch counts 1,507,332: two 8-value rotary frequency tensors are computed, not stored.
    "roformer-raw": (ROFORMER, "raw", DATA / "authors_roformer" / "input.npy",
                     DATA / "authors_roformer" / "expected.npy", 1_507_316, "lightning",
                     "transformer", 400),
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def apply_fn():
    """One jitted forward per model config (the three BSMamba2 cases share one)."""
    cache = {}

    def get(model):
        key = repr(model)
        if key not in cache:
            cache[key] = jax.jit(model.apply)
        return cache[key]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_load_model_reproduces_the_authors_outputs(apply_fn, case):
    path, weights, inp, expected, n_params, layout, arch, step = CASES[case]
    reported = []
    model, params, config = loading.load_model(path, weights=weights, report=reported.append)
    assert model.mixer == arch
    vocals = np.asarray(apply_fn(model)(params, np.load(inp)))
    err = _rel(vocals, np.load(expected))
    assert err < 1e-5, (case, err)
    if path != ROFORMER:  # the other weights give another output
        other = MAMBA / f"expected_{'ema' if weights == 'raw' else 'raw'}.npy"
        assert _rel(vocals, np.load(other)) > 1e-3
    # What was loaded is returned and reported once.
    assert (config["weights"], config["step"], config["source"]) == (weights, step, str(path))
    ckpt = config["checkpoint"]
    assert (ckpt["file"], ckpt["layout"], ckpt["architecture"]) == (path.name, layout, arch)
    assert reported == [config["loaded"]]
    title = convert.ARCHITECTURES[arch].title
    assert f"{title}, {layout} layout, {weights} weights, {n_params:,} parameters" in reported[0]
    assert "not a known release" in reported[0]
    assert sum(a.size for a in jax.tree.leaves(params)) == n_params


def test_reported_to_stderr_by_default(capsys):
    loading.read_weights(MSST, "raw")
    captured = capsys.readouterr()
    assert "msst_tiny.ckpt" in captured.err and "state_dict layout" in captured.err
    assert captured.out == ""


def test_bare_state_dict_has_no_ema_weights():
    with pytest.raises(ValueError, match=r"no EMA weights \(a bare state_dict\).*--weights raw"):
        loading.load_model(MSST, weights="ema")
    with pytest.raises(ValueError, match="no EMA weights"):
        loading.load_model(ROFORMER, weights="ema")  # this Lightning file has no EMA tuple


@pytest.mark.parametrize("weights", ["raw", "ema"])
@pytest.mark.parametrize("load", [
    lambda path, weights: convert.load_torch_model(path, weights),
    lambda path, weights: loading.read_weights(path, weights, report=None)],
    ids=["convert", "loading"])
def test_loader_never_reads_the_optimizer_state(monkeypatch, weights, load):
    """Only the chosen weights' storage records are read, by the converter and through the
    loader (the published Lightning file is 4x its weights: Adam moments and EMA besides the
    raw weights)."""
    with tc.read_checkpoint(AUTHORS) as ckpt:
        sd = ckpt.root["state_dict"]
        opt = ckpt.root["optimizer_states"][0]
        raw = {t.storage.key for k, t in sd.items() if k.startswith("model.")}
        windows = {t.storage.key for k, t in sd.items() if not k.startswith("model.")}
        ema = {t.storage.key for t in opt["ema"]}
        adam = {t.storage.key for s in opt["opt"]["state"].values() for t in s.values()}
    read = []
    original = tc.TorchCheckpoint.read_record
    monkeypatch.setattr(tc.TorchCheckpoint, "read_record",
                        lambda self, name, *part: read.append(name) or original(self, name, *part))
    load(AUTHORS, weights)
    storages = [r.removeprefix("data/") for r in read if r.startswith("data/")]
    assert set(storages) == (raw if weights == "raw" else ema) | windows
    assert len(storages) == len(set(storages))  # each record read once
    assert not set(storages) & adam


def test_damaged_and_legacy_files_get_the_readers_errors(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(MSST.read_bytes()[: MSST.stat().st_size // 2])
    with pytest.raises(tc.DamagedTorchCheckpointError, match="truncated or damaged"):
        loading.load_model(truncated, weights="raw")
    with pytest.raises(tc.LegacyTorchCheckpointError, match="legacy"):
        loading.load_model(DATA / "torch_ckpt" / "legacy.pt", weights="raw")
    other = tmp_path / "notes.ckpt"
    other.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a bsmamba2-jax model file"):
        loading.load_model(other)


def test_export_writes_the_authors_weights(tmp_path, capsys):
    """`python -m bsmamba2_jax.export IN.ckpt OUT`: the raw (published) weights by default, the
    EMA ones on request, with what was read kept in the file; loads back unchanged."""
    out = tmp_path / "raw.msgpack"
    assert export.main([str(AUTHORS), str(out)]) == 0
    _, want, _ = loading.load_model(AUTHORS, weights="raw", report=None)
    _, got, config = loading.load_model(out, weights="raw")
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert config["step"] == 1200
    stored = json.loads(json.dumps(export.load_model(out)[1]))
    assert stored["weights"] == "raw" and stored["source"]["layout"] == "lightning"
    assert stored["source"]["file"] == AUTHORS.name
    assert export.main([str(AUTHORS), str(tmp_path / "ema.msgpack"), "--weights", "ema"]) == 0
    assert export.load_model(tmp_path / "ema.msgpack")[1]["weights"] == "ema"
    capsys.readouterr()
    assert export.main([str(MSST), str(tmp_path / "x.msgpack"), "--weights", "ema"]) == 1
    assert "no EMA weights" in capsys.readouterr().err
    assert not (tmp_path / "x.msgpack").exists()


def _tiny_eval_config(root):
    from configs.bsmamba2 import get_config

    config = get_config("tiny")  # the data and run settings; the model comes from the file
    config.data.root = str(root)
    return config


def test_evaluate_loads_pytorch_checkpoints_of_both_architectures(synthetic_root, tmp_path,
                                                                  capsys):
    import evaluate

    opts = evaluate.check_options(workdir=str(tmp_path), checkpoints=[str(AUTHORS),
                                                                      str(ROFORMER)])
    first, second = evaluate.load_candidates(_tiny_eval_config(synthetic_root), opts)
    assert (first.label, second.label) == ("authors_tiny@1200", "roformer@400")
    assert (first.model.mixer, second.model.mixer) == ("mamba2", "transformer")
    for c, path in ((first, AUTHORS), (second, ROFORMER)):
        assert c.identity["source"] == str(path) and c.identity["weights"] == "raw"
        assert c.identity["key"].startswith(f"step{c.identity['step']}-raw-float32-")
    assert "BS-RoFormer, lightning layout, raw weights" in capsys.readouterr().err
    opts = evaluate.check_options(workdir=str(tmp_path), checkpoints=[str(MSST)], weights="ema")
    with pytest.raises(evaluate.app.UsageError, match=r"--weights=ema\): .*no EMA weights"):
        evaluate.load_candidates(_tiny_eval_config(synthetic_root), opts)


def test_evaluate_scores_a_pytorch_checkpoint(synthetic_root, tmp_path, capsys):
    """evaluate.py --checkpoint IN.ckpt runs on the synthetic set and its results name the file."""
    import evaluate

    opts = evaluate.check_options(workdir=str(tmp_path / "run"), checkpoints=[str(AUTHORS)],
                                  segment_seconds=2.0, max_tracks=1, progress=False)
    result = evaluate.evaluate(_tiny_eval_config(synthetic_root), opts)
    (label, summary), = result["summary"].items()
    assert label == "authors_tiny@1200" and np.isfinite(summary["usdr"])
    assert summary["model"]["source"] == str(AUTHORS) and summary["model"]["weights"] == "raw"
    folder = Path(result["out_dirs"][label][2.0])
    assert folder.parent.name == summary["model"]["key"]
    assert json.loads((folder / "summary.json").read_text())["model"]["source"] == str(AUTHORS)
    assert f"| {label} | {AUTHORS} | 1200 | raw |" in capsys.readouterr().out


def test_default_weights_of_each_source(tmp_path):
    """weights=None: the source's own default. A PyTorch checkpoint gives its raw state_dict (what
    the authors' evaluation scores; a bare state_dict has nothing else), a model file its kind."""
    for path in (AUTHORS, MSST):
        _, params, config = loading.load_model(path, weights=None, report=None)
        assert config["weights"] == "raw"
    _, raw, _ = loading.load_model(AUTHORS, weights="raw", report=None)
    jax.tree.map(np.testing.assert_array_equal, params, raw)  # MSST holds AUTHORS' raw weights
    out = export.save_model(tmp_path / "m.msgpack", raw, loading.read_weights(
        MSST, "raw", report=None)[1], weights="raw")
    assert loading.load_model(out, weights=None)[2]["weights"] == "raw"
    with pytest.raises(ValueError, match="Unknown weights 'best'"):
        loading.load_model(MSST, weights="best")
