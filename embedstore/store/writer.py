"""The single writer of a store: commit shards, tombstone replaced rows, fold small shards.

A commit writes the new rows as one shard file (temp + fsync + rename) and
then replaces the index: the index rename is the commit point, so a crash
or kill -9 at any moment leaves the last committed index and every shard it
names intact. Shards are never modified. A row that is replaced (changed
content at a path), removed (`--prune`, renames) or superseded by a failure
is only tombstoned in the index: no shard is rewritten for it. Small shards
(fewer than FOLD_ROWS live rows, which includes shards mostly tombstoned)
are folded into one new shard once they add up to FOLD_ROWS rows, so the
number of files stays about N / FOLD_ROWS and each row is rewritten about
once by folding; big, untouched shards are never rewritten.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from embedstore.backbones import BackboneError
from embedstore.backbones.reference import BackboneRef, check_same_backbone
from embedstore.store import _legacy
from embedstore.store._format import (
    COPY_BLOCK_ROWS,
    StoreError,
    backbone_attrs,
    decode,
    fixed,
    fsync_path,
    open_h5,
)
from embedstore.store._index import COLUMNS, SHA_WIDTH, Index, Shard, read_index, write_index
from embedstore.store._layout import (
    INDEX,
    OWN_ENTRIES,
    SHARD_NAME,
    Layout,
    check_inside,
    check_self_contained,
    is_regular_file,
    store_root,
)
from embedstore.store._lock import acquire_lock, names_inode, release_lock
from embedstore.store._rowindex import ROW_BITS, ROW_MASK, RowIndex
from embedstore.store._shard import ShardRows, file_sha256, write_shard
from embedstore.store.backends import CompactResult
from embedstore.store.reader import gather, vectors_of

log = logging.getLogger("embedstore.store")

FOLD_ROWS = 65536  # 335 MB of 1280-d vectors: small shards are folded up to this size
NON_FINITE = "the backbone produced NaN or infinite values"
CHANGED = "its checksum does not match the index (the file changed after it was written)"
_TEMP_NAME = re.compile(rf"\.({re.escape(INDEX)}|shard-\d{{9}}\.h5)\.tmp-\d+")


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
    """The single writer of a store: commit shards, fold them, release the lock.

    Use as a context manager. `known(sha)` answers whether content is already
    embedded (in the store or added to this writer), which is how a re-run
    skips inference. Opening a writer also finishes what a killed writer left
    (temp files, uncommitted shards) and upgrades a format-1/2 store file into
    a store directory (see upgrade_legacy).

    Committed rows are found through a RowIndex (about 32 bytes a row, see
    _rowindex); only what was added since the last commit is held in dicts.
    Lookups may come from decode threads while the main thread commits, so
    both take one lock.
    """

    def __init__(self, path: str | Path, backbone: dict):
        self.path = Path(path)
        self.backbone = backbone
        self._mutex = threading.RLock()
        self._where = RowIndex(Path("."))  # replaced by _load once the store is locked
        self._lock_fd: int | None = None
        self._verified: set[int] = set()  # shards whose checksum this writer has checked
        root = store_root(self.path)  # a symlinked store stays a symlink
        self.changed = upgrade_legacy(root, backbone, self.path)  # whether opening changed it
        self.layout = Layout(root)
        _prepare_directory(root, self.path)
        self._lock_fd = acquire_lock(self.layout.lock, self.path)
        try:
            for name, what in ((self.layout.parts, "parts folder"),
                               (self.layout.quarantine, "quarantine folder")):
                check_inside(name, root, what)
            self._remove_temp_files()
            self._check_backbone()
            self._load()
            self.pending = PendingRows()
            self._remove_orphan_shards()
        except BaseException:
            self.release()
            raise

    # context manager -----------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None or exc_type is KeyboardInterrupt:
                self.commit()  # keep finished work even on Ctrl-C
        finally:
            self.release()

    def release(self) -> None:
        self._where.close()
        if self._lock_fd is not None:
            release_lock(self._lock_fd, self.layout.lock)
            self._lock_fd = None

    # opening -------------------------------------------------------------------------
    def _remove_temp_files(self) -> None:
        """Temp files of this store are orphans of a killed writer: we hold the lock. Only
        names this writer makes are touched."""
        for folder in (self.layout.root, self.layout.parts):
            if folder.is_dir():
                for p in folder.iterdir():
                    if _TEMP_NAME.fullmatch(p.name) and is_regular_file(p):
                        p.unlink(missing_ok=True)

    def _check_backbone(self) -> None:
        if self.layout.index.is_file():
            with open_h5(self.layout.index) as f:
                _check_same_backbone(backbone_attrs(f, self.layout.root), self.backbone,
                                     self.layout.index, self.path)

    def _load(self) -> None:
        """Read the committed state: the index, and the lookup keys of every live row."""
        self.index = Index([], [], {}, 1)
        if self.layout.index.is_file():
            with open_h5(self.layout.index) as f:
                check_self_contained(f, self.layout.index, virtual_ok=COLUMNS)
                self.index = read_index(f)
        self._index_rows()

    def _index_rows(self) -> None:
        """Build the lookups over self.index's shards; unusable shards are quarantined."""
        self._class_index = {c: i for i, c in enumerate(self.index.classes)}
        self.failed: dict[str, str] = {p: s for p, (s, _) in self.index.failures.items()}
        self._added: dict[str, str | None] = {}  # path -> sha since the last commit; None: gone
        self._added_sha: dict[str, list[str]] = {}  # sha -> paths added since the last commit
        self._where.close()
        self._where = RowIndex(self.layout.parts)
        bad = self._where.load(self.index.shards, int(self.backbone["dim"]))
        if bad:
            for shard, exc in bad:
                self._quarantine(self.layout.shard(shard.name), exc)
                self.index.shards.remove(shard)
            write_index(self.layout.index, self.backbone, self.index)
            self._load()  # the quarantined rows are gone: rebuild the lookups without them

    def _quarantine(self, file: Path, why) -> None:
        """Move an unusable shard or part aside, inside the store, and say so in one line;
        the run goes on."""
        target_dir = self.layout.quarantine
        if os.path.lexists(file):
            target_dir.mkdir(exist_ok=True)
            shutil.move(str(file), target_dir / file.name)
            where = f"moved to {target_dir}/"
        else:
            where = "missing"
        log.warning(f"embedstore: warning: {file} cannot be used ({why}); {where}, left out of "
                    f"{self.path} (its images are re-embedded by the next extract)")

    def _adopt(self, legacy: Layout) -> None:
        """Take every row of a format-1/2 store into this new, empty store directory:
        format-2 shards are hard-linked (copied where links are refused), format-1 rows
        copied into shards, and parts a killed format-1 writer left replayed."""
        absorbed = 0
        if legacy.index.is_file():
            with open_h5(legacy.index) as f:
                check_self_contained(f, legacy.index, virtual_ok=COLUMNS)
                version = int(f.attrs.get("format_version", 1))
                absorbed = int(f.attrs.get("absorbed_seq", 0))
                old = read_index(f) if version == 2 else None
            if old is not None:
                self.layout.parts.mkdir(exist_ok=True)
                for shard in old.shards:
                    source = legacy.shard(shard.name)  # the name is checked first
                    if is_regular_file(source):
                        _link_or_copy(source, self.layout.shard(shard.name))
                self.index = old
                self._index_rows()  # a shard missing or unreadable is quarantined here
            else:
                _legacy.import_store(legacy.index, self)
        for part in _legacy.part_files(legacy.parts):
            seq = _legacy.part_seq(part)
            if seq is None or seq <= absorbed:
                continue  # an odd name, or replayed before a crash: left with the old files
            try:
                _legacy.replay_part(part, self)
            except (OSError, KeyError, ValueError) as exc:
                self.pending = PendingRows()
                self._quarantine(part, exc)
                continue
            self._commit(force_index=True)
        self._commit(force_index=True)

    def _remove_orphan_shards(self) -> None:
        """Shard files no index names: written by a writer killed before its commit point."""
        if not self.layout.parts.is_dir():
            return
        named = {s.name for s in self.index.shards}
        for p in self.layout.parts.iterdir():
            if SHARD_NAME.fullmatch(p.name) and p.name not in named:
                p.unlink()

    # what is known -------------------------------------------------------------------
    def known(self, sha: str) -> bool:
        """Whether content `sha` is embedded: committed, or added since the last commit."""
        with self._mutex:
            return sha in self._added_sha or bool(self._where.rows_of_sha(sha))

    def failed_before(self, path: str, sha: str) -> bool:
        return self.failed.get(path) == sha

    def sha_of(self, path: str) -> str | None:
        """The content hash `path` has rows for now (counting what is not committed yet)."""
        with self._mutex:
            if path in self._added:
                return self._added[path]
            rows = self._where.rows_of_path(path)
            return self._where.sha_at(rows[0]) if rows else None

    def paths_of(self, sha: str) -> list[str]:
        """Paths that hold or were given content `sha` (some may since have changed)."""
        with self._mutex:
            paths = dict.fromkeys(self._added_sha.get(sha, []))
            paths.update(dict.fromkeys(self._where.path_at(at)
                                       for at in self._where.rows_of_sha(sha)))
            return list(paths)

    def paths(self) -> set[str]:
        """Every path the store has rows or a failure for (built on demand, e.g. for --prune)."""
        with self._mutex:
            paths = {p for column in self._where.live_column("paths") for p in decode(column)}
            for path, sha in self._added.items():
                (paths.add if sha is not None else paths.discard)(path)
            return paths | set(self.failed)

    def known_digests(self) -> np.ndarray:
        """Every known content hash, sorted and unique, as S64 (a compact shared lookup)."""
        with self._mutex:
            parts = list(self._where.live_column("sha256"))
            parts.append(np.array(list(self._added_sha), dtype="S64"))
            return np.unique(np.concatenate(parts).astype("S64"))

    def has_row(self, path: str, sha: str, view: int = 0) -> bool:
        """Whether a committed row holds this path, content and view."""
        with self._mutex:
            return any(self._where.sha_at(at) == sha and self._where.view_at(at) == view
                       for at in self._where.rows_of_path(path))

    # adding --------------------------------------------------------------------------
    def add(self, embeddings: np.ndarray, paths, sha256, labels, views=None) -> None:
        """Rows to commit. Vectors with NaN or inf are recorded as failures instead."""
        n = len(paths)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (n, self.backbone["dim"]):
            raise StoreError(f"expected {n} x {self.backbone['dim']} embeddings, "
                             f"got {embeddings.shape}")
        views = list(views if views is not None else [0] * n)
        finite = np.isfinite(embeddings).all(axis=1)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                self.add_failure(paths[i], sha256[i], NON_FINITE)
            keep = np.flatnonzero(finite)
            embeddings, paths, sha256, labels, views = (
                embeddings[keep], [paths[i] for i in keep], [sha256[i] for i in keep],
                [labels[i] for i in keep], [views[i] for i in keep])
        with self._mutex:
            self.pending.embeddings.append(embeddings)
            self.pending.paths += list(paths)
            self.pending.sha256 += list(sha256)
            self.pending.labels += [lab or "" for lab in labels]
            self.pending.views += views
            for p, s in zip(paths, sha256):
                self._note(p, s)

    def add_copy(self, path: str, sha: str, label: str | None) -> None:
        """`path` holds content already embedded elsewhere: reuse, do not re-run."""
        with self._mutex:
            self.pending.copies.append((path, sha, label or ""))
            self._note(path, sha)

    def add_failure(self, path: str, sha: str | None, reason: str) -> None:
        """`path` could not be embedded; its committed rows go (rows added since stay:
        a commit applies failures before new rows)."""
        with self._mutex:
            self.pending.failures.append((path, sha or "", reason))
            self.failed[path] = sha or ""
            if self._added.get(path) is None:
                self._added[path] = None

    def remove(self, path: str) -> None:
        """Forget `path`: its rows and any failure recorded for it."""
        with self._mutex:
            self.pending.removed.append(path)
            self._added[path] = None
            self.failed.pop(path, None)

    def _note(self, path: str, sha: str) -> None:
        self._added[path] = sha
        self._added_sha.setdefault(sha, []).append(path)
        self.failed.pop(path, None)

    # committing ----------------------------------------------------------------------
    def commit(self) -> None:
        """Write what is pending as one shard and a new index; it survives any crash from now on."""
        with self._mutex:
            if len(self.pending):
                self._commit()

    def _commit(self, force_index: bool = False) -> None:
        try:
            changed = self._apply_pending()
            if changed or force_index:
                dropped = self._drop_empty_shards() + self._fold(FOLD_ROWS)
                self._publish(dropped)
        except BaseException:
            pending, added, added_sha = self.pending, self._added, self._added_sha
            self._load()  # back to what is on disk; the batch stays pending
            self.pending, self._added, self._added_sha = pending, added, added_sha
            raise
        self.pending = PendingRows()
        self._added, self._added_sha = {}, {}  # the new shard's rows are indexed now

    def _publish(self, dropped: list[Shard]) -> None:
        """The commit point: replace the index, then delete the shards it no longer names."""
        write_index(self.layout.index, self.backbone, self.index)
        for shard in dropped:
            self.layout.shard(shard.name).unlink(missing_ok=True)

    def _apply_pending(self) -> bool:
        """Turn pending work into tombstones, failures and one new shard (not yet published)."""
        p, batch = self.pending, _Batch()
        if not len(p):
            return False
        self._tombstoned: dict[str, dict[int, int]] = {}  # sha -> {view: location} dropped now
        # one vectorised pass finds the few new paths that may replace committed rows
        self._maybe_committed = self._where.may_have_paths(
            list(dict.fromkeys(p.paths + [path for path, _, _ in p.copies])))
        for path in p.removed:
            self._tombstone(path)
            self.index.failures.pop(path, None)
        for path, sha, reason in p.failures:
            self._tombstone(path)
            batch.drop(path)
            self.index.failures[path] = (sha, reason)
        vectors = np.concatenate(p.embeddings) if p.embeddings else None
        for i, (path, sha, label, view) in enumerate(zip(p.paths, p.sha256, p.labels, p.views)):
            self._place(batch, path, sha, label, int(view), ("new", i))
        for path, sha, label in p.copies:
            for view, source in sorted(self._sources_of(batch, sha).items()):
                self._place(batch, path, sha, label, view, source)
        if batch.n_kept:
            self._write_batch(batch, vectors)
        return True

    def _tombstone(self, path: str, view: int | None = None) -> None:
        """Drop the committed rows of `path` (of one view, if given) from the live set."""
        where = self._where
        for at in where.rows_of_path(path):
            v = where.view_at(at)
            if view is None or v == view:
                # the shard stays until the commit point: a rename's copy can still read it
                self._tombstoned.setdefault(where.sha_at(at), {})[v] = at
                where.shards[at >> ROW_BITS].dead.add(at & ROW_MASK)

    def _place(self, batch: _Batch, path: str, sha: str, label: str, view: int,
               source) -> None:
        """One new row; it replaces the path's rows of other content, or of the same view."""
        rows = self._where.rows_of_path(path) if path in self._maybe_committed else []
        if rows:
            if self._where.sha_at(rows[0]) != sha:
                self._tombstone(path)
            elif view in {self._where.view_at(at) for at in rows}:
                self._tombstone(path, view)
        batch.put(path, sha, self._class_of(label), view, source)
        self.index.failures.pop(path, None)

    def _sources_of(self, batch: _Batch, sha: str) -> dict:
        """Where the vectors of content `sha` are, per view: this batch, or a committed row."""
        found = dict(batch.by_sha.get(sha, {}))
        for at in self._where.rows_of_sha(sha):
            found.setdefault(self._where.view_at(at), ("loc", at))
        for v, at in self._tombstoned.get(sha, {}).items():
            found.setdefault(v, ("loc", at))
        return found

    def _class_of(self, label: str) -> int:
        if not label:
            return -1
        if label not in self._class_index:
            self._class_index[label] = len(self.index.classes)
            self.index.classes.append(label)
        return self._class_index[label]

    def _next_seq(self) -> int:
        seq = self.index.next_seq
        self.index.next_seq += 1
        return seq

    def _write_batch(self, batch: _Batch, vectors: np.ndarray | None) -> None:
        rows = batch.kept()
        emb = np.empty((len(rows), int(self.backbone["dim"])), np.float32)
        new = [(j, src[1]) for j, (*_, src) in enumerate(rows) if src[0] == "new"]
        if new:
            assert vectors is not None  # new rows come with their vectors
            at, i = zip(*new)
            emb[list(at)] = vectors[list(i)]
        copied = [(j, src[1]) for j, (*_, src) in enumerate(rows) if src[0] == "loc"]
        if copied:
            at, locs = zip(*copied)
            emb[list(at)] = self._read_locs(np.array(locs, np.int64))
        block = ShardRows(emb, fixed([r[0] for r in rows]), fixed([r[1] for r in rows], SHA_WIDTH),
                     np.array([r[2] for r in rows], np.int32),
                     np.array([r[3] for r in rows], np.int16))
        self._add_shard([block], len(block), block.paths.dtype.itemsize)

    def _add_shard(self, blocks, n_rows: int, path_width: int) -> Shard:
        """Write a shard of `blocks` and index its rows (found from now on)."""
        self.layout.parts.mkdir(exist_ok=True)
        shard = write_shard(self.layout.parts, self._next_seq(), self.backbone, blocks, n_rows,
                            path_width)
        self._verified.add(shard.seq)
        self.index.shards.append(shard)
        self._where.add(shard, int(self.backbone["dim"]))
        return shard

    def _read_locs(self, locs: np.ndarray) -> np.ndarray:
        """Vectors of committed rows, in the order of `locs`."""
        out = np.empty((len(locs), int(self.backbone["dim"])), np.float32)
        seqs = locs >> ROW_BITS
        for seq in np.unique(seqs):
            at = np.flatnonzero(seqs == seq)
            rows = locs[at] & ROW_MASK
            order = np.argsort(rows)
            shard = self._where.shards[int(seq)]
            if not self._checksum_ok(shard):
                raise StoreError(f"{self.layout.shard(shard.name)}: {CHANGED}, so its vectors are "
                                 f"not copied; run `embedstore compact {self.path}` to move it "
                                 "aside (its images are then embedded again), and re-run")
            with h5py.File(self.layout.shard(shard.name), "r") as f:
                out[at[order]] = gather(vectors_of(f), rows[order])
        return out

    # folding -------------------------------------------------------------------------
    def _drop_empty_shards(self) -> list[Shard]:
        empty = [s for s in self.index.shards if s.n_live == 0]
        self.index.shards = [s for s in self.index.shards if s.n_live > 0]
        self._where.retire(empty)
        return empty

    def _fold(self, target_rows: int, dead_fraction: float = 1.0, always: bool = False
              ) -> list[Shard]:
        """Rewrite small shards (and ones more than `dead_fraction` dead) into shards of
        about `target_rows` live rows. Unless `always`, only once the small ones add up to
        `target_rows`, so that a fold is always worth its cost. Returns the replaced shards."""
        group = [s for s in self.index.shards
                 if s.n_live < target_rows or len(s.dead) > dead_fraction * s.rows]
        total = sum(s.n_live for s in group)
        if group and (always or total >= target_rows):
            # never fold a changed file into a new shard with a fresh checksum
            self._drop_corrupt(group)
            group = [s for s in group if s in self.index.shards]
            total = sum(s.n_live for s in group)
        if not group or (not always and total < target_rows) or (
                len(group) == 1 and not group[0].dead and always):
            return []
        out_groups, current, rows = [], [], 0
        for s in group:
            current.append(s)
            rows += s.n_live
            if rows >= target_rows:
                out_groups.append(current)
                current, rows = [], 0
        if current:
            out_groups.append(current)
        for shards in out_groups:
            self._add_shard(self._live_blocks(shards), sum(s.n_live for s in shards),
                            max(s.path_width for s in shards))
        replaced = {s.seq for s in group}
        self.index.shards = [s for s in self.index.shards if s.seq not in replaced]
        self._where.retire(group)
        return group

    def _live_blocks(self, shards: list[Shard]):
        for s in shards:
            live = s.live()
            with h5py.File(self.layout.shard(s.name), "r") as f:
                cols = {c: f[c][()][live] for c in ("paths", "sha256", "labels", "views")}
                vectors = vectors_of(f)
                for a in range(0, len(live), COPY_BLOCK_ROWS):
                    take = slice(a, a + COPY_BLOCK_ROWS)
                    yield ShardRows(gather(vectors, live[take]), cols["paths"][take],
                               cols["sha256"][take], cols["labels"][take], cols["views"][take])

    def _checksum_ok(self, shard: Shard) -> bool:
        """Whether a shard file still has the sha256 the index recorded (checked once)."""
        if shard.seq not in self._verified:
            if file_sha256(self.layout.shard(shard.name)) != shard.sha256:
                return False
            self._verified.add(shard.seq)
        return True

    def _drop_corrupt(self, shards: list[Shard]) -> list[Shard]:
        """Quarantine the shards whose file changed on disk; their rows leave the store
        (the next extract embeds those images again)."""
        bad = [s for s in shards if not self._checksum_ok(s)]
        for shard in bad:
            self._quarantine(self.layout.shard(shard.name), CHANGED)
        if bad:
            self.index.shards = [s for s in self.index.shards if s not in bad]
            self._where.retire(bad)
        return bad

    def compact(self, target_rows: int) -> CompactResult:
        """Check every shard's checksum (a changed one is quarantined), then fold every
        shard smaller than `target_rows` or more than a quarter tombstoned."""
        with self._mutex:
            self.commit()
            before = len(self.index.shards)
            corrupt = self._drop_corrupt(list(self.index.shards))
            dropped = self._drop_empty_shards() + self._fold(target_rows, 0.25, always=True)
            if corrupt and not dropped:
                self._publish([])
            if dropped:
                self._publish(dropped)
        return CompactResult(shards_before=before, shards_after=len(self.index.shards),
                             rows_rewritten=sum(s.n_live for s in dropped),
                             quarantined=[s.name for s in corrupt])


