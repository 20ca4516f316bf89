"""Read a PyTorch *legacy* (non-zip) checkpoint of tensors with NumPy only.

The legacy format is five pickles in a row: a magic number, the protocol
version, system info, the object graph (tensors refer to storages by a
persistent id), and the list of storage keys; then, for each key in that
order, an int64 element count followed by the raw little-endian elements.

The object graph is read with an unpickler that resolves only the handful of
globals a state dict of tensors needs. Anything else (the classic `os.system`
payload, arbitrary classes) is refused, so loading a hostile file cannot run
code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SUPPORTED_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """The file is not a legacy checkpoint made only of tensors."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage announced by the object graph; its bytes come after it."""

    def __init__(self, dtype: np.dtype, size: int):
        self.dtype = dtype
        self.size = size
        self.data: np.ndarray | None = None


class _LazyTensor:
    """A tensor view on a storage whose bytes have not been read yet."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise CheckpointError("tensor refers to a storage that was never written")
        if not self.shape:
            return flat[self.offset].copy()
        itemsize = flat.dtype.itemsize
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if needed > flat.size:
            raise CheckpointError("tensor reaches past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointError("tensor record without a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _TensorsOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file: BinaryIO):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load {module}.{name}: only tensors may be in a weights file"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent record {pid!r:.60}")
        _, storage_type, key, _location, size = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError("storage record without a known storage type")
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError("storage views are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, int(size))
        return self.storages[key]


def _load_plain(file: BinaryIO):
    """A pickle of plain data only (numbers, strings, lists, dicts)."""

    class _Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise CheckpointError(f"refusing to load {module}.{name} in a checkpoint header")

    return _Plain(file).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the checkpoint's tensors as NumPy arrays, keyed by name."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            if _load_plain(f) != LEGACY_MAGIC:
                raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint")
            if _load_plain(f) != SUPPORTED_PROTOCOL:
                raise CheckpointError(f"{path}: unsupported checkpoint protocol")
            sys_info = _load_plain(f)
            if not sys_info.get("little_endian", False):
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            unpickler = _TensorsOnlyUnpickler(f)
            graph = unpickler.load()
            keys = _load_plain(f)
        except CheckpointError:
            raise
        except Exception as exc:  # truncated or garbled pickle
            raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
        for key in keys:
            storage = unpickler.storages.get(key)
            if storage is None:
                raise CheckpointError(f"{path}: storage {key} is listed but never used")
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{path}: truncated before storage {key}")
            (count,) = struct.unpack("<q", header)
            raw = f.read(count * storage.dtype.itemsize)
            if count != storage.size or len(raw) != count * storage.dtype.itemsize:
                raise CheckpointError(f"{path}: storage {key} is truncated or mis-sized")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    if not isinstance(graph, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    out = {}
    for name, value in graph.items():
        if not isinstance(value, _LazyTensor):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
        out[name] = value.materialise()
    return out
