"""Read `torch.save` checkpoints with the standard library and NumPy, never executing their code.

    from bsmamba2_jax.torch_checkpoint import read_checkpoint
    with read_checkpoint("model.ckpt") as ckpt:
        sd = ckpt.root["state_dict"]              # dicts, lists, tuples, OrderedDicts as saved
        w = sd["model.final_norm.gamma"]          # a TorchTensor: shape/dtype known, no bytes read
        a = w.numpy()                             # reads only the bytes this tensor spans

A `torch.save` file (PyTorch >= 1.6) is a zip archive: `<name>/data.pkl` is a pickle of the saved
object in which every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` and every storage a persistent id `("storage", torch.FloatStorage, key, location, numel)`
whose raw bytes are the record `<name>/data/<key>` (byte order in `<name>/byteorder`, little when
absent, as torch assumes).

Memory: a tensor reads the part of its storage record it spans, not the record (torch.save
writes a view of a bigger tensor with all of that tensor's storage): a stored record's part is
read from the file directly, a deflated one's (a re-zipped file) inflated up to the part's end a
CHUNK at a time. A size that the file cannot hold (a record larger than its bytes in the archive
can store or inflate to, a tensor that repeats its storage's elements) is refused before any
allocation (`ImplausibleSizeError`), so reading needs a small multiple of the weights' bytes.

Safety: pickle can call any importable function. Our unpickler resolves only the globals that
rebuild tensors, OrderedDict/defaultdict and plain builtin containers. Globals from modules that
can run code or touch the system (os, subprocess, builtins.eval, ...) are refused before anything
is called (`UnsafeTorchCheckpointError`); every other global (omegaconf's DictConfig, Lightning
callbacks, numpy scalars, ...) becomes an inert `Placeholder` subclass that records its name and
arguments and neither imports nor calls anything.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
# The pre-1.6 format: a plain pickle stream that starts with torch's magic number
# 0x1950a86a20f9469cfc6c as a protocol-2 LONG1 (torch/serialization.py MAGIC_NUMBER).
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
CHUNK = 1 << 18  # bytes read (or inflated) at a time: 256 KiB
# Deflate's largest expansion: one compressed byte never stands for more than 1032 bytes (the
# zlib technical notes), so a record declaring more is lying about its size.
DEFLATE_MAX_RATIO = 1032


class TorchCheckpointError(ValueError):
    """A file that cannot be read as a torch.save checkpoint; the message says why and what to do.
    """


class NotTorchCheckpointError(TorchCheckpointError):
    """The file is not a torch.save zip archive at all."""


class LegacyTorchCheckpointError(TorchCheckpointError):
    """The file uses torch's pre-1.6 (non-zip) serialization."""


class DamagedTorchCheckpointError(TorchCheckpointError):
    """A torch.save archive that is truncated or has damaged / missing records."""


class UnsafeTorchCheckpointError(TorchCheckpointError):
    """The pickle names a callable that could run code; nothing of it was executed."""


class ImplausibleSizeError(DamagedTorchCheckpointError):
    """A declared size (of a record, a storage or a tensor) that the file cannot hold."""


# --- storages and tensors -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StorageType:
    """What a `torch.<X>Storage` global resolves to: the element type of a storage."""

    name: str  # torch's class name, e.g. "FloatStorage"
    dtype: str  # torch dtype name, e.g. "float32"
    numpy_dtype: str  # little-endian NumPy type of one stored element


# torch/storage.py `_dtype_to_storage_type_map`. bfloat16 has no NumPy type: it is read as its
# 16 raw bits and widened to float32 (exact).
STORAGE_TYPES = {s.name: s for s in (
    StorageType("DoubleStorage", "float64", "<f8"),
    StorageType("FloatStorage", "float32", "<f4"),
    StorageType("HalfStorage", "float16", "<f2"),
    StorageType("BFloat16Storage", "bfloat16", "<u2"),
    StorageType("LongStorage", "int64", "<i8"),
    StorageType("IntStorage", "int32", "<i4"),
    StorageType("ShortStorage", "int16", "<i2"),
    StorageType("CharStorage", "int8", "i1"),
    StorageType("ByteStorage", "uint8", "u1"),
    StorageType("BoolStorage", "bool", "?"),
    StorageType("ComplexFloatStorage", "complex64", "<c8"),
    StorageType("ComplexDoubleStorage", "complex128", "<c16"),
    StorageType("UntypedStorage", "uint8", "u1"),
)}


