"""The writer's map of committed rows: content hash or path -> where the row lives.

A hash or a path is held in memory only as a 64-bit key (blake2b) beside the
row's location (shard seq << 32 | row), in two tables sorted by key: 32 bytes
a live row, however long its path. A key match is confirmed against the
shard's own columns with one `pread` (they are contiguous and immutable), so
a key collision can never make two paths or two contents one. Every shard
carries its rows' keys (`/keys`, written with the shard), so opening a
writer reads 16 bytes a row, not every path and hash.

Rows leave the tables lazily: a lookup ignores locations in shards that are
gone or rows that are tombstoned, and merging runs drops them for good.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np

from embedstore.store._index import Shard

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1


def loc(seq: int, row: int) -> int:
    return (seq << ROW_BITS) | row


def text_keys(values: Iterable[bytes | str]) -> np.ndarray:
    """64-bit keys of strings (utf-8) or bytes; fixed-width bytes ignore their NUL padding."""
    digests = b"".join(hashlib.blake2b(v.encode() if isinstance(v, str) else v,
                                       digest_size=8).digest() for v in values)
    return np.frombuffer(digests, "<u8").astype(np.uint64)


def text_key(value: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(),
                                    "little"))


def shard_keys(sha256: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """The (n, 2) uint64 `/keys` of a shard's rows: [key of sha256, key of path]."""
    return np.stack([text_keys(sha256), text_keys(paths)], axis=1)


class SortedRuns:
    """A uint64 key -> int64 location multimap held as a few sorted runs.

    Each run is at least RATIO times longer than the next one, so a lookup
    searches about log_RATIO(N / rows per commit) runs (4 at 10^7 rows), and a
    row is copied about 16 times over its life; the rare merge of everything
    copies 16 bytes a row once.
    """

    RATIO = 8

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, locs: np.ndarray,
            keep: Callable[[np.ndarray], np.ndarray]) -> None:
        """Add pairs; `keep(locs)` says which locations are still live when runs merge."""
        order = np.argsort(keys)
        run = (keys[order], locs[order])
        while self.runs and len(self.runs[-1][0]) < self.RATIO * len(run[0]):
            run = _merge(self.runs.pop(), run, keep)
        self.runs.append(run)

    def find(self, key: np.uint64) -> list[int]:
        hits = []
        for keys, locs in self.runs:
            i = int(keys.searchsorted(key))
            while i < len(keys) and keys[i] == key:
                hits.append(int(locs[i]))
                i += 1
        return hits

    def may_hold(self, keys: np.ndarray) -> np.ndarray:
        """Which of many keys are in some run (live or not): one vectorised pass a run."""
        found = np.zeros(len(keys), bool)
        for run, _ in self.runs:
            if len(run):
                at = np.minimum(run.searchsorted(keys), len(run) - 1)
                found |= run[at] == keys
        return found

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.runs)


def _merge(a: tuple, b: tuple, keep: Callable[[np.ndarray], np.ndarray]) -> tuple:
    """Two sorted runs -> one, without the locations that are no longer live."""
    keys_a, locs_a = a[0], a[1]
    at = keys_a.searchsorted(b[0], side="right") + np.arange(len(b[0]))
    n = len(keys_a) + len(b[0])
    from_b = np.zeros(n, bool)
    from_b[at] = True
    keys, locs = np.empty(n, np.uint64), np.empty(n, np.int64)
    keys[at], locs[at] = b
    keys[~from_b], locs[~from_b] = keys_a, locs_a
    live = keep(locs)
    return (keys, locs) if live.all() else (keys[live], locs[live])


COLUMN_NAMES = ("sha256", "paths", "views")


@dataclass
class _Columns:
    """One shard's open file and where its sha256, paths and views columns start."""

    fd: int
    at: dict  # column name -> (byte offset, numpy dtype)

    def value(self, name: str, row: int):
        offset, dtype = self.at[name]
        raw = os.pread(self.fd, dtype.itemsize, offset + dtype.itemsize * row)
        return np.frombuffer(raw, dtype)[0]


