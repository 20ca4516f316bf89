"""Shard files: immutable HDF5 files of rows, written once (temp + rename), never modified."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedstore.store._format import atomic_h5, set_backbone_attrs
from embedstore.store._index import SHA_WIDTH, Shard
from embedstore.store._rowindex import shard_keys


@dataclass
class ShardRows:
    """A block of rows in shard form: labels are indices into the store's class table."""

    embeddings: np.ndarray  # (n, D) float32
    paths: np.ndarray  # fixed-length utf-8 bytes
    sha256: np.ndarray  # S64
    labels: np.ndarray  # int32, -1 unlabelled
    views: np.ndarray  # int16

    def __len__(self) -> int:
        return len(self.paths)


def shard_name(seq: int) -> str:
    return f"shard-{seq:09d}.h5"


def write_shard(directory: Path, seq: int, backbone: dict, blocks: Iterable[ShardRows],
                n_rows: int, path_width: int) -> Shard:
    """Stream `blocks` (n_rows in all) into a new shard file; return its index entry."""
    dim = int(backbone["dim"])
    path = directory / shard_name(seq)
    with atomic_h5(path, n_rows * (dim * 4 + path_width + SHA_WIDTH + 22)) as f:
        set_backbone_attrs(f, backbone, root=directory.parent)
        f.attrs["seq"] = seq
        # contiguous, not chunked: a shard never grows, and readers map it into memory,
        # so a random row costs one 5 KB read instead of a 320 KB chunk
        ds = {"embeddings": f.create_dataset("embeddings", shape=(n_rows, dim), dtype=np.float32),
              "paths": f.create_dataset("paths", shape=(n_rows,), dtype=f"S{path_width}"),
              "sha256": f.create_dataset("sha256", shape=(n_rows,), dtype=f"S{SHA_WIDTH}"),
              "labels": f.create_dataset("labels", shape=(n_rows,), dtype=np.int32),
              "views": f.create_dataset("views", shape=(n_rows,), dtype=np.int16)}
        # the writer's lookup keys of each row (see _rowindex): a writer opening the store
        # reads these 16 bytes a row instead of every path and hash
        keys = f.create_dataset("keys", shape=(n_rows, 2), dtype=np.uint64)
        at = 0
        for block in blocks:
            end = at + len(block)
            for name, d in ds.items():
                d[at:end] = getattr(block, name)
            keys[at:end] = shard_keys(block.sha256, block.paths)
            at = end
        if at != n_rows:
            raise AssertionError(f"shard {path}: wrote {at} rows of {n_rows}")
    return Shard(seq, path.name, n_rows, file_sha256(path), path_width)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