@dataclasses.dataclass(frozen=True, eq=False)
class Storage:
    """A lazy handle on one storage record of an open checkpoint; no bytes are read until asked."""

    checkpoint: TorchCheckpoint
    key: str  # record name under <name>/data/
    type: StorageType
    numel: int  # elements in the storage
    location: str  # device it was saved from, e.g. "cpu", "cuda:0" (ignored: we read to host)

    def read(self, start: int, stop: int, byteorder: str) -> np.ndarray:
        """Elements [start, stop) as a fresh writable array in the file's byte order.

        Reads only those bytes of the record (see `TorchCheckpoint.read_record`).
        """
        dtype = np.dtype(self.type.numpy_dtype)
        if byteorder == "big":
            dtype = dtype.newbyteorder(">")
        raw = self.checkpoint.read_record(f"data/{self.key}", start * dtype.itemsize,
                                          stop * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class TorchTensor:
    """A tensor of a checkpoint, as torch would view its storage; `numpy()` reads its bytes."""

    storage: Storage
    offset: int  # storage offset, in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    requires_grad: bool = False

    @property
    def dtype(self) -> str:
        """torch dtype name ("float32", "bfloat16", ...)."""
        return self.storage.type.dtype

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self) -> np.ndarray:
        """A fresh contiguous array of `shape` in native byte order (bfloat16 widened to float32).

        Reads only the bytes of this tensor's storage record that the tensor spans (a view
        into a larger storage does not read the rest).
        """
        ckpt = self.storage.checkpoint
        numel = self.storage.numel
        dtype = np.dtype(self.storage.type.numpy_dtype)
        if self.size == 0:
            out = np.zeros(self.shape, dtype)
        else:
            steps = zip(self.shape, self.stride, strict=True)
            last = self.offset + sum((n - 1) * s for n, s in steps)
            if self.offset < 0 or min(self.stride, default=0) < 0 or last >= numel:
                raise DamagedTorchCheckpointError(
                    f"{ckpt.path}: a tensor of shape {self.shape}, stride {self.stride}, offset "
                    f"{self.offset} reaches past its storage data/{self.storage.key} of "
                    f"{numel} elements; the file is damaged: get a fresh copy")
            if self.size > last - self.offset + 1:
                # Only a broadcast (stride 0) or overlapping view has more elements than it
                # spans; no weight is one, and materialising it could take any amount of memory.
                raise ImplausibleSizeError(
                    f"{ckpt.path}: a tensor of shape {self.shape}, stride {self.stride} repeats "
                    f"the {last - self.offset + 1} elements it spans of data/{self.storage.key} "
                    f"as {self.size}; a weight never does: the file is damaged or not a model "
                    "checkpoint")
            flat = self.storage.read(self.offset, last + 1, ckpt.byteorder)
            view = np.lib.stride_tricks.as_strided(
                flat, shape=self.shape, strides=[s * flat.dtype.itemsize for s in self.stride])
            # `flat` is this call's own buffer: no copy when the view is all of it in order and
            # in native byte order.
            out = np.asarray(view, dtype=flat.dtype.newbyteorder("="), order="C")
        if self.dtype == "bfloat16":  # bf16 is the top half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def __repr__(self) -> str:
        return f"TorchTensor(shape={self.shape}, dtype={self.dtype})"


# --- inert stand-ins for every other global ------------------------------------------------------

