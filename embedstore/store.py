"""The HDF5 embedding store: schema, crash-safe append, resume, read.

One file, readable with plain h5py (schema in DESIGN.md and the README):
/embeddings (N, D) float32, /paths, /sha256, /labels, /views, /classes,
/failures/{paths,sha256,reasons}; root attributes name the backbone.

How it stays valid through a crash or kill -9: the store file itself is only
ever *replaced*, never modified in place (written to a temporary file,
fsynced, renamed over). A writer commits each batch as a small, complete
"part" file in `STORE.parts/` (also temp + rename), so a committed batch
survives anything. Parts are merged into the store geometrically (when they
hold as many rows as the store) and at the end of a run; a crash leaves them
to be merged by the next writer. Merging is idempotent: rows are keyed by
path, and the latest content seen for a path wins.

One writer at a time (an flock on `STORE.lock`); readers never block, and a
reader that has the file open keeps its snapshot while a writer replaces it.
The store knows nothing of TensorFlow or heads.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

FORMAT = "embedstore"
FORMAT_VERSION = 1
STR = h5py.string_dtype()
EMBEDDING_CHUNK_ROWS = 64  # 320 KiB chunks at 1280-d: cheap random-row reads
COPY_BLOCK_ROWS = 8192
# Parts are merged once they hold as many rows as the store (and at least this
# many): readers see new rows with bounded lag while total rewriting stays O(N).
MERGE_FLOOR_ROWS = 4096


class StoreError(ValueError):
    """A store that cannot be used as asked, with what to do about it."""


def parts_dir(store: str | Path) -> Path:
    return Path(f"{store}.parts")


def lock_path(store: str | Path) -> Path:
    return Path(f"{store}.lock")


# --- small HDF5 helpers --------------------------------------------------------------

def _strings(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in ds[()]] if len(ds) else []


def _write_strings(group, name: str, values) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=STR)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_h5(path: Path):
    """Context manager: an h5py file written at a temp name, fsynced and renamed to `path`."""

    class _Writer:
        def __enter__(self):
            self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            self.f = h5py.File(self.tmp, "w", libver=("earliest", "v110"))
            return self.f

        def __exit__(self, exc_type, exc, tb):
            self.f.close()
            if exc_type is not None:
                self.tmp.unlink(missing_ok=True)
                return False
            _fsync_path(self.tmp)
            os.replace(self.tmp, path)
            _fsync_path(path.parent, directory=True)
            return False

    return _Writer()


def backbone_attrs(f: h5py.File) -> dict:
    return {"name": f.attrs.get("backbone_name", ""),
            "fingerprint": f.attrs.get("backbone_fingerprint", ""),
            "dim": int(f.attrs.get("backbone_dim", 0)),
            "config": json.loads(f.attrs.get("backbone_config", "{}"))}


def _set_backbone_attrs(f: h5py.File, backbone: dict) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["backbone_name"] = backbone["name"]
    f.attrs["backbone_fingerprint"] = backbone["fingerprint"]
    f.attrs["backbone_dim"] = int(backbone["dim"])
    f.attrs["backbone_config"] = json.dumps(backbone.get("config", {}), sort_keys=True)


def _open_h5(path: Path) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} is not a readable HDF5 file ({exc}); "
                         "give an embedstore store or extract into a new file") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise StoreError(f"{path} is an HDF5 file but not an embedstore store")
    return f


# --- reading -------------------------------------------------------------------------

class StoreReader:
    """Read-only view of a store; arrays load lazily, embeddings in chunks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            hint = (f"; {len(list(parts_dir(path).glob('part-*.h5')))} committed parts wait in "
                    f"{parts_dir(path)}: run `embedstore compact {path}`"
                    if parts_dir(path).is_dir() else "; create it with `embedstore extract`")
            raise StoreError(f"store {path} does not exist{hint}")
        self._f = _open_h5(self.path)
        self.backbone = backbone_attrs(self._f)
        self.dim = self.backbone["dim"]
        self.n_rows = int(self._f["embeddings"].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def classes(self) -> list[str]:
        return _strings(self._f["classes"])

    @property
    def paths(self) -> np.ndarray:
        return np.array(_strings(self._f["paths"]), dtype=object)

    @property
    def sha256(self) -> np.ndarray:
        return np.array(_strings(self._f["sha256"]), dtype=object)

    @property
    def labels(self) -> np.ndarray:
        return self._f["labels"][()]

    @property
    def views(self) -> np.ndarray:
        return self._f["views"][()]

    def embeddings(self, rows=None) -> np.ndarray:
        """All embeddings, or the given rows (any order), as one float32 array."""
        ds = self._f["embeddings"]
        if rows is None:
            return ds[()]
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), np.float32)
        out[order] = _read_rows(ds, rows[order])
        return out

    def iter_embeddings(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, block) pairs, for stores larger than memory."""
        ds = self._f["embeddings"]
        for start in range(0, self.n_rows, chunk_rows):
            yield start, ds[start:start + chunk_rows]

    def failures(self) -> list[dict]:
        g = self._f["failures"]
        return [{"path": p, "sha256": s, "reason": r} for p, s, r in
                zip(_strings(g["paths"]), _strings(g["sha256"]), _strings(g["reasons"]))]

    def info(self) -> dict:
        labels, classes = self.labels, self.classes
        counts = np.bincount(labels[labels >= 0], minlength=len(classes))
        pending = parts_dir(self.path)
        return {
            "path": str(self.path),
            "rows": self.n_rows,
            "images": len(set(_strings(self._f["sha256"]))),
            "paths": len(set(_strings(self._f["paths"]))),
            "unlabelled": int((labels < 0).sum()),
            "failures": int(self._f["failures/paths"].shape[0]),
            "classes": {c: int(n) for c, n in zip(classes, counts)},
            "dim": self.dim,
            "backbone": {"name": self.backbone["name"],
                         "fingerprint": self.backbone["fingerprint"],
                         "config": self.backbone["config"]},
            "file_bytes": self.path.stat().st_size,
            "pending_parts": len(list(pending.glob("part-*.h5"))) if pending.is_dir() else 0,
            "format_version": int(self._f.attrs["format_version"]),
        }


def open_store(path: str | Path) -> StoreReader:
    return StoreReader(path)


def _read_rows(ds, sorted_rows: np.ndarray, max_block_rows: int = COPY_BLOCK_ROWS) -> np.ndarray:
    """Rows in increasing order, read as slices over the chunks that hold them.

    h5py's point selection is slow (10k random rows of 70k took 2 s); slicing
    runs of adjacent touched chunks reads each chunk once, in bounded blocks.
    """
    out = np.empty((len(sorted_rows), ds.shape[1]), ds.dtype)
    if len(sorted_rows) == 0:
        return out
    chunk = ds.chunks[0] if ds.chunks else max_block_rows
    per_block = max(1, max_block_rows // chunk)
    touched = np.unique(sorted_rows // chunk)
    # a new block where touched chunks stop being adjacent or the block is full
    starts = [0]
    for i in range(1, len(touched)):
        if touched[i] != touched[i - 1] + 1 or i - starts[-1] >= per_block:
            starts.append(i)
    for first, last in zip(starts, starts[1:] + [len(touched)]):
        lo = int(touched[first]) * chunk
        hi = min(int(touched[last - 1] + 1) * chunk, ds.shape[0])
        a, b = np.searchsorted(sorted_rows, [lo, hi])
        out[a:b] = ds[lo:hi][sorted_rows[a:b] - lo]
    return out


# --- writing -------------------------------------------------------------------------

@dataclass
class PendingRows:
    """What a writer has gathered since its last commit."""

    embeddings: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    sha256: list = field(default_factory=list)
    labels: list = field(default_factory=list)  # class names, "" unlabelled
    views: list = field(default_factory=list)
    copies: list = field(default_factory=list)  # (path, sha256, label): reuse known vectors
    failures: list = field(default_factory=list)  # (path, sha256, reason)
    removed: list = field(default_factory=list)  # paths that no longer exist (renames)

    def __len__(self) -> int:
        return len(self.paths) + len(self.copies) + len(self.failures) + len(self.removed)


class StoreWriter:
    """The single writer of a store: commit parts, merge them, release the lock.

    Use as a context manager. `known(sha)` answers whether content is already
    embedded (in the store or committed by this writer), which is how a
    re-run skips inference.
    """

    def __init__(self, path: str | Path, backbone: dict):
        self.path = Path(path)
        self.backbone = backbone
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self.path)
        try:
            self._parts = parts_dir(self.path)
            self._check_backbone()
            merge(self.path, _locked=True)  # finish what a crashed writer committed
            self._load_index()
        except BaseException:
            self.release()
            raise
        self.pending = PendingRows()
        self._part_rows = 0

    # context manager -----------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None or exc_type is KeyboardInterrupt:
                self.commit()  # keep finished work even on Ctrl-C
            if exc_type is None:
                merge(self.path, _locked=True, backbone=self.backbone)
        finally:
            self.release()
        return False

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # index ---------------------------------------------------------------------------
    def _check_backbone(self) -> None:
        candidates = [self.path] if self.path.exists() else []
        candidates += sorted(self._parts.glob("part-*.h5"))[:1]
        for p in candidates:
            with _open_h5(p) as f:
                theirs = backbone_attrs(f)
            if theirs["fingerprint"] != self.backbone["fingerprint"]:
                raise StoreError(
                    f"{self.path} holds embeddings from backbone {theirs['name']} "
                    f"(fingerprint {theirs['fingerprint'][:12]}), not {self.backbone['name']} "
                    f"({self.backbone['fingerprint'][:12]}); use another store file or "
                    f"--backbone {theirs['name']}")

    def _load_index(self) -> None:
        self.known_sha: set[str] = set()
        self.path_sha: dict[str, str] = {}
        self.sha_paths: dict[str, list[str]] = {}
        self.failed: dict[str, str] = {}  # path -> sha256 of the content that failed
        if not self.path.exists():
            return
        with _open_h5(self.path) as f:
            for p, s in zip(_strings(f["paths"]), _strings(f["sha256"])):
                self.known_sha.add(s)
                if self.path_sha.get(p) != s:
                    self.path_sha[p] = s
                    self.sha_paths.setdefault(s, []).append(p)
            self.failed = dict(zip(_strings(f["failures/paths"]), _strings(f["failures/sha256"])))

    def known(self, sha: str) -> bool:
        return sha in self.known_sha

    def failed_before(self, path: str, sha: str) -> bool:
        return self.failed.get(path) == sha

    # adding --------------------------------------------------------------------------
    def add(self, embeddings: np.ndarray, paths, sha256, labels, views=None) -> None:
        n = len(paths)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (n, self.backbone["dim"]):
            raise StoreError(f"expected {n} x {self.backbone['dim']} embeddings, "
                             f"got {embeddings.shape}")
        self.pending.embeddings.append(embeddings)
        self.pending.paths += list(paths)
        self.pending.sha256 += list(sha256)
        self.pending.labels += [lab or "" for lab in labels]
        self.pending.views += list(views if views is not None else [0] * n)
        for p, s in zip(paths, sha256):
            self._note(p, s)

    def add_copy(self, path: str, sha: str, label: str | None) -> None:
        """`path` holds content already embedded elsewhere: reuse, do not re-run."""
        self.pending.copies.append((path, sha, label or ""))
        self._note(path, sha)

    def add_failure(self, path: str, sha: str | None, reason: str) -> None:
        self.pending.failures.append((path, sha or "", reason))
        self.failed[path] = sha or ""

    def remove(self, path: str) -> None:
        """Forget `path`: its rows and any failure recorded for it."""
        self.pending.removed.append(path)
        self.path_sha.pop(path, None)
        self.failed.pop(path, None)

    def paths(self) -> set[str]:
        """Every path the store has rows or a failure for."""
        return set(self.path_sha) | set(self.failed)

    def _note(self, path: str, sha: str) -> None:
        self.known_sha.add(sha)
        self.path_sha[path] = sha
        self.sha_paths.setdefault(sha, []).append(path)
        self.failed.pop(path, None)

    # committing ----------------------------------------------------------------------
    def commit(self) -> None:
        """Write what is pending as one part file; it survives any crash from now on."""
        if not len(self.pending):
            return
        self._parts.mkdir(exist_ok=True)
        seq = _next_part_seq(self.path)
        rows = self.pending
        with _atomic_h5(self._parts / f"part-{seq:09d}.h5") as f:
            _set_backbone_attrs(f, self.backbone)
            f.attrs["seq"] = seq
            emb = (np.concatenate(rows.embeddings) if rows.embeddings
                   else np.empty((0, self.backbone["dim"]), np.float32))
            f.create_dataset("embeddings", data=emb)
            _write_strings(f, "paths", rows.paths)
            _write_strings(f, "sha256", rows.sha256)
            _write_strings(f, "label_names", rows.labels)
            f.create_dataset("views", data=np.asarray(rows.views, np.int16))
            for name, col in (("paths", 0), ("sha256", 1), ("label_names", 2)):
                _write_strings(f, f"copies/{name}", [c[col] for c in rows.copies])
            for name, col in (("paths", 0), ("sha256", 1), ("reasons", 2)):
                _write_strings(f, f"failures/{name}", [c[col] for c in rows.failures])
            _write_strings(f, "removed", rows.removed)
        self._part_rows += len(rows.paths) + len(rows.copies)
        self.pending = PendingRows()
        main_rows = _row_count(self.path)
        if self._part_rows >= max(main_rows, MERGE_FLOOR_ROWS):
            merge(self.path, _locked=True, backbone=self.backbone)
            self._part_rows = 0


def _row_count(path: Path) -> int:
    if not path.exists():
        return 0
    with _open_h5(path) as f:
        return int(f["embeddings"].shape[0])


def _next_part_seq(store: Path) -> int:
    seqs = [int(p.stem.split("-")[1]) for p in parts_dir(store).glob("part-*.h5")]
    absorbed = 0
    if store.exists():
        with _open_h5(store) as f:
            absorbed = int(f.attrs.get("absorbed_seq", 0))
    return max(seqs + [absorbed]) + 1


def _acquire_lock(store: Path) -> int:
    fd = os.open(lock_path(store), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"{store} is being written by another process (pid {holder}); "
                         "wait for it to finish (readers can keep reading)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


# --- merging -------------------------------------------------------------------------

@dataclass
class _PathState:
    sha: str
    label: str
    views: dict  # view -> (source index, row) or ("copy", sha, view)


def merge(path: str | Path, _locked: bool = False, backbone: dict | None = None) -> bool:
    """Fold committed parts into the store file (atomically). True if anything changed.

    Takes the writer lock unless the caller holds it. Safe to re-run after a
    crash at any point: the store records the last part it absorbed.
    """
    path = Path(path)
    fd = None if _locked else _acquire_lock(path)
    try:
        parts = _unabsorbed_parts(path)
        if not parts:
            for p in parts_dir(path).glob("part-*.h5"):  # absorbed before a crash
                p.unlink()
            return False
        _rewrite(path, parts, backbone)
        for p in parts_dir(path).glob("part-*.h5"):
            p.unlink()
        for p in parts_dir(path).glob(".part-*.tmp-*"):
            p.unlink()
        try:
            parts_dir(path).rmdir()  # only when empty; a writer recreates it on commit
        except OSError:
            pass
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _unabsorbed_parts(path: Path) -> list[Path]:
    absorbed = 0
    if path.exists():
        with _open_h5(path) as f:
            absorbed = int(f.attrs.get("absorbed_seq", 0))
    return sorted(p for p in parts_dir(path).glob("part-*.h5")
                  if int(p.stem.split("-")[1]) > absorbed)


def _rewrite(path: Path, parts: list[Path], backbone: dict | None) -> None:
    sources = ([path] if path.exists() else []) + parts
    files = [_open_h5(p) for p in sources]
    try:
        backbone = backbone or backbone_attrs(files[0])
        state: dict[str, _PathState] = {}
        failures: dict[str, tuple[str, str]] = {}
        by_sha: dict[str, dict[int, tuple[int, int]]] = {}  # where content is
        for src, f in enumerate(files):
            is_main = src == 0 and path.exists()
            names = _strings(f["classes"]) if is_main else None
            for p in _strings(f["removed"]) if "removed" in f else []:
                state.pop(p, None)
                failures.pop(p, None)
            for p, s, r in zip(_strings(f["failures/paths"]), _strings(f["failures/sha256"]),
                               _strings(f["failures/reasons"])):
                state.pop(p, None)
                failures[p] = (s, r)
            labels = (f["labels"][()] if is_main else _strings(f["label_names"]))
            for row, (p, s, v) in enumerate(zip(_strings(f["paths"]), _strings(f["sha256"]),
                                                f["views"][()])):
                label = (names[labels[row]] if labels[row] >= 0 else "") if is_main \
                    else labels[row]
                _put(state, failures, p, s, label, int(v), (src, row))
                by_sha.setdefault(s, {})[int(v)] = (src, row)
            if "copies" in f:
                for p, s, label in zip(_strings(f["copies/paths"]), _strings(f["copies/sha256"]),
                                       _strings(f["copies/label_names"])):
                    for v, where in sorted(by_sha.get(s, {0: None}).items()):
                        _put(state, failures, p, s, label, v, where)
        entries = [(p, st.sha, st.label, v, where) for p, st in state.items()
                   for v, where in sorted(st.views.items()) if where is not None]
        absorbed = max([int(f.attrs.get("seq", 0)) for f in files[1:] if "seq" in f.attrs]
                       + [int(files[0].attrs.get("absorbed_seq", 0))])
        _write_store(path, files, entries, failures, backbone, absorbed)
    finally:
        for f in files:
            f.close()


def _put(state, failures, path, sha, label, view, where) -> None:
    st = state.get(path)
    if st is None or st.sha != sha:
        st = state[path] = _PathState(sha, label, {})
    st.label = label
    st.views[view] = where
    failures.pop(path, None)


def _write_store(path: Path, files, entries, failures, backbone, absorbed: int) -> None:
    dim = int(backbone["dim"])
    classes = sorted({e[2] for e in entries if e[2]})
    class_index = {c: i for i, c in enumerate(classes)}
    n = len(entries)
    with _atomic_h5(path) as out:
        _set_backbone_attrs(out, backbone)
        out.attrs["absorbed_seq"] = absorbed
        out.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        emb = out.create_dataset("embeddings", shape=(n, dim), maxshape=(None, dim),
                                 dtype=np.float32,
                                 chunks=(max(1, min(EMBEDDING_CHUNK_ROWS, n)), dim))
        for start in range(0, n, COPY_BLOCK_ROWS):
            block = entries[start:start + COPY_BLOCK_ROWS]
            buf = np.empty((len(block), dim), np.float32)
            where = np.array([e[4] for e in block], dtype=np.int64)
            for src in np.unique(where[:, 0]):
                mask = where[:, 0] == src
                rows = where[mask, 1]
                order = np.argsort(rows, kind="stable")
                got = _read_rows(files[src]["embeddings"], rows[order])
                idx = np.flatnonzero(mask)[order]
                buf[idx] = got
            emb[start:start + len(block)] = buf
        _write_strings(out, "paths", [e[0] for e in entries])
        _write_strings(out, "sha256", [e[1] for e in entries])
        out.create_dataset("labels", data=np.array(
            [class_index[e[2]] if e[2] else -1 for e in entries], dtype=np.int32))
        out.create_dataset("views", data=np.array([e[3] for e in entries], dtype=np.int16))
        _write_strings(out, "classes", classes)
        _write_strings(out, "failures/paths", list(failures))
        _write_strings(out, "failures/sha256", [s for s, _ in failures.values()])
        _write_strings(out, "failures/reasons", [r for _, r in failures.values()])


def copy_rows(source: str | Path, destination: str | Path, rows) -> int:
    """Write a new store holding only `rows` of SOURCE (same backbone, vectors copied)."""
    source, destination = Path(source), Path(destination)
    rows = np.asarray(rows, dtype=np.int64)
    with _open_h5(source) as f:
        classes = _strings(f["classes"])
        paths, sha, labels, views = (_strings(f["paths"]), _strings(f["sha256"]),
                                     f["labels"][()], f["views"][()])
        entries = [(paths[r], sha[r], classes[labels[r]] if labels[r] >= 0 else "",
                    int(views[r]), (0, int(r))) for r in rows]
        fd = _acquire_lock(destination)
        try:
            _write_store(destination, [f], entries, {}, backbone_attrs(f), 0)
        finally:
            os.close(fd)
    return len(entries)
