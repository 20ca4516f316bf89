"""What every store module shares: constants, errors, names beside a store, HDF5 helpers."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

FORMAT = "embedstore"
# 1: one self-contained file; 2: an index file over STORE.parts/ beside it;
# 3: a directory holding the index and its parts (see _layout)
FORMAT_VERSION = 3
STR = h5py.string_dtype()
COPY_BLOCK_ROWS = 8192


class StoreError(ValueError):
    """A store that cannot be used as asked, with what to do about it."""


def real_path(store: str | Path) -> Path:
    """The file a store path names, through symlinks: what is locked and replaced."""
    return Path(store).resolve()


# --- strings -------------------------------------------------------------------------

def strings(ds) -> list[str]:
    """A string dataset (variable or fixed length) as a list of str."""
    return [s.decode() if isinstance(s, bytes) else s for s in ds[()]] if len(ds) else []


def decode(arr: np.ndarray) -> np.ndarray:
    """Fixed-length utf-8 bytes -> an object array of str."""
    return np.char.decode(arr, "utf-8").astype(object) if len(arr) else np.array([], object)


def write_strings(group, name: str, values) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=STR)


def fixed(values, width: int | None = None) -> np.ndarray:
    """str values -> fixed-length utf-8 bytes (HDF5 virtual datasets cannot map vlen strings)."""
    encoded = [v.encode() for v in values]
    width = max(width or 1, max(map(len, encoded), default=1))
    return np.array(encoded, dtype=f"S{width}")


# --- backbone attributes ---------------------------------------------------------------

def backbone_attrs(f: h5py.File, root: Path | None = None) -> dict:
    """The backbone a store records. A backbone directory inside the store (its int8
    model) is recorded relative to it ("store:int8") and given here as a path under
    `root`, the store's directory, wherever the store now is."""
    name = str(f.attrs.get("backbone_name", ""))
    if name.startswith("store:") and root is not None:
        inside = name[len("store:"):]
        if not inside or "/" in inside or inside in (".", "..") or (root / inside).is_symlink():
            raise StoreError(f"{f.filename}: backbone name {name!r} leads outside the store")
        name = str(root / inside)
    return {"name": name,
            "fingerprint": f.attrs.get("backbone_fingerprint", ""),
            "dim": int(f.attrs.get("backbone_dim", 0)),
            "config": json.loads(f.attrs.get("backbone_config", "{}"))}


def set_backbone_attrs(f: h5py.File, backbone: dict, version: int = FORMAT_VERSION,
                       root: Path | None = None) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = version
    name = str(backbone["name"])
    if root is not None and os.path.isabs(name) and Path(name).parent == root:
        name = "store:" + Path(name).name  # moves with the store
    f.attrs["backbone_name"] = name
    f.attrs["backbone_fingerprint"] = backbone["fingerprint"]
    f.attrs["backbone_dim"] = int(backbone["dim"])
    f.attrs["backbone_config"] = json.dumps(backbone.get("config", {}), sort_keys=True)


def open_h5(path: Path) -> h5py.File:
    if path.is_dir():
        raise StoreError(f"{path} is a folder but not an embedstore store (it has no index.h5); "
                         "give a store made by `embedstore extract`")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} is not a readable HDF5 file ({exc}); "
                         "give an embedstore store or extract into a new file") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise StoreError(f"{path} is an HDF5 file but not an embedstore store")
    return f


# --- durable writes --------------------------------------------------------------------

def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """Hidden, per-process: `.NAME.tmp-PID`; orphans are removed by the next writer."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_disk_full(exc: BaseException) -> bool:
    # h5py reports ENOSPC as an OSError or RuntimeError whose text carries HDF5's errno line
    return isinstance(exc, (OSError, RuntimeError)) and (
        getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
        or "errno = 28" in str(exc))


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full_error(path: Path) -> StoreError:
    return StoreError(f"no space left on {_mount_point(path.parent)} writing {path}; "
                      "nothing committed was lost: free some space and re-run to resume")


# Files up to this size are built in memory and written with plain os.write: HDF5 cannot
# survive a failed write (h5py 3.14 segfaults after a close that hit ENOSPC), so a full
# disk must surface outside it. Bigger files (compaction) are checked against free space.
IN_MEMORY_BYTES = 1 << 26  # a commit of ~12k 1280-d rows


@contextmanager
def atomic_h5(path: Path, size_hint: int = 0) -> Iterator[h5py.File]:
    """An h5py file written at a temp name, fsynced and renamed to `path`.

    On any failure the temp file is removed; a full disk becomes one clear StoreError.
    """
    tmp = temp_name(path)
    in_memory = size_hint <= IN_MEMORY_BYTES
    tmp.unlink(missing_ok=True)  # never write through a link planted at our temp name
    try:
        if not in_memory and shutil.disk_usage(path.parent).free < size_hint * 1.05 + (1 << 24):
            raise OSError(errno.ENOSPC, "No space left on device")
        f = (h5py.File(tmp, "w", libver=("earliest", "v110"), driver="core", backing_store=False)
             if in_memory else h5py.File(tmp, "w", libver=("earliest", "v110")))
        try:
            yield f
            if in_memory:
                f.flush()
                image = f.id.get_file_image()
        finally:
            f.close()
        if in_memory:
            _write_bytes(tmp, image)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
