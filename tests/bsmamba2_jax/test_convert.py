"""The authors' checkpoints on our model: strict mapping (BSMamba2 and BS-RoFormer), registry,
command. Their expected outputs, through `loading.load_model`, are in test_loading.py."""

from __future__ import annotations

import collections
import dataclasses
import json
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from bsmamba2_jax import convert, export
from bsmamba2_jax import torch_checkpoint as tc
from configs.bsmamba2 import PAPER_BAND_WIDTHS, get_config
from tests.bsmamba2_jax.torch_zip import DictOf, Global, Tensor, state_dict_of, write_torch_zip

FIXTURES = Path(__file__).parent.parent / "data" / "authors_ckpt"
AUTHORS = FIXTURES / "authors_tiny.ckpt"
MSST = FIXTURES / "msst_tiny.ckpt"
ROFORMER = FIXTURES.parent / "authors_roformer" / "roformer.ckpt"


def test_inferred_config_and_info():
    _, config, info = convert.load_torch_model(AUTHORS, "raw")
    assert config["model"] == {
        "dim": 16, "depth": 2, "band_widths": PAPER_BAND_WIDTHS, "n_fft": 2048,
        "hop_length": 441, "expand": 4, "d_state": 128, "headdim": 64, "ngroups": 1,
        "d_conv": 4, "chunk_size": 256, "band_chunk_size": 64, "mask_hidden_mult": 4,
        "ssd_impl": "xla", "dtype": "float32", "remat": "none", "group_tokens": 16384}
    assert config["sample_rate"] == 44100 and config["segment_seconds"] == 8.0
    assert (info["layout"], info["epoch"], info["global_step"]) == ("lightning", 11, 1200)
    assert (info["ema_step"], info["ema_decay"]) == (1200, 0.999)
    assert info["release"] is None and info["sha256"] is None  # no release has this size
    _, msst_config, msst_info = convert.load_torch_model(MSST, "raw")
    assert msst_config == config and msst_info["layout"] == "state_dict"


def test_bare_state_dict_has_no_ema():
    with pytest.raises(convert.ConversionError, match="no EMA weights.*--weights raw"):
        convert.load_torch_model(MSST, "ema")
    with pytest.raises(ValueError, match="Unknown weights"):
        convert.load_torch_model(MSST, "best")


def test_config_is_checked_against_the_tensors():
    with pytest.raises(convert.ConversionError, match="dim: the checkpoint has 16 .*final_norm"):
        convert.load_torch_model(MSST, model_config=get_config("tiny").model)
    with pytest.raises(convert.ConversionError, match="depth: the checkpoint has 2"):
        convert.load_torch_model(MSST, model_config={"dim": 16, "depth": 6})
    # A fitting config is accepted, and its run fields are used.
    _, config, _ = convert.load_torch_model(
        MSST, model_config={"dim": 16, "depth": 2, "band_widths": list(PAPER_BAND_WIDTHS),
                            "ssd_impl": "scan", "chunk_size": 32, "dtype": "bfloat16"})
    assert (config["model"]["ssd_impl"], config["model"]["chunk_size"],
            config["model"]["dtype"]) == ("scan", 32, "bfloat16")


def _bare(edit) -> collections.OrderedDict:
    """msst_tiny's state_dict, materialised, after `edit(dict)`."""
    with tc.read_checkpoint(MSST) as ckpt:
        sd = collections.OrderedDict((k, Tensor(v.numpy())) for k, v in ckpt.root.items())
    edit(sd)
    return sd


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


@pytest.mark.parametrize("case,match", [
    ("extra", r"1 tensors of the checkpoint have no place.*layers\.0\.0\.extra\.weight"),
    ("missing", r"layers\.1\.1\.backward_blocks\.0\.mixer\.D is missing"),
    ("shape", r"layers\.1\.0\.forward_blocks\.0\.mixer\.conv1d\.bias has shape \(321,\), "
              r"expected \(320,\)"),
    ("second_stem", r"2 stems"),
    ("mono", r"band_split\.to_features\.3\.0\.gamma has 6 features.*mono"),
])
def test_misfit_names_the_key(tmp_path, case, match):
    rng = _rng(f"test_misfit_names_the_key/{case}")

    def edit(sd):
        if case == "extra":
            sd["layers.0.0.extra.weight"] = Tensor(rng.standard_normal(3).astype(np.float32))
        elif case == "missing":
            del sd["layers.1.1.backward_blocks.0.mixer.D"]
        elif case == "shape":
            sd["layers.1.0.forward_blocks.0.mixer.conv1d.bias"] = Tensor(
                rng.standard_normal(321).astype(np.float32))
        elif case == "second_stem":
            for k in [k for k in sd if k.startswith("mask_estimators.0.")]:
                sd["mask_estimators.1." + k[len("mask_estimators.0."):]] = sd[k]
        elif case == "mono":
            sd["band_split.to_features.3.0.gamma"] = Tensor(np.ones(6, np.float32))
    path = write_torch_zip(tmp_path / f"{case}.ckpt", _bare(edit))
    with pytest.raises(convert.ConversionError, match=match):
        convert.load_torch_model(path)