class _Batch:
    """The rows one commit adds, with later rows for a path superseding earlier ones."""

    def __init__(self):
        self.rows: list = []  # (path, sha, label index, view, source)
        self.kept_flags: list[bool] = []
        self.by_path: dict[str, tuple[str, dict[int, int]]] = {}
        self.by_sha: dict[str, dict[int, tuple]] = {}

    def put(self, path: str, sha: str, label: int, view: int, source) -> None:
        entry = self.by_path.get(path)
        if entry is not None and (entry[0] != sha or view in entry[1]):
            if entry[0] != sha:
                self.drop(path)
                entry = None
            else:
                self.kept_flags[entry[1].pop(view)] = False
        if entry is None:
            entry = self.by_path[path] = (sha, {})
        entry[1][view] = len(self.rows)
        self.rows.append((path, sha, label, view, source))
        self.kept_flags.append(True)
        self.by_sha.setdefault(sha, {}).setdefault(view, source)

    def drop(self, path: str) -> None:
        entry = self.by_path.pop(path, None)
        for j in (entry[1].values() if entry else []):
            self.kept_flags[j] = False

    @property
    def n_kept(self) -> int:
        return sum(self.kept_flags)

    def kept(self) -> list:
        return [r for r, keep in zip(self.rows, self.kept_flags) if keep]


