"""Reading a store: format 3 (a directory), or a format-1/2 file where it lies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from embedstore.store._format import (
    COPY_BLOCK_ROWS,
    StoreError,
    backbone_attrs,
    decode,
    open_h5,
    strings,
)
from embedstore.store._index import COLUMNS, Shard, read_index
from embedstore.store._layout import (
    INDEX,
    Layout,
    check_inside,
    check_self_contained,
    is_regular_file,
    layout,
)
from embedstore.store.backends import StoreInfo

SHARD_COLUMNS = ("embeddings", "paths", "sha256", "labels", "views", "keys")


@dataclass
class Segment:
    """Rows of one HDF5 file that belong to the store: `live` local rows (None: all)."""

    file: h5py.File
    live: np.ndarray | None
    n: int
    vectors: object = None  # the embeddings: a memory map of a shard, else the h5py dataset

    def __post_init__(self):
        if self.vectors is None:
            self.vectors = vectors_of(self.file)

    def column(self, name: str) -> np.ndarray:
        ds = self.file[name]
        values = ds[()] if len(ds) else np.empty((0,), ds.dtype)
        return values if self.live is None else values[self.live]

    def embeddings(self, local: np.ndarray) -> np.ndarray:
        """Rows at increasing positions `local` among this segment's live rows."""
        rows = local if self.live is None else self.live[local]
        return gather(self.vectors, rows)