def test_check_only_rules_for_fixed_tensors(tmp_path, monkeypatch):
    """An architecture can declare tensors that are checked, not loaded (rotary frequencies)."""
    want = np.arange(3, dtype=np.float32)
    seen = []

    def check(a):
        seen.append(a)
        if not np.array_equal(a, want):
            raise convert.ConversionError("layers.0.0.freqs differs")
    base = convert.ARCHITECTURES["mamba2"]
    arch = dataclasses.replace(base, layer_rules=lambda i, c: base.layer_rules(i, c) + (
        [convert.Rule(None, ("layers.0.0.freqs",), (3,), check=check)] if i == 0 else []))
    monkeypatch.setitem(convert.ARCHITECTURES, "mamba2", arch)
    for name, value in (("ok", want), ("bad", want + 1)):
        path = write_torch_zip(tmp_path / f"{name}.ckpt", _bare(
            lambda sd, v=value: sd.__setitem__("layers.0.0.freqs", Tensor(v))))
        if name == "ok":
            params, _, _ = convert.load_torch_model(path)
            assert "freqs" not in str(jax.tree_util.tree_structure(params))
        else:
            with pytest.raises(convert.ConversionError, match="freqs differs"):
                convert.load_torch_model(path)
    assert len(seen) == 2


def _lightning(tmp_path: Path, name: str, ema_edit=None, window=None, hparams=None) -> Path:
    """authors_tiny's layout rebuilt from its materialised tensors, with edits."""
    with tc.read_checkpoint(AUTHORS) as ckpt:
        sd = collections.OrderedDict((k, Tensor(v.numpy()))
                                     for k, v in ckpt.root["state_dict"].items())
        ema = [Tensor(t.numpy()) for t in ckpt.root["optimizer_states"][0]["ema"]]
    if ema_edit:
        ema = ema_edit(ema)
    if window is not None:
        sd["featurizer.window"] = Tensor(window)
    root = {"epoch": 3, "global_step": 300, "state_dict": sd,
            "optimizer_states": [{"ema": tuple(ema), "current_step": 300, "decay": 0.999}],
            "hyper_parameters": hparams}
    return write_torch_zip(tmp_path / f"{name}.ckpt", root)


def test_ema_tuple_is_checked(tmp_path):
    short = _lightning(tmp_path, "short", ema_edit=lambda e: e[:-1])
    with pytest.raises(convert.ConversionError, match="holds 514 entries.*515 parameters"):
        convert.load_torch_model(short, "ema")
    # Parameters 0 (norm.weight (16,)) and 1 (mixer.dt_bias (1,)) swapped: out of order.
    swapped = _lightning(tmp_path, "swapped", ema_edit=lambda e: [e[1], e[0]] + e[2:])
    with pytest.raises(convert.ConversionError,
                       match=r"\['ema'\]\[0\] has shape \(1,\).*layers\.0\.0\.forward_blocks"):
        convert.load_torch_model(swapped, "ema")
    convert.load_torch_model(swapped, "raw")  # the raw weights do not need the tuple


def test_stft_window_is_checked(tmp_path):
    symmetric = np.hanning(2048).astype(np.float32)
    path = _lightning(tmp_path, "symmetric", window=symmetric)
    with pytest.raises(convert.ConversionError, match="featurizer.window is a symmetric Hann"):
        convert.load_torch_model(path)


