"""The torch.save reader: tensors as PyTorch sees them, laziness, refusal of code, named errors."""

from __future__ import annotations

import shutil
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from bsmamba2_jax import torch_checkpoint as tc
from tests.bsmamba2_jax.torch_zip import Call, Global, Tensor, write_torch_zip

DATA = Path(__file__).parent.parent / "data"
VIEWS = DATA / "torch_ckpt" / "views.pt"
AUTHORS = DATA / "authors_ckpt" / "authors_tiny.ckpt"
MSST = DATA / "authors_ckpt" / "msst_tiny.ckpt"


def _rng(name: str) -> np.random.Generator:
    seed = zlib.crc32(name.encode())
    return np.random.default_rng(seed)


def test_tensors_match_what_torch_materialises():
    expected = np.load(DATA / "torch_ckpt" / "views_expected.npz")
    with tc.read_checkpoint(VIEWS) as ckpt:
        tensors = ckpt.root["tensors"]
        assert list(tensors) == list(expected.files)
        for name, t in tensors.items():
            got = t.numpy()
            assert got.dtype == expected[name].dtype, name
            assert got.shape == expected[name].shape == t.shape, name
            np.testing.assert_array_equal(got, expected[name], err_msg=name)
            assert got.flags.c_contiguous and got.flags.writeable, name
        # The non-contiguous views really are views of a larger storage.
        assert tensors["f32_slice"].offset == 6 and tensors["f32_slice"].stride == (6, 2)
        assert tensors["shared_head"].storage is tensors["shared_tail"].storage
        assert tensors["bf16"].dtype == "bfloat16"
        nested = ckpt.root["nested"]
        assert nested[:3] == [1, 2.5, "three"] and ckpt.root["epoch"] == 7
        np.testing.assert_array_equal(nested[3][0].numpy(), expected["f32"])
        np.testing.assert_array_equal(nested[4]["k"].numpy(), expected["i64"])


def test_reads_only_the_storages_asked_for(monkeypatch):
    read = []
    original = tc.TorchCheckpoint.read_record
    monkeypatch.setattr(tc.TorchCheckpoint, "read_record",
                        lambda self, name, *part: read.append(name) or original(self, name, *part))
    with tc.read_checkpoint(AUTHORS) as ckpt:
        assert not [r for r in read if r.startswith("data/")]  # opening reads no tensor bytes
        t = ckpt.root["state_dict"]["model.final_norm.gamma"]
        t.numpy()
        assert [r for r in read if r.startswith("data/")] == [f"data/{t.storage.key}"]
        assert ckpt.storage_bytes > 10 * 4 * t.size  # and there was much more to read


@pytest.mark.parametrize("module,name,arg", [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("subprocess", "call", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w')"),
    ("__builtin__", "exec", "open({marker!r}, 'w')"),
])
def test_forbidden_callable_is_refused_without_running(tmp_path, module, name, arg):
    marker = tmp_path / "pwned"
    payload = Call(Global(module, name), (arg.format(marker=str(marker)),))
    path = write_torch_zip(tmp_path / "evil.ckpt", {"state_dict": {"w": payload}})
    assert tc.is_torch_checkpoint(path)  # it looks like a checkpoint...
    with pytest.raises(tc.UnsafeTorchCheckpointError, match=f"{module}.{name}.*refused"):
        tc.read_checkpoint(path)
    assert not marker.exists()  # ...and nothing of it ran


def test_unknown_global_is_an_inert_placeholder_and_never_imported(tmp_path, monkeypatch):
    # A module that leaves a mark when imported and when its function is called.
    mod = f"ckpt_trap_{zlib.crc32(str(tmp_path).encode())}"
    imported, called = tmp_path / "imported", tmp_path / "called"
    (tmp_path / f"{mod}.py").write_text(
        f"open({str(imported)!r}, 'w').close()\n"
        f"def boom(path):\n    open(path, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_torch_zip(tmp_path / "x.ckpt", {"cb": Call(Global(mod, "boom"), (str(called),)),
                                                 "cls": Global(mod, "Thing")})
    with tc.read_checkpoint(path) as ckpt:
        cb, cls = ckpt.root["cb"], ckpt.root["cls"]
    assert isinstance(cb, tc.Placeholder) and cb.global_name == f"{mod}.boom"
    assert cb.args == (str(called),)
    assert issubclass(cls, tc.Placeholder) and cls.global_name == f"{mod}.Thing"
    assert not imported.exists() and not called.exists() and mod not in sys.modules