class RowIndex:
    """Committed live rows by content hash and by path, in about 32 bytes a row."""

    def __init__(self, shard_dir: Path):
        self.shard_dir = shard_dir
        self.by_sha, self.by_path = SortedRuns(), SortedRuns()
        self.shards: dict[int, Shard] = {}  # the live shards, by seq
        self._columns: dict[int, _Columns] = {}

    # shards coming and going ----------------------------------------------------------
    def load(self, shards: list[Shard], dim: int) -> list[tuple[Shard, Exception]]:
        """Index the live rows of `shards`; returns the shards that cannot be read."""
        bad, parts = [], []
        for shard in shards:
            try:
                parts.append(self._open(shard, dim))
            except (OSError, KeyError, ValueError) as exc:
                bad.append((shard, exc))
        if parts:
            keys = np.concatenate([k for k, _ in parts])
            locs = np.concatenate([v for _, v in parts])
            del parts
            self.by_sha.add(keys[:, 0].copy(), locs, self.live_mask)
            self.by_path.add(keys[:, 1].copy(), locs, self.live_mask)
        return bad

    def add(self, shard: Shard, dim: int) -> None:
        """Index a shard just written (all its rows are live)."""
        keys, locs = self._open(shard, dim)
        self.by_sha.add(keys[:, 0].copy(), locs, self.live_mask)
        self.by_path.add(keys[:, 1].copy(), locs, self.live_mask)

    def _open(self, shard: Shard, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Check a shard, keep its columns at hand; (keys, locations) of its live rows."""
        path = self.shard_dir / shard.name
        with h5py.File(path, "r") as f:
            if f["embeddings"].shape != (shard.rows, dim):
                raise ValueError(f"{f['embeddings'].shape} rows, the index says {shard.rows}")
            live = shard.live()
            if "keys" in f:
                keys = f["keys"][()][live]
            else:  # written before shards carried their keys
                keys = shard_keys(f["sha256"][()][live], f["paths"][()][live])
            at = {c: (f[c].id.get_offset(), f[c].dtype) for c in COLUMN_NAMES}
        if any(offset is None for offset, _ in at.values()):
            raise ValueError("its columns are not contiguous")
        self._columns[shard.seq] = _Columns(os.open(path, os.O_RDONLY), at)
        self.shards[shard.seq] = shard
        return keys, (np.int64(shard.seq) << ROW_BITS) | live.astype(np.int64)

    def retire(self, shards: Iterable[Shard]) -> None:
        """Shards no longer in the store: their rows stop being found."""
        for shard in shards:
            self.shards.pop(shard.seq, None)
            columns = self._columns.pop(shard.seq, None)
            if columns is not None:
                os.close(columns.fd)

    def close(self) -> None:
        self.retire(list(self.shards.values()))

    # liveness -------------------------------------------------------------------------
    def is_live(self, location: int) -> bool:
        shard = self.shards.get(location >> ROW_BITS)
        return shard is not None and (location & ROW_MASK) not in shard.dead

    def live_mask(self, locs: np.ndarray) -> np.ndarray:
        live = np.isin(locs >> ROW_BITS, np.fromiter(self.shards, np.int64))
        dead = [loc(seq, row) for seq, s in self.shards.items() for row in s.dead]
        if dead:
            live &= ~np.isin(locs, np.array(dead, np.int64))
        return live

    # lookups ----------------------------------------------------------------------------
    def rows_of_sha(self, sha: str) -> list[int]:
        """Locations of the live rows holding content `sha`."""
        return [at for at in self.by_sha.find(text_key(sha))
                if self.is_live(at) and self.sha_at(at) == sha]

    def rows_of_path(self, path: str) -> list[int]:
        """Locations of the live rows of `path` (one per view)."""
        return [at for at in self.by_path.find(text_key(path))
                if self.is_live(at) and self.path_at(at) == path]

    def _value(self, name: str, location: int):
        return self._columns[location >> ROW_BITS].value(name, location & ROW_MASK)

    def may_have_paths(self, paths: list[str]) -> set[str]:
        """The paths among `paths` that may have committed rows (a superset, found at once):
        the rest need no lookup one by one."""
        maybe = self.by_path.may_hold(text_keys(paths)) if paths else []
        return {p for p, m in zip(paths, maybe) if m}

    def sha_at(self, location: int) -> str:
        return self._value("sha256", location).decode()

    def path_at(self, location: int) -> str:
        return self._value("paths", location).decode()

    def view_at(self, location: int) -> int:
        return int(self._value("views", location))

    def live_column(self, name: str) -> Iterable[np.ndarray]:
        """One column of every live row, a shard at a time (e.g. every path, for --prune)."""
        for seq, shard in self.shards.items():
            with h5py.File(self.shard_dir / shard.name, "r") as f:
                yield f[name][()][shard.live()]

    @property
    def nbytes(self) -> int:
        return self.by_sha.nbytes + self.by_path.nbytes