def test_hyper_parameters_are_only_read(tmp_path):
    loop = []
    loop.append(loop)  # a cycle must not hang or crash the reader
    path = _lightning(tmp_path, "loop", hparams={"cfg": {"x": loop}})
    convert.load_torch_model(path)
    # What the authors' config says is checked against the tensors.
    path = _lightning(tmp_path, "roformer", hparams={"cfg": {"model": {
        "module_type": "transformer"}}})
    with pytest.raises(convert.ConversionError, match="module_type='transformer'"):
        convert.load_torch_model(path)
    # The hop length is not in the weights; the authors' featurizer config records it (here
    # inside a dict subclass such as Lightning's AttributeDict).
    attribute_dict = Global("pytorch_lightning.utilities.parsing", "AttributeDict")
    path = _lightning(tmp_path, "hop", hparams=DictOf(attribute_dict, (("cfg", {"featurizer": {
        "direct_transform": {"hop_length": 512}}}),)))
    assert convert.load_torch_model(path)[1]["model"]["hop_length"] == 512


def test_release_registry(tmp_path, monkeypatch):
    fixture = json.loads((FIXTURES / "fixture.json").read_text())
    sha = fixture["sha256"]["msst_tiny.ckpt"]
    assert convert.sha256_file(MSST) == sha
    fake = convert.Release("the tiny test release", "msst_tiny.ckpt", MSST.stat().st_size, sha,
                           "state_dict", "tests/data", "not stated", "-")
    monkeypatch.setattr(convert, "RELEASES", (fake,))
    _, _, info = convert.load_torch_model(MSST)
    assert info["release"] == "the tiny test release" and info["sha256"] == sha
    assert "sha256 verified" in convert.describe(info)
    # Same size, other bytes: not the release.
    other = tmp_path / "other.ckpt"
    blob = bytearray(MSST.read_bytes())
    blob[-1] ^= 1  # in the zip's end record comment length: still the same size
    other.write_bytes(bytes(blob))
    release, digest, note = convert.identify_release(other)
    assert release is None and digest != sha and "another sha256" in note


def test_known_releases_are_recorded():
    by_file = {r.file_name: r for r in convert.RELEASES}
    assert by_file["sota_model.ckpt"].size == 770_628_060
    assert by_file["sota_model.ckpt"].layout == "lightning"
    assert by_file["bs_mamba2_vocals.ckpt"].size == 192_610_602
    assert all(len(r.sha256) == 64 and r.where and r.licence for r in convert.RELEASES)


def test_command_writes_a_model_file(tmp_path, capsys):
    out = tmp_path / "tiny.msgpack"
    assert convert.main([str(AUTHORS), str(out), "--weights", "ema"]) == 0
    printed = capsys.readouterr().out
    assert "lightning layout, ema weights" in printed and "wrote" in printed
    params, config = export.load_model(out)
    want, want_config, _ = convert.load_torch_model(AUTHORS, "ema")
    assert config["model"] == want_config["model"] and config["weights"] == "ema"
    assert config["source"]["file"] == AUTHORS.name and config["source"]["global_step"] == 1200
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_command_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "x.msgpack"
    assert convert.main([str(FIXTURES / "input.npy"), str(out)]) == 1
    assert "not a PyTorch checkpoint" in capsys.readouterr().err and not out.exists()