class StoreReader:
    """Read-only view of a store; arrays load lazily, embeddings in chunks.

    The shard files are opened when the store is: a reader keeps its snapshot
    even if a writer folds or deletes shards meanwhile.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout = layout(path)
        self._check_exists()
        check_inside(self.layout.index, self.layout.root, "index")
        self._f = open_h5(self.layout.index)
        self._files: list[h5py.File] = []
        self._segment_files: list[Path] = []
        try:
            check_self_contained(self._f, self.layout.index, virtual_ok=COLUMNS)
            self.format_version = int(self._f.attrs.get("format_version", 1))
            self.backbone = backbone_attrs(self._f, self.layout.root)
            self.dim = self.backbone["dim"]
            self._segments = self._open_segments()
        except BaseException:
            self.close()
            raise
        self._starts = np.cumsum([0] + [s.n for s in self._segments])
        self.n_rows = int(self._starts[-1])

    def _check_exists(self) -> None:
        where = self.layout
        if where.legacy or where.index.is_file():
            return
        if where.root.is_dir():
            raise StoreError(f"{self.path} holds no committed rows yet (no {INDEX}): it is "
                             "empty, or not a store; extract into it with `embedstore extract`")
        raise StoreError(f"store {self.path} does not exist; create it with `embedstore extract`")

    def _open_segments(self) -> list[Segment]:
        if self.format_version == 1:
            self._table = strings(self._f["classes"])
            self._failures = {p: (s, r) for p, s, r in zip(
                strings(self._f["failures/paths"]), strings(self._f["failures/sha256"]),
                strings(self._f["failures/reasons"]))}
            self.shards = []
            return [Segment(self._f, None, int(self._f["embeddings"].shape[0]))]
        index = read_index(self._f)
        self._table, self._failures, self.shards = index.classes, index.failures, index.shards
        check_inside(self.layout.parts, self.layout.root, "parts folder")
        segments = []
        for shard in index.shards:
            f = open_shard(self.layout, shard, self.path)
            self._files.append(f)
            self._segment_files.append(self.layout.shard(shard.name))
            segments.append(Segment(f, shard.live() if shard.dead else None, shard.n_live))
        return segments

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._segments = []  # drops the memory maps
        for f in self._files:
            f.close()
        self._files = []
        self._f.close()

    # columns ---------------------------------------------------------------------------
    def _concat(self, name: str, dtype=None) -> np.ndarray:
        parts = [s.column(name) for s in self._segments]
        if name in ("paths", "sha256"):
            parts = [decode(p) if p.dtype.kind == "S" else p.astype(object) for p in parts]
        return np.concatenate(parts) if parts else np.array([], dtype or object)

    @property
    def paths(self) -> np.ndarray:
        return self._concat("paths")

    @property
    def sha256(self) -> np.ndarray:
        return self._concat("sha256")

    @cached_property
    def _labels_and_classes(self) -> tuple[np.ndarray, list[str]]:
        """Labels renumbered over the sorted names of the classes that have live rows.

        On disk, labels index the store's class table, which only grows (so that
        immutable shards never need renumbering); readers see the tidy version.
        """
        raw = self._concat("labels", np.int32).astype(np.int32)
        used = np.unique(raw[raw >= 0])
        classes = sorted({self._table[i] for i in used})
        lut = np.full(len(self._table) + 1, -1, np.int32)  # lut[-1] stays -1
        for i in used:
            lut[i] = classes.index(self._table[i])
        return lut[raw], classes

    @property
    def classes(self) -> list[str]:
        return list(self._labels_and_classes[1])

    @property
    def labels(self) -> np.ndarray:
        return self._labels_and_classes[0].copy()

    @property
    def views(self) -> np.ndarray:
        return self._concat("views", np.int16).astype(np.int16)

    # embeddings ------------------------------------------------------------------------
    def embeddings(self, rows=None) -> np.ndarray:
        """All embeddings, or the given rows (any order), as one float32 array."""
        if rows is None:
            rows = np.arange(self.n_rows)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row out of range for a store of {self.n_rows} rows")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        out = np.empty((len(rows), self.dim), np.float32)
        seg = np.searchsorted(self._starts, ordered, side="right") - 1
        for k in np.unique(seg):
            a, b = np.searchsorted(seg, [k, k + 1])
            out[order[a:b]] = self._segments[k].embeddings(ordered[a:b] - self._starts[k])
        return out

    def iter_embeddings(self, chunk_rows: int = 65536, copy: bool = True
                        ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, block) pairs, for stores larger than memory.

        copy=False yields, where a shard has no tombstones, read-only views into its
        memory map instead of copies (valid while the reader is open): a scan over
        every vector (similar) then reads the page cache once and copies nothing.
        """
        if copy:
            for start in range(0, self.n_rows, chunk_rows):
                yield start, self.embeddings(np.arange(start, min(start + chunk_rows,
                                                                  self.n_rows)))
            return
        for k, segment in enumerate(self._segments):
            first = int(self._starts[k])
            for a in range(0, segment.n, chunk_rows):
                b = min(a + chunk_rows, segment.n)
                if segment.live is None and isinstance(segment.vectors, np.memmap):
                    yield first + a, segment.vectors[a:b]
                else:
                    yield first + a, segment.embeddings(np.arange(a, b))

    # the rest ----------------------------------------------------------------------------
    def failures(self) -> list[dict]:
        return [{"path": p, "sha256": s, "reason": r} for p, (s, r) in self._failures.items()]

    def corrupt_shards(self) -> list[tuple[Path, np.ndarray]]:
        """(file, rows) of every shard whose sha256 no longer matches the index."""
        from embedstore.store._shard import file_sha256

        return [(file, np.arange(self._starts[k], self._starts[k + 1]))
                for k, (shard, file) in enumerate(zip(self.shards, self._segment_files))
                if file_sha256(file) != shard.sha256]

    def shard_file_of(self, row: int) -> Path:
        """The file holding row `row` (the store itself for format 1)."""
        if not self._segment_files:
            return self.layout.index
        return self._segment_files[int(np.searchsorted(self._starts, row, side="right")) - 1]

    def info(self) -> StoreInfo:
        labels, classes = self._labels_and_classes
        counts = np.bincount(labels[labels >= 0], minlength=len(classes))
        shard_bytes = sum(p.stat().st_size for p in self._segment_files)
        index_bytes = self.layout.index.stat().st_size
        parts, quarantine = self.layout.parts, self.layout.quarantine
        sha = self.sha256
        return StoreInfo(**{
            "path": str(self.path),
            "rows": self.n_rows,
            "images": len(set(sha)),
            "paths": len(set(self.paths)),
            "unlabelled": int((labels < 0).sum()),
            "failures": len(self._failures),
            "classes": {c: int(n) for c, n in zip(classes, counts)},
            "dim": self.dim,
            "backbone": {"name": self.backbone["name"],
                         "fingerprint": self.backbone["fingerprint"],
                         "config": self.backbone["config"]},
            "file_bytes": index_bytes + shard_bytes,
            "index_bytes": index_bytes,
            "shards": len(self.shards),
            "dead_rows": sum(len(s.dead) for s in self.shards),
            "pending_parts": len(list(parts.glob("part-*.h5"))) if parts.is_dir() else 0,
            "quarantined": sorted(p.name for p in quarantine.iterdir())
            if quarantine.is_dir() else [],
            "format_version": self.format_version,
        })