# --- the store directory, and upgrading format-1/2 files into one ------------------------

def _check_same_backbone(theirs: dict, backbone: dict, where: Path, store: Path) -> None:
    try:
        check_same_backbone(BackboneRef.from_dict(theirs, where),
                            BackboneRef.from_dict(backbone, "the writer"), str(store),
                            "this extraction", advice=f"write to another store, or extract "
                                                      f"with --backbone {theirs['name']}")
    except BackboneError as exc:
        raise StoreError(str(exc)) from None


def _prepare_directory(root: Path, shown: Path) -> None:
    """Make the store directory, or check that an existing folder is a store (or empty)."""
    if not root.exists():
        root.mkdir(parents=True, exist_ok=True)
        return
    if not root.is_dir():
        raise StoreError(f"{shown} is not a folder; give a new path for the store")
    if (root / INDEX).exists():
        return
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in OWN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise StoreError(f"{shown} is a folder that is not an embedstore store (it holds "
                         f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                         "give a new path for the store")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def upgrade_legacy(root: Path, backbone: dict, shown: Path) -> bool:
    """Turn a format-1/2 store at ROOT (a file, with ROOT.parts/ beside it) into a store
    directory at the same path; True if it did. The directory is built beside it (shards
    hard-linked), then swapped in with one atomic rename, under an flock on the old file:
    two writers through two hard links of it cannot both upgrade it. Only the old store's
    own files are removed afterwards."""
    if not root.is_file():
        _finish_interrupted_upgrade(root)  # no upgrade can be running: nothing to flock
    legacy = Layout(root, legacy=True)
    parts_only = not root.exists() and bool(_legacy.part_files(legacy.parts))
    if not root.is_file() and not parts_only:
        return False
    fd = _lock_file(root, shown) if not parts_only else None
    try:
        if fd is not None:
            if not names_inode(root, fd):
                return False  # another writer upgraded it while we waited
            _finish_interrupted_upgrade(root)  # under the flock: leftovers of killed runs
        theirs = _legacy_backbone(legacy)
        if theirs is None:
            return False
        if _format_version(legacy.index) > 2:
            raise StoreError(f"{shown} is a store's index file, not a store; give the store's "
                             "folder instead")
        _check_same_backbone(theirs, backbone, legacy.index, shown)
        building = root.with_name(f".{root.name}.upgrade-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        with StoreWriter(building, theirs) as writer:
            writer._adopt(legacy)
        old = _swap_in(building, root)
        if old is not None:
            old.unlink(missing_ok=True)
        for part in (legacy.parts.iterdir() if legacy.parts.is_dir() else []):
            if (SHARD_NAME.fullmatch(part.name) or _legacy.part_seq(part) is not None) \
                    and is_regular_file(part):
                part.unlink()
        try:
            legacy.parts.rmdir()  # only when nothing but our own files was in it
        except OSError:
            pass
        log.info(f"embedstore: upgraded {shown} to a store folder (format 3)")
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _lock_file(path: Path, shown: Path) -> int:
    """An exclusive lock on the file itself (every hard link of it shares it). An OFD
    record lock: HDF5 takes flock()s on the files it opens, which these do not meet."""
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:
        raise StoreError(f"{shown} is read-only here; it must be upgraded to a store folder "
                         "before anything is added to it: give write access") from None
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37),
                    struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        os.close(fd)
        raise StoreError(f"{shown} is being upgraded by another process; wait for it to "
                         "finish") from None
    return fd