def test_lightning_extras_load_as_placeholders():
    with tc.read_checkpoint(AUTHORS) as ckpt:
        cfg = ckpt.root["hyper_parameters"]["cfg"]
        assert isinstance(cfg, tc.Placeholder)
        assert cfg.global_name == "omegaconf.dictconfig.DictConfig"
        assert isinstance(cfg.state["_content"]["model"], tc.Placeholder)  # BUILD state kept
        callbacks = ckpt.root["callbacks"]
        score = next(iter(callbacks.values()))["best_model_score"]
        assert isinstance(score, tc.TorchTensor) and score.shape == ()
    assert "omegaconf" not in sys.modules


def test_big_endian_and_crafted_views(tmp_path):
    rng = _rng("test_big_endian_and_crafted_views")
    data = rng.standard_normal(24).astype(np.float32)
    ints = rng.integers(-2**40, 2**40, 5)
    obj = {"view": Tensor(data, shape=(3, 4), stride=(1, 5), offset=2), "i": Tensor(ints)}
    for order in ("little", "big"):
        with tc.read_checkpoint(write_torch_zip(tmp_path / f"{order}.pt", obj,
                                                byteorder=order)) as ckpt:
            want = np.lib.stride_tricks.as_strided(data[2:], (3, 4), (4, 20))
            np.testing.assert_array_equal(ckpt.root["view"].numpy(), want, err_msg=order)
            np.testing.assert_array_equal(ckpt.root["i"].numpy(), ints, err_msg=order)


def test_view_past_its_storage_is_damage(tmp_path):
    path = write_torch_zip(tmp_path / "x.pt", {"w": Tensor(np.ones(6, np.float32), shape=(3, 3),
                                                           stride=(3, 1))})
    with tc.read_checkpoint(path) as ckpt, pytest.raises(tc.DamagedTorchCheckpointError,
                                                         match="reaches past its storage"):
        ckpt.root["w"].numpy()


def test_not_a_checkpoint(tmp_path):
    npy = DATA / "authors_ckpt" / "input.npy"
    with pytest.raises(tc.NotTorchCheckpointError, match="not a PyTorch checkpoint"):
        tc.read_checkpoint(npy)
    zipped = tmp_path / "other.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("notes/readme.txt", "hello")
    with pytest.raises(tc.NotTorchCheckpointError, match="data.pkl"):
        tc.read_checkpoint(zipped)
    assert not tc.is_torch_checkpoint(npy) and not tc.is_torch_checkpoint(zipped)
    assert not tc.is_torch_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError):
        tc.read_checkpoint(tmp_path / "missing.ckpt")


def test_legacy_format_is_named():
    legacy = DATA / "torch_ckpt" / "legacy.pt"
    with pytest.raises(tc.LegacyTorchCheckpointError, match="legacy.*Re-save"):
        tc.read_checkpoint(legacy)
    assert not tc.is_torch_checkpoint(legacy)


def test_truncated_file_is_named(tmp_path):
    blob = MSST.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(tc.DamagedTorchCheckpointError, match="truncated"):
        tc.read_checkpoint(cut)
    assert not tc.is_torch_checkpoint(cut)


def test_damaged_storage_bytes_are_named(tmp_path):
    data = _rng("test_damaged_storage_bytes_are_named").standard_normal(1000).astype(np.float32)
    path = write_torch_zip(tmp_path / "x.pt", {"w": Tensor(data)})
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
    blob = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob[start + 100] ^= 0xFF  # one flipped byte inside the tensor
    path.write_bytes(bytes(blob))
    with tc.read_checkpoint(path) as ckpt:  # the directory is intact: opening works
        with pytest.raises(tc.DamagedTorchCheckpointError, match="archive/data/0.*damaged"):
            ckpt.root["w"].numpy()


def test_storage_record_of_wrong_size_is_named(tmp_path):
    path = write_torch_zip(tmp_path / "x.pt", {"w": Tensor(np.ones(4, np.float32))},
                           records={"data/0": b"\0" * 12})
    with pytest.raises(tc.DamagedTorchCheckpointError, match="data/0 has 12 bytes.*16"):
        tc.read_checkpoint(path)