def test_command_never_writes_over_its_input(tmp_path, capsys):
    src = tmp_path / "in.ckpt"
    src.write_bytes(MSST.read_bytes())
    (tmp_path / "hard.ckpt").hardlink_to(src)
    (tmp_path / "soft.ckpt").symlink_to(src)
    for out in (src, tmp_path / "hard.ckpt", tmp_path / "soft.ckpt"):
        with pytest.raises(SystemExit) as e:
            convert.main([str(src), str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"OUT {out} is the input {src}" in err, err
    assert src.read_bytes() == MSST.read_bytes()


def test_a_view_into_a_large_deflated_storage_converts_in_little_memory(tmp_path):
    """The biggest weight of the MSST fixture stored as a view near the end of a 256 MB storage
    in a re-zipped (deflated) file, as torch.save writes a view of a bigger tensor: converting
    needs a small multiple of the weights' bytes (about 3 MB), not the storage's."""
    with tc.read_checkpoint(MSST) as ckpt:
        sd = state_dict_of(ckpt.root)
    name = max(sd, key=lambda k: sd[k].data.size)
    weight = sd[name].data
    storage = np.zeros(64 << 20, np.float32)  # 256 MB, calloc'ed: untouched pages cost nothing
    offset = storage.size - weight.size - 12345
    storage[offset:offset + weight.size] = weight.reshape(-1)
    sd[name] = Tensor(storage, shape=weight.shape, offset=offset)
    path = write_torch_zip(tmp_path / "view.ckpt", sd, compression=zipfile.ZIP_DEFLATED)
    del storage
    want, _, _ = convert.load_torch_model(MSST, "raw")  # also traces the model's init once
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(want))
    tracemalloc.start()
    try:
        got, _, _ = convert.load_torch_model(path, "raw")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert peak < 3 * weight_bytes, f"peak {peak / 1e6:.1f} MB for {weight_bytes / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- BS-RoFormer


def test_roformer_inferred_config():
    from configs.bsroformer import get_config as roformer_config

    _, config, info = convert.load_torch_model(ROFORMER)
    m = config["model"]
    assert (m["mixer"], m["dim"], m["depth"], m["heads"], m["dim_head"], m["ff_mult"]) == (
        "transformer", 32, 2, 2, 16, 4)
    assert m["band_widths"] == PAPER_BAND_WIDTHS and m["mask_hidden_mult"] == 4
    assert (m["attn_dropout"], m["ff_dropout"]) == (0.1, 0.1)  # bandsplitmodel.yaml's
    assert set(m) == set(roformer_config("tiny").model)  # no Mamba2 fields
    assert (info["architecture"], info["layout"], info["global_step"]) == (
        "transformer", "lightning", 400)
    assert "BS-RoFormer, lightning layout, raw weights" in convert.describe(info)


def _roformer_sd(edit=None) -> collections.OrderedDict:
    """roformer.ckpt's model state_dict (no prefix), materialised, after `edit(dict)`."""
    with tc.read_checkpoint(ROFORMER) as ckpt:
        sd = collections.OrderedDict((k.removeprefix("model."), Tensor(v.numpy()))
                                     for k, v in ckpt.root["state_dict"].items())
    if edit:
        edit(sd)
    return sd


FREQS = "layers.{}.{}.layers.0.0.rotary_embed.freqs"


def test_rotary_frequencies_are_checked_not_loaded(tmp_path):
    params, _, _ = convert.load_torch_model(ROFORMER)
    assert "freqs" not in str(jax.tree_util.tree_structure(params))

    def scaled(factor):
        def edit(sd):
            sd[FREQS.format(1, 1)] = Tensor(sd[FREQS.format(1, 1)].data * np.float32(factor))
        return edit
    # PyTorch's float32 pow may differ from ours by an ulp: accepted.
    path = write_torch_zip(tmp_path / "ulp.ckpt", _roformer_sd(scaled(1 + 2 ** -23)))
    convert.load_torch_model(path)
    path = write_torch_zip(tmp_path / "theta.ckpt", _roformer_sd(scaled(1.001)))
    with pytest.raises(convert.ConversionError,
                       match=r"layers\.1\.1\.layers\.0\.0\.rotary_embed\.freqs is not "
                             r"10000\^\(-2i/16\).*max relative difference 0\.00"):
        convert.load_torch_model(path)


@pytest.mark.parametrize("case,match", [
    ("inner_depth", r"layers\.1\.1\.layers\.1\.0\.norm\.gamma: the band transformer of layer 1 "
                    r"has more than one attention \+ feed-forward layer"),
    ("missing", r"layers\.0\.1\.layers\.0\.1\.net\.4\.bias is missing"),
    ("qkv", r"layers\.0\.0\.layers\.0\.0\.to_qkv\.weight \(100, 32\): 100 rows are not 3 x "
            r"heads \(2, from layers\.0\.0\.layers\.0\.0\.to_gates\.weight\)"),
    ("odd", r"to_qkv\.weight \(90, 32\): dim_head 15 is odd"),
])
def test_roformer_misfit_names_the_key(tmp_path, case, match):
    rng = _rng(f"test_roformer_misfit_names_the_key/{case}")

    def edit(sd):
        if case == "inner_depth":
            sd["layers.1.1.layers.1.0.norm.gamma"] = Tensor(rng.standard_normal(32).astype(
                np.float32))
        elif case == "missing":
            del sd["layers.0.1.layers.0.1.net.4.bias"]
        elif case in ("qkv", "odd"):
            sd["layers.0.0.layers.0.0.to_qkv.weight"] = Tensor(
                rng.standard_normal((100 if case == "qkv" else 90, 32)).astype(np.float32))
    path = write_torch_zip(tmp_path / f"{case}.ckpt", _roformer_sd(edit))
    with pytest.raises(convert.ConversionError, match=match):
        convert.load_torch_model(path)


def _roformer_lightning(tmp_path: Path, name: str, ema: list | None = None,
                        hparams=None, share_rotary: bool = True) -> Path:
    """roformer.ckpt's weights in the authors' Lightning layout with an EMA tuple.

    share_rotary: later layers' rotary freqs share layer 0's storage, as when the authors'
    model (one RotaryEmbedding per axis for all layers) is saved.
    """
    sd = _roformer_sd()
    if share_rotary:
        for i in (1,):
            for j in (0, 1):
                sd[FREQS.format(i, j)] = sd[FREQS.format(0, j)]
    root = {"epoch": 3, "global_step": 400,
            "state_dict": collections.OrderedDict(("model." + k, v) for k, v in sd.items()),
            "optimizer_states": [] if ema is None else [
                {"ema": tuple(ema), "current_step": 400, "decay": 0.999}],
            "hyper_parameters": hparams}
    return write_torch_zip(tmp_path / f"{name}.ckpt", root)


@pytest.mark.parametrize("share_rotary", [True, False], ids=["shared", "copied"])
def test_roformer_ema_tuple_in_parameters_order(tmp_path, share_rotary):
    """The EMA tuple follows model.parameters(): each axis's shared rotary freqs once, at
    layer 0; the later layers' copies in the state_dict are only checked."""
    sd = _roformer_sd()
    names = [k for k in sd if not (k.endswith("rotary_embed.freqs") and k.startswith("layers.1."))]
    assert len(names) == len(sd) - 2
    ema = [Tensor(sd[k].data if k.endswith("freqs") else 1.5 * sd[k].data) for k in names]
    path = _roformer_lightning(tmp_path, "ema", ema, share_rotary=share_rotary)
    raw, _, _ = convert.load_torch_model(path, "raw")
    got, config, info = convert.load_torch_model(path, "ema")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 1.5 * b, rtol=1e-6), got, raw)
    assert info["weights"] == "ema" and config["model"]["mixer"] == "transformer"
    # Every freqs of the state_dict in the tuple (not parameters() order): named.
    bad = _roformer_lightning(tmp_path, "bad", [Tensor(sd[k].data) for k in sd])
    with pytest.raises(convert.ConversionError, match="holds 479 entries, the model has 477"):
        convert.load_torch_model(bad, "ema")