class Placeholder:
    """Base of the stand-in classes made for globals this reader does not resolve.

    Creating, calling or unpickling one only records what the pickle passed: `args` (constructor
    or REDUCE arguments), `state` (BUILD / __setstate__), `items` (dict-style SETITEMS) and
    `list_items` (APPENDS). The class attribute `global_name` is "module.qualname".
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.list_items = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self.global_name}>"


# Module roots whose globals can run code, import, or reach files, processes and the network.
# A pickle naming one of them is malicious or at least not a checkpoint: refuse it outright
# instead of loading an inert stand-in, so the user hears about it.
FORBIDDEN_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess",
    "_posixsubprocess", "sys", "shutil", "importlib", "runpy", "pickle", "_pickle", "marshal",
    "ctypes", "_ctypes", "code", "codeop", "types", "socket", "pty", "webbrowser",
    "multiprocessing", "signal", "tempfile", "pathlib", "io", "_io", "threading", "_thread",
    "asyncio", "urllib", "http", "ftplib", "smtplib", "telnetlib", "zipimport", "pkgutil", "site",
    "shelve", "dbm", "sqlite3", "glob", "fileinput", "timeit", "pdb", "bdb", "trace", "cProfile",
    "profile", "doctest", "venv", "ensurepip", "distutils", "setuptools", "pip", "commands",
    "popen2", "zipfile", "tarfile",
})
# Plain data constructors that protocol-2 pickles name as globals (`__builtin__ set`, ...).
SAFE_BUILTINS = {t.__name__: t for t in (
    dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray, slice,
    range)}


# --- the restricted unpickler --------------------------------------------------------------------

def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> TorchTensor:
    if not isinstance(storage, Storage):
        raise DamagedTorchCheckpointError(
            f"a tensor's storage is {storage!r}, not a storage record; the file is damaged or "
            "was not written by torch.save")
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(size, default=0) < 0:
        raise DamagedTorchCheckpointError(
            f"a tensor has size {size} but stride {stride}; the file is damaged: get a fresh copy")
    return TorchTensor(storage, int(storage_offset), size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any,
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> TorchTensor:
    t = _rebuild_tensor(storage, storage_offset, size, stride)
    return dataclasses.replace(t, requires_grad=bool(requires_grad))


def _rebuild_parameter(data: Any, requires_grad: bool = True, backward_hooks: Any = None,
                       state: Any = None) -> Any:
    """nn.Parameter -> its tensor (also `_rebuild_parameter_with_state`)."""
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensor subclasses: rebuild the plain tensor with an allowed `func`; drop the subclass."""
    if func in (_rebuild_tensor_v2, _rebuild_parameter):
        return func(*args)
    return Placeholder.__new__(_placeholder_type("torch._tensor", "_rebuild_from_type_v2"),
                               func, new_type, args, state)


def _defaultdict(*args: Any) -> collections.defaultdict:
    # The default factory is never needed to read a checkpoint and may be a placeholder.
    return collections.defaultdict()


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}

_PLACEHOLDER_TYPES: dict[str, type] = {}


