"""The store's interface, and the registry of backends that implement it.

Callers (extract, the engines, splits, train, predict, finetune, merge) only
use `open_store` and `open_writer` and the methods below; the HDF5 store
(reader.StoreReader, writer.StoreWriter) is the one backend today. A second
one (Parquet, Lance) is a reader and a writer of these shapes in their own
module and one line in BACKENDS; no caller changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypedDict

import numpy as np


class CompactResult(TypedDict):
    shards_before: int
    shards_after: int
    rows_rewritten: int
    quarantined: list[str]  # shard files moved aside: their checksum no longer matched


class MergeResult(TypedDict):
    out: str
    sources: int
    rows_added: int
    rows: int
    failures: int
    classes: int


class VerifyResult(TypedDict):
    path: str
    ok: bool
    problems: list[str]  # one line each, naming the file
    files: int
    rows_checked: int


class StoreInfo(TypedDict, total=False):
    path: str
    rows: int
    images: int
    paths: int
    unlabelled: int
    failures: int
    classes: dict[str, int]
    dim: int
    backbone: dict
    file_bytes: int
    index_bytes: int
    shards: int
    dead_rows: int
    pending_parts: int
    quarantined: list[str]
    format_version: int
    failed_files: list[dict]  # with `info --failures`
    verify: VerifyResult  # with `info --verify`


class Reader(Protocol):
    """A read-only snapshot of a store; every column in row order."""

    path: Path
    n_rows: int
    dim: int
    backbone: dict  # name, fingerprint, dim, config

    @property
    def paths(self) -> np.ndarray: ...
    @property
    def sha256(self) -> np.ndarray: ...
    @property
    def labels(self) -> np.ndarray: ...  # indices into classes, -1 unlabelled
    @property
    def classes(self) -> list[str]: ...
    @property
    def views(self) -> np.ndarray: ...
    def embeddings(self, rows=None) -> np.ndarray: ...
    def iter_embeddings(self, chunk_rows: int = 65536, copy: bool = True
                        ) -> Iterator[tuple[int, np.ndarray]]: ...
    def failures(self) -> list[dict]: ...
    def info(self) -> StoreInfo: ...
    def shard_file_of(self, row: int) -> Path: ...  # the file holding a row, for messages
    def corrupt_shards(self) -> list[tuple[Path, np.ndarray]]: ...  # files that changed
    def close(self) -> None: ...
    def __enter__(self) -> Reader: ...
    def __exit__(self, *exc) -> None: ...


class Writer(Protocol):
    """The single writer of a store: add rows, copies, failures; commit; release."""

    path: Path
    changed: bool  # whether opening it had to finish or upgrade anything

    def known(self, sha: str) -> bool: ...
    def known_digests(self) -> np.ndarray: ...
    def failed_before(self, path: str, sha: str) -> bool: ...
    def sha_of(self, path: str) -> str | None: ...
    def paths_of(self, sha: str) -> list[str]: ...
    def paths(self) -> set[str]: ...
    def has_row(self, path: str, sha: str, view: int = 0) -> bool: ...
    def add(self, embeddings: np.ndarray, paths, sha256, labels, views=None) -> None: ...
    def add_copy(self, path: str, sha: str, label: str | None) -> None: ...
    def add_failure(self, path: str, sha: str | None, reason: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def commit(self) -> None: ...
    def compact(self, target_rows: int) -> CompactResult: ...
    def release(self) -> None: ...
    def __enter__(self) -> Writer: ...
    def __exit__(self, exc_type, exc, tb) -> None: ...


# name -> (reader class, writer class), as "module:Class"
BACKENDS = {
    "hdf5": ("embedstore.store.reader:StoreReader", "embedstore.store.writer:StoreWriter"),
}
DEFAULT_BACKEND = "hdf5"


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _backend(name: str) -> tuple[str, str]:
    if name not in BACKENDS:
        raise ValueError(f"unknown store backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def open_store(path: str | Path, backend: str = DEFAULT_BACKEND) -> Reader:
    """Open STORE for reading (any format version of the backend)."""
    return _load(_backend(backend)[0])(path)


def open_writer(path: str | Path, backbone: dict, backend: str = DEFAULT_BACKEND) -> Writer:
    """The single writer of STORE (created if missing), for vectors of `backbone`."""
    return _load(_backend(backend)[1])(path, backbone)