def _legacy_backbone(legacy: Layout) -> dict | None:
    for candidate in [legacy.index] + _legacy.part_files(legacy.parts)[:1]:
        if candidate.is_file():
            with open_h5(candidate) as f:
                return backbone_attrs(f)
    return None


def _format_version(index: Path) -> int:
    if not index.is_file():
        return 1
    with open_h5(index) as f:
        return int(f.attrs.get("format_version", 1))


_RENAME_EXCHANGE = 2


def _swap_in(new: Path, root: Path) -> Path | None:
    """Put directory NEW at ROOT in one atomic step; returns where the old ROOT now is."""
    if not root.exists():
        os.rename(new, root)
        fsync_path(root.parent, directory=True)
        return None
    try:
        _renameat2(new, root, _RENAME_EXCHANGE)
        old = new
    except OSError:  # no renameat2 here: two renames, finished by the next writer on a crash
        old = root.with_name(f".{root.name}.legacy-{os.getpid()}")
        os.rename(root, old)
        os.rename(new, root)
    fsync_path(root.parent, directory=True)
    return old


def _renameat2(a: Path, b: Path, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError("renameat2 is not available")
    at_cwd = -100
    if function(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), flags) != 0:
        errno_ = ctypes.get_errno()
        raise OSError(errno_, os.strerror(errno_))


def _finish_interrupted_upgrade(root: Path) -> None:
    """An upgrade killed between its two fallback renames left ROOT missing, the old file
    at `.NAME.legacy-PID` and the finished directory at `.NAME.upgrade-PID`: put the
    directory in place. Other leftovers of killed upgrades are removed. Called only where
    no other upgrade of ROOT can be running."""
    leftovers = [p for p in root.parent.glob(f".{glob.escape(root.name)}.*")
                 if re.fullmatch(rf"\.{re.escape(root.name)}\.(upgrade|legacy)-\d+", p.name)]
    if not leftovers:
        return
    old_files = [p for p in leftovers if ".legacy-" in p.name]
    built = [p for p in leftovers if ".upgrade-" in p.name and (p / INDEX).is_file()]
    if not root.exists() and old_files and built:
        os.rename(built[0], root)
        leftovers.remove(built[0])
    if root.exists():
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