def _placeholder_type(module: str, name: str) -> type:
    full = f"{module}.{name}"
    if full not in _PLACEHOLDER_TYPES:
        # A real class (C pickle's NEWOBJ requires a type), made here, holding nothing but a name.
        _PLACEHOLDER_TYPES[full] = type(name.rpartition(".")[2] or "Placeholder", (Placeholder,),
                                        {"global_name": full, "__module__": __name__})
    return _PLACEHOLDER_TYPES[full]


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals are our own functions, plain types or placeholders."""

    def __init__(self, file: Any, checkpoint: TorchCheckpoint) -> None:
        super().__init__(file)
        self._checkpoint = checkpoint

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return SAFE_BUILTINS[name]
        if module.split(".")[0] in FORBIDDEN_MODULES:
            raise UnsafeTorchCheckpointError(
                f"{self._checkpoint.path}: its pickle calls {module}.{name}, which could run code "
                "on this machine; refused, nothing was executed. A model checkpoint never needs "
                "it: do not use this file")
        return _placeholder_type(module, name)

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            raise TorchCheckpointError(
                f"{self._checkpoint.path}: unsupported persistent record {kind!r} (only tensor "
                "storages are read); is it a TorchScript file? Save the state_dict with "
                "torch.save instead")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise TorchCheckpointError(
                f"{self._checkpoint.path}: storage {key} has type {storage_type!r}, which this "
                f"reader does not know (it reads {', '.join(STORAGE_TYPES)}); convert the tensors "
                "to float32 with PyTorch and save again")
        return self._checkpoint.storage(str(key), storage_type, int(numel), str(location))


# --- the archive ---------------------------------------------------------------------------------

class TorchCheckpoint:
    """An open torch.save archive: `root` is the unpickled object, tensors are `TorchTensor`s.

    Tensor bytes are read on `TorchTensor.numpy()`, so the archive stays open until `close()`
    (or the end of a `with` block).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip = _open_archive(self.path)
        try:
            self._archive_size = self.path.stat().st_size
            self.prefix = _find_prefix(self._zip, self.path)
            self._infos = {i.filename: i for i in self._zip.infolist()}
            self.byteorder = self._text_record("byteorder", "little")
            if self.byteorder not in ("little", "big"):
                raise DamagedTorchCheckpointError(
                    f"{self.path}: byteorder record says {self.byteorder!r}, expected 'little' or "
                    "'big'; the file is damaged: get a fresh copy")
            self.version = self._text_record("version", "")  # "3" for recent torch
            self._storages: dict[str, Storage] = {}
            pkl = self.read_record("data.pkl")
            try:
                self.root = _RestrictedUnpickler(io.BytesIO(pkl), self).load()
            except TorchCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad data.pkl
                raise DamagedTorchCheckpointError(
                    f"{self.path}: data.pkl cannot be unpickled ({type(e).__name__}: {e}); the "
                    "file is damaged or not written by torch.save: get a fresh copy") from e
        except BaseException:
            self._zip.close()
            raise

    def _text_record(self, name: str, default: str) -> str:
        if f"{self.prefix}/{name}" not in self._infos:
            return default
        return self.read_record(name).decode("ascii", "replace").strip()

    def _record(self, full: str, what: str = "") -> zipfile.ZipInfo:
        """The zip entry of record `full`, its declared sizes checked against the file."""
        if full not in self._infos:
            raise DamagedTorchCheckpointError(
                f"{self.path}: record {full}{what} is missing from the archive; the file is "
                "damaged or incomplete: get a fresh copy")
        info = self._infos[full]
        size, packed = info.file_size, info.compress_size
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise DamagedTorchCheckpointError(
                f"{self.path}: record {full} uses zip compression method {info.compress_type}, "
                "which torch.save never writes (it stores records; a re-zipped file may deflate "
                "them); save it again with torch.save")
        if info.compress_type == zipfile.ZIP_STORED:
            holds = packed
        else:
            holds = DEFLATE_MAX_RATIO * packed + 1024  # + block and stream overhead
        problem = None
        if info.header_offset + packed > self._archive_size:
            problem = (f"its {packed:,} bytes in the archive, at offset "
                       f"{info.header_offset:,}, would end past the end of the file")
        elif size > holds:
            how = ("stored in" if info.compress_type == zipfile.ZIP_STORED else
                   f"deflated (at most {DEFLATE_MAX_RATIO}:1) into")
            problem = f"{size:,} bytes cannot be {how} its {packed:,} bytes in the file"
        if problem:
            raise ImplausibleSizeError(
                f"{self.path}: record {full} declares {size:,} bytes{what}, but {problem}; the "
                f"file ({self._archive_size:,} bytes) is damaged or crafted: get a fresh copy")
        return info

    def read_record(self, name: str, start: int = 0, stop: int | None = None) -> bytearray:
        """Bytes [start, stop) of record `<prefix>/<name>` (all of it by default).

        A whole record is read in CHUNK pieces into one buffer and CRC-checked by zipfile. Of a
        part, only that part is read: a stored record's straight from the file, a compressed
        record's by inflating up to the part's end CHUNK bytes at a time (its CRC cannot be
        checked without inflating the rest). Memory: the part plus one CHUNK.
        """
        full = f"{self.prefix}/{name}"
        if self._zip.fp is None:
            raise ValueError(f"{self.path} was closed; read tensors inside the `with` block")
        info = self._record(full)
        stop = info.file_size if stop is None else stop
        if not 0 <= start <= stop <= info.file_size:
            raise ValueError(f"bytes [{start}, {stop}) of {full} ({info.file_size} bytes)")
        whole = start == 0 and stop == info.file_size
        try:
            if info.compress_type == zipfile.ZIP_STORED and not whole:
                return self._read_stored(info, start, stop)
            with self._zip.open(info) as f:
                _skip(f, start)
                data = _read_into(f, stop - start)
                if whole and f.read(1):  # also makes zipfile check the CRC at the end
                    raise zipfile.BadZipFile("more bytes than the directory says")
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise DamagedTorchCheckpointError(
                f"{self.path}: record {full} cannot be read ({e}); the file is damaged or "
                "truncated: get a fresh copy") from e
        return data

    def _read_stored(self, info: zipfile.ZipInfo, start: int, stop: int) -> bytearray:
        """Bytes [start, stop) of a stored (uncompressed) record, read from the file directly."""
        with self.path.open("rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)  # the local file header: signature ... name and extra lengths
            if len(header) < 30 or header[:4] != ZIP_MAGIC:
                raise zipfile.BadZipFile(f"no local file header at {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len + start)
            return _read_into(f, stop - start)

    def storage(self, key: str, storage_type: StorageType, numel: int, location: str) -> Storage:
        """The handle of storage `key` (one per key; checks that its record exists and fits)."""
        if key in self._storages:
            return self._storages[key]
        full = f"{self.prefix}/data/{key}"
        size = np.dtype(storage_type.numpy_dtype).itemsize * numel
        what = f" (a {storage_type.dtype} storage of {numel} elements)"
        info = self._record(full, what)
        if numel < 0 or info.file_size != size:
            raise DamagedTorchCheckpointError(
                f"{self.path}: record {full} has {info.file_size} bytes, the pickle says "
                f"{numel} x {storage_type.dtype} = {size}; the file is damaged: get a fresh copy")
        self._storages[key] = Storage(self, key, storage_type, numel, location)
        return self._storages[key]

    @property
    def storage_bytes(self) -> int:
        """Total bytes of all storages in the archive (weights, optimizer state, ...)."""
        return sum(self._infos[f"{self.prefix}/data/{k}"].file_size for k in self._storages)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _skip(f: Any, count: int) -> None:
    """Reads and drops `count` bytes of `f`, CHUNK at a time."""
    while count > 0:
        got = len(f.read(min(CHUNK, count)))
        if got == 0:
            raise EOFError(f"the record ends {count} bytes early")
        count -= got


def _read_into(f: Any, count: int) -> bytearray:
    """Exactly `count` bytes of `f` in one buffer, read CHUNK at a time."""
    buf = bytearray(count)
    view = memoryview(buf)
    pos = 0
    while pos < count:
        got = f.readinto(view[pos:pos + CHUNK])
        if not got:
            raise EOFError(f"the record ends {count - pos} bytes early")
        pos += got
    return buf


def _open_archive(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    with path.open("rb") as f:
        head = f.read(len(LEGACY_MAGIC))
        f.seek(257)
        tar_magic = f.read(5)
    if head.startswith(LEGACY_MAGIC) or tar_magic == b"ustar":
        raise LegacyTorchCheckpointError(
            f"{path} was written by torch.save in the legacy (PyTorch < 1.6, non-zip) format, "
            "which this reader does not read. Re-save it with PyTorch >= 1.6: "
            "`torch.save(torch.load(IN, weights_only=True), OUT)`")
    if not head.startswith(ZIP_MAGIC):
        raise NotTorchCheckpointError(
            f"{path} is not a PyTorch checkpoint (no zip archive signature at the start; "
            f"first bytes {head[:8]!r}). Expected a .ckpt/.pt/.pth file written by torch.save")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise DamagedTorchCheckpointError(
            f"{path} starts like a torch.save zip archive but its zip directory cannot be read "
            f"({e}); the file is truncated or damaged ({path.stat().st_size:,} bytes): was the "
            "download complete? Get a fresh copy") from e


def _find_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The archive's top folder, the one that holds data.pkl (torch names it after the file)."""
    names = zf.namelist()
    tops = sorted({n.split("/")[0] for n in names if n.count("/") == 1 and
                   n.endswith("/data.pkl")})
    if len(tops) != 1:
        what = "no" if not tops else "more than one"
        torchscript = any(n.endswith("/constants.pkl") for n in names)
        hint = (" It is a TorchScript archive (torch.jit.save); save the state_dict with "
                "torch.save instead." if torchscript else " Expected a file written by torch.save.")
        raise NotTorchCheckpointError(f"{path} is a zip archive with {what} <folder>/data.pkl "
                                      f"record, so not a torch.save checkpoint.{hint}")
    return tops[0]


def read_checkpoint(path: str | Path) -> TorchCheckpoint:
    """Opens a torch.save file lazily (reads data.pkl; tensor bytes only on `.numpy()`).

    Raises NotTorchCheckpointError, LegacyTorchCheckpointError, DamagedTorchCheckpointError,
    UnsafeTorchCheckpointError (all TorchCheckpointError, a ValueError) or FileNotFoundError.
    """
    return TorchCheckpoint(path)


def is_torch_checkpoint(path: str | Path) -> bool:
    """True for a zip archive with a `<folder>/data.pkl` record (what torch.save writes).

    Cheap (reads the zip directory only) and never raises: for dispatching on a path.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != ZIP_MAGIC:
                return False
        with zipfile.ZipFile(path) as zf:
            _find_prefix(zf, path)
        return True
    except (OSError, zipfile.BadZipFile, EOFError, TorchCheckpointError):
        return False


def starts_like_torch_checkpoint(path: str | Path) -> bool:
    """True for a file that starts with a zip or a legacy torch.save signature.

    Looser than `is_torch_checkpoint` (a truncated archive passes): for routing a file to this
    reader, so that a damaged or legacy checkpoint gets its named error. Never raises.
    """
    try:
        with Path(path).open("rb") as f:
            head = f.read(len(LEGACY_MAGIC))
            f.seek(257)
            tar_magic = f.read(5)
    except OSError:
        return False
    return head.startswith((ZIP_MAGIC, LEGACY_MAGIC)) or tar_magic == b"ustar"
