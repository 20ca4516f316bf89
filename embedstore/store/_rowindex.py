"""The writer's map of committed rows: content hash or path -> where the row lives.

A hash or a path is held in memory only as a 64-bit key (blake2b) beside the
row's location (shard seq << 32 | row), in two tables sorted by key
(SortedRuns): 32 bytes a live row, however long its path, and any merge of
the tables needs at most ~100 MB more. A key match is confirmed against the
shard's own columns with one `pread` (they are contiguous and immutable), so
a key collision can never make two paths or two contents one. Every shard
carries its rows' keys (`/keys`, written with the shard), so opening a
writer reads 16 bytes a row, not every path and hash.

Rows leave the tables lazily: a lookup ignores locations in shards that are
gone or rows that are tombstoned, and merges drop them for good.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedstore.store._index import Shard
from embedstore.store._layout import check_self_contained, is_regular_file

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


Run = tuple  # (keys: sorted uint64, locations: int64), the same length


class SortedRuns:
    """A uint64 key -> int64 location multimap in sorted NumPy arrays.

    Most pairs live in the base: partitions by key range of at most
    2 x PART_ROWS pairs, so a lookup searches one of them, and merging into the
    base rewrites one partition at a time (a merge's extra memory stays under
    ~100 MB however big the store). New pairs go to a short tail of sorted runs,
    each at least RATIO times longer than the next; once the tail holds more
    than 1/RATIO of the base it is merged into the base. Merges drop the
    locations that are no longer live. A pair is copied about 2 x RATIO times.
    """

    PART_ROWS = 1 << 21  # 32 MB of keys and locations
    RATIO = 8

    def __init__(self):
        self.base: list[Run] = []
        self.bounds = np.zeros(0, np.uint64)  # first key of every base partition but the first
        self.tail: list[Run] = []

    def add(self, keys: np.ndarray, locs: np.ndarray,
            keep: Callable[[np.ndarray], np.ndarray]) -> None:
        """Add pairs; `keep(locs)` says which locations are still live when runs merge."""
        order = np.argsort(keys)
        run = (keys[order], locs[order])
        while self.tail and len(self.tail[-1][0]) < self.RATIO * len(run[0]):
            run = _merge(self.tail.pop(), run, keep)
        self.tail.append(run)
        tail_rows = sum(len(k) for k, _ in self.tail)
        if self.RATIO * tail_rows > max(sum(len(k) for k, _ in self.base), self.PART_ROWS):
            self._merge_tail_into_base(keep)

    def _merge_tail_into_base(self, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        run = self.tail.pop()
        while self.tail:
            run = _merge(self.tail.pop(), run, keep)
        old = self.base or [(np.zeros(0, np.uint64), np.zeros(0, np.int64))]
        edges = [0, *run[0].searchsorted(self.bounds).tolist(), len(run[0])]
        base: list[Run] = []
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            part = old[i]
            old[i] = (np.zeros(0, np.uint64), np.zeros(0, np.int64))  # freed as we go
            base += _split(_merge(part, (run[0][a:b], run[1][a:b]), keep), self.PART_ROWS)
        self.base = [p for p in base if len(p[0])]
        self.bounds = np.array([p[0][0] for p in self.base[1:]], np.uint64)

    def _runs_for(self, key: np.uint64) -> list[Run]:
        if not self.base:
            return self.tail
        return [*self.tail, self.base[int(self.bounds.searchsorted(key, side="right"))]]

    def find(self, key: np.uint64) -> list[int]:
        hits = []
        for keys, locs in self._runs_for(key):
            i = int(keys.searchsorted(key))
            while i < len(keys) and keys[i] == key:
                hits.append(int(locs[i]))
                i += 1
        return hits

    def may_hold(self, keys: np.ndarray) -> np.ndarray:
        """Which of many keys are here (live or not): one vectorised pass a run."""
        found = np.zeros(len(keys), bool)
        for run, _ in self.tail:
            found |= _holds(run, keys)
        if self.base:
            part = self.bounds.searchsorted(keys, side="right")
            for p in np.unique(part).tolist():
                at = np.flatnonzero(part == p)
                found[at] |= _holds(self.base[p][0], keys[at])
        return found

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.base + self.tail)


class _RangeFill:
    """Builds a SortedRuns from n pairs given piece by piece, needing little more memory
    than the result: pairs go straight into one buffer per key range (keys are uniform
    hashes, so the ranges fill evenly), and each range is sorted into a base partition
    and its buffer freed before the next. Big buffers, not many small pieces: freed small
    allocations stay in the process's heap and would double its peak RSS."""

    def __init__(self, n: int, rows: int):
        count = max(1, -(-n // rows))
        self.bounds = np.arange(1, count, dtype=np.uint64) * np.uint64((2**64 - 1) // count)
        size = n // count + n // (8 * count) + 1024
        self.keys = [np.empty(size, np.uint64) for _ in range(count)]
        self.locs = [np.empty(size, np.int64) for _ in range(count)]
        self.used = [0] * count

    def put(self, keys: np.ndarray, locs: np.ndarray) -> None:
        where = self.bounds.searchsorted(keys, side="right")
        order = np.argsort(where, kind="stable")
        edges = where[order].searchsorted(np.arange(len(self.used) + 1))
        for r in np.flatnonzero(np.diff(edges)).tolist():
            take = order[edges[r]:edges[r + 1]]
            a, b = self.used[r], self.used[r] + len(take)
            if b > len(self.keys[r]):  # an uneven range: grow it
                self.keys[r] = np.resize(self.keys[r], 2 * b)
                self.locs[r] = np.resize(self.locs[r], 2 * b)
            self.keys[r][a:b], self.locs[r][a:b] = keys[take], locs[take]
            self.used[r] = b

    def table(self) -> SortedRuns:
        table = SortedRuns()
        for r, n in enumerate(self.used):
            keys, locs = self.keys[r][:n], self.locs[r][:n]
            self.keys[r] = np.zeros(0, np.uint64)  # freed before the next range
            self.locs[r] = np.zeros(0, np.int64)
            if n:
                order = np.argsort(keys)
                table.base.append((keys[order], locs[order]))
        table.bounds = np.array([p[0][0] for p in table.base[1:]], np.uint64)
        return table


def _holds(run: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(run):
        return np.zeros(len(keys), bool)
    return run[np.minimum(run.searchsorted(keys), len(run) - 1)] == keys


def _split(run: Run, rows: int) -> list[Run]:
    """A run longer than 2 x rows -> pieces of about `rows` (views, no copy); equal keys
    stay in one piece, so a key is always in the partition its bounds say."""
    keys, locs = run
    if len(keys) <= 2 * rows:
        return [run]
    pieces, a = [], 0
    for cut in range(rows, len(keys) - rows // 2, rows):
        cut = int(keys.searchsorted(keys[cut]))
        if cut > a:
            pieces.append((keys[a:cut], locs[a:cut]))
            a = cut
    return pieces + [(keys[a:], locs[a:])]


def _merge(a: Run, b: Run, keep: Callable[[np.ndarray], np.ndarray]) -> Run:
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
        bad: list[tuple[Shard, Exception]] = []
        by_sha, by_path = (_RangeFill(sum(s.n_live for s in shards), SortedRuns.PART_ROWS)
                           for _ in range(2))
        for shard in shards:
            try:
                keys, locs = self._open(shard, dim)
            except (OSError, KeyError, ValueError) as exc:
                bad.append((shard, exc))
                continue
            by_sha.put(keys[:, 0], locs)
            by_path.put(keys[:, 1], locs)
        self.by_sha, self.by_path = by_sha.table(), by_path.table()
        return bad

    def add(self, shard: Shard, dim: int) -> None:
        """Index a shard just written (all its rows are live)."""
        keys, locs = self._open(shard, dim)
        self.by_sha.add(keys[:, 0].copy(), locs, self.live_mask)
        self.by_path.add(keys[:, 1].copy(), locs, self.live_mask)

    def _open(self, shard: Shard, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Check a shard, keep its columns at hand; (keys, locations) of its live rows."""
        path = self.shard_dir / shard.name
        if not is_regular_file(path):
            raise ValueError("missing, or not a regular file")
        with h5py.File(path, "r") as f:
            check_self_contained(f, path)
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
        seqs = locs >> ROW_BITS
        alive = np.zeros(max(self.shards, default=0) + 2, bool)  # a table by seq: one O(n) pass
        alive[list(self.shards)] = True
        live = alive[np.minimum(seqs, len(alive) - 1)]
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
        maybe = self.by_path.may_hold(text_keys(paths)) if paths else np.zeros(0, bool)
        return {p for p, m in zip(paths, maybe) if m}

    def sha_at(self, location: int) -> str:
        return self._value("sha256", location).decode()

    def path_at(self, location: int) -> str:
        return self._value("paths", location).decode()

    def view_at(self, location: int) -> int:
        return int(self._value("views", location))

    def live_column(self, name: str) -> Iterable[np.ndarray]:
        """One column of every live row, a shard at a time (e.g. every path, for --prune)."""
        for shard in self.shards.values():
            with h5py.File(self.shard_dir / shard.name, "r") as f:
                yield f[name][()][shard.live()]

    @property
    def nbytes(self) -> int:
        return self.by_sha.nbytes + self.by_path.nbytes