def test_is_torch_checkpoint_on_real_files(tmp_path):
    assert tc.is_torch_checkpoint(AUTHORS) and tc.is_torch_checkpoint(MSST)
    renamed = shutil.copy(VIEWS, tmp_path / "weights.bin")  # the name does not matter
    assert tc.is_torch_checkpoint(renamed)


def _peak_bytes(fn):
    """(fn(), the peak of Python-traced memory while it ran, in bytes; NumPy's buffers count)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("compression,storage_mb", [(zipfile.ZIP_DEFLATED, 256),
                                                    (zipfile.ZIP_STORED, 64)],
                         ids=["deflated", "stored"])
def test_a_view_reads_only_the_bytes_it_spans(tmp_path, compression, storage_mb):
    """A 1 MB view near the end of a big storage (torch.save keeps a view's whole storage):
    reading it needs a few times its own bytes, not the storage's."""
    rng = _rng(f"test_a_view_reads_only_the_bytes_it_spans{storage_mb}")
    storage = np.zeros(storage_mb << 18, np.float32)  # storage_mb MB; calloc'ed, untouched
    want = rng.standard_normal((256, 1024)).astype(np.float32)  # 1 MB
    offset = storage.size - want.size - 1000
    storage[offset:offset + want.size] = want.reshape(-1)
    path = write_torch_zip(tmp_path / "view.pt", {"w": Tensor(storage, shape=want.shape,
                                                              offset=offset)},
                           compression=compression)
    del storage
    with tc.read_checkpoint(path) as ckpt:
        got, peak = _peak_bytes(ckpt.root["w"].numpy)
    np.testing.assert_array_equal(got, want)
    assert peak < 4 * want.nbytes, f"peak {peak / 2**20:.1f} MiB to read a 1 MiB view"


def _patch_declared_size(path: Path, record: str, size: int) -> None:
    """Makes the zip's local header and central directory declare `size` bytes for `record`
    (its compressed size too when it is stored), as a damaged or crafted file would."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(record)
    blob = bytearray(path.read_bytes())
    central = blob.rfind(record.encode()) - 46  # the name follows a 46-byte directory entry
    assert blob[central:central + 4] == b"PK\x01\x02"
    fields = [(info.header_offset + 22, central + 24)]  # uncompressed size
    if info.compress_type == zipfile.ZIP_STORED:
        fields.append((info.header_offset + 18, central + 20))  # compressed size
    for local, directory in fields:
        blob[local:local + 4] = blob[directory:directory + 4] = size.to_bytes(4, "little")
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED],
                         ids=["deflated", "stored"])
def test_declared_sizes_the_file_cannot_hold_are_refused_before_reading(tmp_path, compression):
    """A record declaring 4 GiB (in a file of a few kB) is refused by name, allocating nothing
    of that size: a deflated record cannot inflate past 1032:1, a stored one past the file."""
    numel = (2**32 - 4) // 4
    path = write_torch_zip(tmp_path / "lie.pt", {"w": Tensor(np.zeros(7000, np.float32),
                                                             shape=(numel,), numel=numel)},
                           compression=compression)
    _patch_declared_size(path, "archive/data/0", numel * 4)
    with pytest.raises(tc.ImplausibleSizeError,
                       match=r"lie.pt: record archive/data/0 declares 4,294,967,292 bytes"):
        _, peak = _peak_bytes(lambda: tc.read_checkpoint(path).root["w"].numpy())
    assert tracemalloc.get_traced_memory() == (0, 0)  # tracing stopped: the error came first


def test_a_view_repeating_its_storage_is_refused(tmp_path):
    """A broadcast (stride 0) view of 2**40 elements over one float: no weight is one, and
    materialising it would need 4 TiB."""
    path = write_torch_zip(tmp_path / "x.pt", {"w": Tensor(np.ones(1, np.float32),
                                                           shape=(2**20, 2**20), stride=(0, 0))})
    with tc.read_checkpoint(path) as ckpt, pytest.raises(tc.ImplausibleSizeError,
                                                         match="repeats the 1 elements"):
        ckpt.root["w"].numpy()