def open_shard(where: Layout, shard: Shard, store: Path) -> h5py.File:
    """A shard file of the store, checked: a regular file inside parts/, holding its own
    data. A StoreError names it otherwise."""
    file = where.shard(shard.name)
    advice = (f"run `embedstore compact {store}` to quarantine it (the next extract "
              "re-embeds its images)")
    if not is_regular_file(file):
        what = "missing" if not os.path.lexists(file) else "not a regular file"
        raise StoreError(f"shard {file} of {store} is {what}; {advice}")
    try:
        f = h5py.File(file, "r")
    except OSError as exc:
        raise StoreError(f"shard {file} of {store} is unreadable ({exc}); {advice}") from None
    try:
        check_self_contained(f, file)
        missing = [c for c in SHARD_COLUMNS[:5] if c not in f]
        if missing:
            raise StoreError(f"shard {file} of {store} lacks {', '.join(missing)}; {advice}")
    except BaseException:
        f.close()
        raise
    return f


def vectors_of(f: h5py.File):
    """A file's /embeddings as a read-only memory map when it is contiguous and
    uncompressed (shards), else the h5py dataset. The map keeps the file alive
    after a writer deletes it, so a reader keeps its snapshot."""
    ds = f["embeddings"]
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    if offset is None or ds.shape[0] == 0:
        return ds
    return np.memmap(f.filename, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)


def gather(vectors, sorted_rows: np.ndarray) -> np.ndarray:
    """Rows at increasing positions, from a memory map or an h5py dataset."""
    if not isinstance(vectors, np.memmap):
        return read_rows(vectors, sorted_rows)
    if len(sorted_rows) and sorted_rows[-1] - sorted_rows[0] + 1 == len(sorted_rows):
        return np.array(vectors[sorted_rows[0]:sorted_rows[-1] + 1])  # a run: one copy
    return vectors[sorted_rows]


def read_rows(ds, sorted_rows: np.ndarray, max_block_rows: int = COPY_BLOCK_ROWS) -> np.ndarray:
    """Rows in increasing order, read as slices over the chunks that hold them.

    h5py's point selection is slow (it reads row by row); slicing
    runs of adjacent touched chunks reads each chunk once, in bounded blocks.
    """
    out = np.empty((len(sorted_rows), ds.shape[1]), ds.dtype)
    if len(sorted_rows) == 0:
        return out
    chunk = ds.chunks[0] if ds.chunks else max_block_rows
    per_block = max(1, max_block_rows // chunk)
    touched = np.unique(sorted_rows // chunk)
    # a new block where touched chunks stop being adjacent or the block is full
    breaks = np.flatnonzero(np.diff(touched) != 1) + 1
    starts: list[int] = []
    for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(touched)]])):
        starts.extend(range(int(a), int(b), per_block))
    for first, last in zip(starts, starts[1:] + [len(touched)]):
        lo = int(touched[first]) * chunk
        hi = min(int(touched[last - 1] + 1) * chunk, ds.shape[0])
        a, b = np.searchsorted(sorted_rows, [lo, hi])
        out[a:b] = ds[lo:hi][sorted_rows[a:b] - lo]
    return out