def test_roformer_config_and_hyper_parameters(tmp_path):
    from configs.bsroformer import get_config as roformer_config

    with pytest.raises(convert.ConversionError,
                       match=r"mixer: the checkpoint is a BS-RoFormer model .*says mixer='mamba2'"):
        convert.load_torch_model(ROFORMER, model_config=get_config("tiny").model)
    with pytest.raises(convert.ConversionError,
                       match=r"mixer: the checkpoint is a BSMamba2 model .*mixer='transformer'"):
        convert.load_torch_model(MSST, model_config=roformer_config("tiny").model)
    with pytest.raises(convert.ConversionError,
                       match=r"heads: the checkpoint has 2 \(from layers\.0\.0\.layers\.0\.0\."
                             r"to_gates\.weight\), the model config says 8"):
        convert.load_torch_model(ROFORMER, model_config={"mixer": "transformer", "heads": 8})
    fitting = {**roformer_config("tiny").model.to_dict(), "depth": 2, "attn_impl": "cudnn",
               "band_widths": PAPER_BAND_WIDTHS,
               "ff_dropout": 0.0}
    _, config, _ = convert.load_torch_model(ROFORMER, model_config=fitting)
    assert (config["model"]["attn_impl"], config["model"]["ff_dropout"]) == ("cudnn", 0.0)
    # The authors' config, as Lightning records it, gives the dropout rates and is checked.
    path = _roformer_lightning(tmp_path, "hp", hparams={"model": {
        "module_type": "transformer", "attn_dropout": 0.25, "ff_dropout": 0.0}})
    model = convert.load_torch_model(path)[1]["model"]
    assert (model["attn_dropout"], model["ff_dropout"]) == (0.25, 0.0)
    path = _roformer_lightning(tmp_path, "wrong", hparams={"cfg": {"model": {
        "module_type": "mamba2"}}})
    with pytest.raises(convert.ConversionError, match="module_type='mamba2' but the tensors are "
                                                      "a 'transformer' model"):
        convert.load_torch_model(path)
