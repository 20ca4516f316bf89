"""Format 1, read once and left behind: the single-file store and its `part-N.h5` files.

A format-1 store is upgraded by its next writer (its rows copied into
shards once; the file is then replaced by a format-2 index). Parts a killed
format-1 writer committed are replayed through the writer, in order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from embedstore.store._format import COPY_BLOCK_ROWS, fixed, open_h5, strings
from embedstore.store._index import SHA_WIDTH
from embedstore.store._shard import ShardRows

if TYPE_CHECKING:
    from embedstore.store.writer import StoreWriter

_PART = re.compile(r"part-(\d+)\.h5$")
IMPORT_SHARD_ROWS = 65536


def part_seq(path: Path) -> int | None:
    m = _PART.fullmatch(path.name)
    return int(m.group(1)) if m else None


def part_files(parts: Path) -> list[Path]:
    """Format-1 part files, numbered ones in order, then any oddly named ones."""
    if not parts.is_dir():
        return []
    files = [p for p in parts.glob("part-*.h5") if p.is_file() and not p.is_symlink()]
    return sorted(files, key=lambda p: (part_seq(p) is None, part_seq(p) or 0, p.name))


def import_store(path: Path, writer: StoreWriter) -> None:
    """Copy every row of a format-1 store into new shards of `writer` (not yet published)."""
    with open_h5(path) as f:
        table = strings(f["classes"])
        labels = np.array([writer._class_of(c) for c in table] + [-1], np.int32)[f["labels"][()]]
        paths, sha, views = strings(f["paths"]), strings(f["sha256"]), f["views"][()]
        width = fixed(paths).dtype.itemsize
        ds = f["embeddings"]
        for start in range(0, len(paths), IMPORT_SHARD_ROWS):
            stop = min(start + IMPORT_SHARD_ROWS, len(paths))
            blocks = (ShardRows(ds[a:min(a + COPY_BLOCK_ROWS, stop)],
                           fixed(paths[a:a + COPY_BLOCK_ROWS][:stop - a], width),
                           fixed(sha[a:a + COPY_BLOCK_ROWS][:stop - a], SHA_WIDTH),
                           labels[a:min(a + COPY_BLOCK_ROWS, stop)],
                           views[a:min(a + COPY_BLOCK_ROWS, stop)])
                      for a in range(start, stop, COPY_BLOCK_ROWS))
            writer._add_shard(blocks, stop - start, width)  # indexes its rows too
        g = f["failures"]
        for p, s, r in zip(strings(g["paths"]), strings(g["sha256"]), strings(g["reasons"])):
            writer.index.failures[p] = (s, r)
            writer.failed[p] = s


def replay_part(path: Path, writer: StoreWriter) -> None:
    """Queue one format-1 part's work in `writer.pending`, in the order merge applied it."""
    with h5py.File(path, "r") as f:
        for p in strings(f["removed"]) if "removed" in f else []:
            writer.remove(p)
        for p, s, r in zip(strings(f["failures/paths"]), strings(f["failures/sha256"]),
                           strings(f["failures/reasons"])):
            writer.add_failure(p, s, r)
        paths = strings(f["paths"])
        if paths:
            writer.add(f["embeddings"][()], paths, strings(f["sha256"]),
                       strings(f["label_names"]), f["views"][()].tolist())
        if "copies" in f:
            for p, s, label in zip(strings(f["copies/paths"]), strings(f["copies/sha256"]),
                                   strings(f["copies/label_names"])):
                writer.add_copy(p, s, label)
