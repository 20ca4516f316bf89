"""Where a store's files are, and the checks that keep a store inside itself.

A store is one directory, and nothing recorded inside it says where on disk
it reads or writes: every name is relative to the directory, so a store can
be copied, renamed, moved, rsynced or tarred as one folder.

    STORE/index.h5      the index: virtual datasets over parts/ (relative sources)
    STORE/parts/        shard-NNNNNNNNN.h5, immutable
    STORE/lock          only while a writer runs (or after one was killed)
    STORE/quarantine/   shards that could not be used, moved aside
    STORE/int8/         the int8 model `extract --runtime int8` calibrated for it

Stores of embedstore 0.1 and 0.2 (formats 1 and 2) are a file STORE with
STORE.parts/ beside it: read where they are, upgraded by their next writer.

Everything read from a store is untrusted: shard names must be the one
pattern the writer makes, and no file of a store may hold an HDF5 external
link, soft link, external-file dataset, or (but for the index's own columns)
a virtual dataset. Each such file is refused with one line naming it.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import h5py

from embedstore.store._format import StoreError

INDEX = "index.h5"
PARTS = "parts"
LOCK = "lock"
QUARANTINE = "quarantine"
INT8 = "int8"
SHARD_NAME = re.compile(r"shard-\d{9}\.h5")
# what a store directory may hold besides hidden temp files (STORE/activations: fine-tuning)
OWN_ENTRIES = {INDEX, PARTS, LOCK, QUARANTINE, INT8, "activations"}
STORE_BACKBONE_PREFIX = "store:"  # a backbone directory inside the store, e.g. "store:int8"


@dataclass(frozen=True)
class Layout:
    """The files of one store; `legacy` for a format-1/2 file with STORE.parts beside it."""

    root: Path  # the store directory (or legacy file), symlinks resolved
    legacy: bool = False

    @property
    def index(self) -> Path:
        return self.root if self.legacy else self.root / INDEX

    @property
    def parts(self) -> Path:
        return Path(f"{self.root}.parts") if self.legacy else self.root / PARTS

    @property
    def quarantine(self) -> Path:
        return Path(f"{self.root}.quarantine") if self.legacy else self.root / QUARANTINE

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def int8(self) -> Path:
        return Path(f"{self.root}.int8") if self.legacy else self.root / INT8

    def shard(self, name: str) -> Path:
        """A shard file of this store, by a name read from its index (checked)."""
        check_shard_name(name, self.index)
        return self.parts / name


def store_root(store: str | Path) -> Path:
    """The store a path names, symlinks resolved: STORE/index.h5 names its folder."""
    root = Path(store).resolve()
    if root.name == INDEX and root.is_file() and (root.parent / PARTS).is_dir():
        return root.parent
    return root


def layout(store: str | Path) -> Layout:
    """The layout of STORE as it is on disk now (a missing store is a new directory)."""
    root = store_root(store)
    return Layout(root, legacy=root.is_file())


def parts_dir(store: str | Path) -> Path:
    return layout(store).parts


def quarantine_dir(store: str | Path) -> Path:
    return layout(store).quarantine


def check_shard_name(name: str, where: Path) -> None:
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise StoreError(f"{where}: names a shard {name!r}, which is not a name embedstore "
                         "writes (shard-<9 digits>.h5); the index is damaged or crafted, so it "
                         "is not used: restore the store from a copy or extract again")


def check_inside(path: Path, root: Path, what: str) -> None:
    """`path` (a directory or file of the store) must be a real entry, not a symlink out."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise StoreError(f"{path}: the store's {what} is a symbolic link; a store keeps its "
                         f"files inside {root}: replace the link with the real folder or file")


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_self_contained(f: h5py.File, where: Path, virtual_ok: tuple[str, ...] = ()) -> None:
    """Refuse an HDF5 file that reaches outside itself: external or soft links, datasets
    stored in external files, virtual datasets (but the named ones, checked elsewhere)."""
    problem = _reach_outside(f, virtual_ok)
    if problem:
        raise StoreError(f"{where}: {problem}; a store's files must hold their own data, so "
                         "it is not read: restore the store from a copy or extract again")


def _reach_outside(group: h5py.Group, virtual_ok: tuple[str, ...], prefix: str = "") -> str:
    for name in group:
        link = group.get(name, getlink=True)
        full = f"{prefix}/{name}"
        if isinstance(link, h5py.ExternalLink):
            return f"{full} is an external link to {link.filename}:{link.path}"
        if isinstance(link, h5py.SoftLink):
            return f"{full} is a soft link to {link.path}"
        obj = group[name]
        if isinstance(obj, h5py.Group):
            found = _reach_outside(obj, virtual_ok, full)
            if found:
                return found
        elif isinstance(obj, h5py.Dataset):
            if obj.external:
                return f"{full} keeps its data in external files"
            if obj.is_virtual and full.lstrip("/") not in virtual_ok:
                return f"{full} is a virtual dataset (it maps other files)"
    return ""
