"""The index: STORE/index.h5, small, replaced atomically on every commit.

It lists the shard files (name, rows, sha256 of the file, path width), the
tombstoned rows of each, classes, failures and the backbone; and it holds
virtual datasets /embeddings, /paths, /sha256, /labels, /views that map
every live row of the shards in order, so plain h5py reads the store as one
table. The virtual datasets name their sources relative to the index
(`parts/shard-...h5`), which HDF5 resolves against the index's own folder:
the store reads the same after a copy or a move. Its size grows with the
number of shards and tombstones, not rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedstore.store._format import atomic_h5, set_backbone_attrs, strings, write_strings
from embedstore.store._layout import PARTS, check_shard_name

SHA_WIDTH = 64
COLUMNS = ("embeddings", "paths", "sha256", "labels", "views")


@dataclass
class Shard:
    """One immutable shard file and which of its rows are no longer live."""

    seq: int
    name: str  # file name inside the store's parts directory (checked against SHARD_NAME)
    rows: int
    sha256: str  # of the whole file, checked by `info --verify`
    path_width: int
    dead: set = field(default_factory=set)

    @property
    def n_live(self) -> int:
        return self.rows - len(self.dead)

    def live(self) -> np.ndarray:
        """Local row numbers still live, increasing (a mask: O(rows), no sort)."""
        if not self.dead:
            return np.arange(self.rows, dtype=np.int64)
        alive = np.ones(self.rows, bool)
        alive[np.fromiter(self.dead, np.int64, len(self.dead))] = False
        return np.flatnonzero(alive)


@dataclass
class Index:
    shards: list[Shard]
    classes: list[str]
    failures: dict  # path -> (sha256, reason)
    next_seq: int


def read_index(f: h5py.File) -> Index:
    """The index in `f` (format 2 or 3); every shard name is checked first."""
    g = f["shards"]
    for name in strings(g["names"]):
        check_shard_name(name, Path(f.filename))
    dead: dict[int, set] = {}
    for seq, row in f["tombstones"][()]:
        dead.setdefault(int(seq), set()).add(int(row))
    shards = [Shard(int(seq), name, int(rows), sha, int(width), dead.get(int(seq), set()))
              for seq, name, rows, sha, width in zip(g["seq"][()], strings(g["names"]),
                                                     g["rows"][()], strings(g["sha256"]),
                                                     g["path_width"][()])]
    fg = f["failures"]
    failures = {p: (s, r) for p, s, r in zip(strings(fg["paths"]), strings(fg["sha256"]),
                                             strings(fg["reasons"]))}
    return Index(shards, strings(f["classes"]), failures, int(f.attrs.get("next_seq", 1)))


def write_index(path: Path, backbone: dict, index: Index) -> None:
    """Replace the index at `path` (temp + fsync + rename): the commit point."""
    dim = int(backbone["dim"])
    with atomic_h5(path) as f:
        set_backbone_attrs(f, backbone, root=path.parent)
        f.attrs["next_seq"] = index.next_seq
        f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        g = f.create_group("shards")
        g.create_dataset("seq", data=np.array([s.seq for s in index.shards], np.int64))
        write_strings(g, "names", [s.name for s in index.shards])
        g.create_dataset("rows", data=np.array([s.rows for s in index.shards], np.int64))
        write_strings(g, "sha256", [s.sha256 for s in index.shards])
        g.create_dataset("path_width", data=np.array([s.path_width for s in index.shards],
                                                     np.int64))
        tomb = [(s.seq, r) for s in index.shards for r in sorted(s.dead)]
        f.create_dataset("tombstones", data=np.array(tomb, np.int64).reshape(-1, 2))
        write_strings(f, "classes", index.classes)
        for name, values in (("paths", list(index.failures)),
                             ("sha256", [s for s, _ in index.failures.values()]),
                             ("reasons", [r for _, r in index.failures.values()])):
            write_strings(f, f"failures/{name}", values)
        _write_virtual_columns(f, index, dim)


def _write_virtual_columns(f: h5py.File, index: Index, dim: int) -> None:
    """One virtual dataset a column over the live rows of every shard, in order.

    Built with h5py's low-level calls: its VirtualLayout costs ~80 us a mapping
    in Python, which at 150 shards x 5 columns was a tenth of every commit.
    """
    n = sum(s.n_live for s in index.shards)
    width = max([s.path_width for s in index.shards] + [1])
    specs: dict[str, tuple[Any, tuple[int, ...], float | None]] = {
             "embeddings": (np.float32, (dim,), np.nan),
             "paths": (f"S{width}", (), None),
             "sha256": (f"S{SHA_WIDTH}", (), None),
             "labels": (np.int32, (), -1),
             "views": (np.int16, (), -1)}
    # [start, stop) runs of each shard's live rows, and where they land in the table
    placed, at = [], 0
    for s in index.shards:
        runs = _runs(s.live()) if s.dead else [(0, s.rows)]
        placed.append((f"{PARTS}/{s.name}".encode(), s.rows, runs, at))
        at += s.n_live
    for column, (dtype, row_shape, fill) in specs.items():
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.VIRTUAL)
        if fill is not None:
            dcpl.set_fill_value(np.array([fill], dtype))
        table = h5py.h5s.create_simple((n, *row_shape), (h5py.h5s.UNLIMITED, *row_shape))
        zeros = (0,) * len(row_shape)
        for source, rows, runs, start in placed:
            shard = h5py.h5s.create_simple((rows, *row_shape))
            for a, b in runs:
                table.select_hyperslab((start, *zeros), (b - a, *row_shape))
                shard.select_hyperslab((a, *zeros), (b - a, *row_shape))
                dcpl.set_virtual(table, source, column.encode(), shard)
                start += b - a
        h5py.h5d.create(f.id, column.encode(), h5py.h5t.py_create(np.dtype(dtype), logical=1),
                        h5py.h5s.create_simple((n, *row_shape),
                                               (h5py.h5s.UNLIMITED, *row_shape)), dcpl=dcpl)


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Increasing row numbers -> [start, stop) runs of consecutive rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]
