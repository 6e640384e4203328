"""A minimal torch.save-format writer for tests (no PyTorch): crafted and edited checkpoints.

    write_torch_zip(path, {"w": Tensor(np.ones(3, np.float32))})
    write_torch_zip(path, Call(Global("os", "system"), ("touch x",)))   # a malicious pickle

Tensors become `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
OrderedDict())` with the storage as persistent id `("storage", torch.<X>Storage, key, "cpu",
numel)` and its bytes in `<prefix>/data/<key>`, as torch.save writes them (protocol 2).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

STORAGE_NAMES = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                 "int64": "LongStorage", "int32": "IntStorage", "uint8": "ByteStorage",
                 "bool": "BoolStorage"}


@dataclasses.dataclass(frozen=True)
class Global:
    """A `module name` global reference, written as the GLOBAL opcode without importing it."""

    module: str
    name: str


@dataclasses.dataclass(frozen=True)
class Call:
    """`func(*args)` in the pickle (the REDUCE opcode)."""

    func: Global
    args: tuple = ()


@dataclasses.dataclass(frozen=True)
class DictOf:
    """An instance of a dict subclass `cls` holding `items` (REDUCE, then SETITEMS)."""

    cls: Global
    items: tuple = ()  # (key, value) pairs


@dataclasses.dataclass(eq=False)
class Tensor:
    """A tensor over the flat storage `data`; offset and stride in elements (default contiguous)."""

    data: np.ndarray  # the whole storage, any shape (flattened)
    shape: tuple | None = None
    stride: tuple | None = None
    offset: int = 0
    numel: int | None = None  # the storage size the pickle declares (default: data.size)


@dataclasses.dataclass(eq=False)
class _Storage:
    key: str
    data: np.ndarray
    numel: int


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, f: Any, byteorder: str) -> None:
        super().__init__(f, protocol=2)
        self.records: dict[str, bytes | np.ndarray] = {}
        self.byteorder = byteorder
        self._storage_ids: dict[int, _Storage] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", Global("torch", STORAGE_NAMES[obj.data.dtype.name]), obj.key,
                    "cpu", obj.numel)
        return None

    def _save_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _save_call(self, obj: Call) -> None:
        self.save(obj.func)
        self.save(tuple(obj.args))
        self.write(pickle.REDUCE)

    def _save_dict_of(self, obj: DictOf) -> None:
        self._save_call(Call(obj.cls))
        self._batch_setitems(iter(obj.items))

    def _save_tensor(self, t: Tensor) -> None:
        if id(t.data) not in self._storage_ids:
            key = str(len(self._storage_ids))
            flat = np.ascontiguousarray(t.data).reshape(-1)
            order = "<" if self.byteorder == "little" else ">"
            # Kept as an array: written a chunk at a time, so a test can write a big storage.
            self.records[f"data/{key}"] = flat.astype(flat.dtype.newbyteorder(order), copy=False)
            self._storage_ids[id(t.data)] = _Storage(key, flat,
                                                     flat.size if t.numel is None else t.numel)
        storage = self._storage_ids[id(t.data)]
        shape = tuple(t.shape if t.shape is not None else np.shape(t.data))
        stride = t.stride
        if stride is None:
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self._save_call(Call(Global("torch._utils", "_rebuild_tensor_v2"),
                             (storage, t.offset, shape, tuple(stride), False,
                              collections.OrderedDict())))

    dispatch[Global] = _save_global
    dispatch[Call] = _save_call
    dispatch[DictOf] = _save_dict_of
    dispatch[Tensor] = _save_tensor


CHUNK = 1 << 22  # bytes of a storage written at a time


def write_torch_zip(path: str | Path, obj: Any, prefix: str = "archive",
                    byteorder: str = "little", records: dict[str, bytes] | None = None,
                    compression: int = zipfile.ZIP_STORED) -> Path:
    """Writes `obj` as torch.save would; `records` adds or replaces raw records.

    compression: zipfile.ZIP_STORED as torch.save, or ZIP_DEFLATED as a re-zipped file has.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf, byteorder)
    pickler.dump(obj)
    all_records = {"data.pkl": buf.getvalue(), "byteorder": byteorder.encode(),
                   "version": b"3\n", **pickler.records, **(records or {})}
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in all_records.items():
            if isinstance(data, bytes):
                zf.writestr(f"{prefix}/{name}", data)
                continue
            step = max(1, CHUNK // data.itemsize)
            with zf.open(f"{prefix}/{name}", "w", force_zip64=data.nbytes > 2**31) as f:
                for i in range(0, data.size, step):
                    f.write(data[i:i + step].tobytes())
    return path


def state_dict_of(ckpt_root: Any) -> dict:
    """Our reader's TorchTensors -> Tensors (materialised), keeping the order."""
    return collections.OrderedDict((k, Tensor(v.numpy())) for k, v in ckpt_root.items())
