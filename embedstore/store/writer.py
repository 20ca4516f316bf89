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

import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from embedstore.backbones import BackboneError
from embedstore.backbones.reference import BackboneRef, check_same_backbone
from embedstore.store import _legacy
from embedstore.store._format import (COPY_BLOCK_ROWS, StoreError, backbone_attrs, decode,
                                      fixed, open_h5, parts_dir, quarantine_dir, real_path)
from embedstore.store._index import SHA_WIDTH, Index, Shard, read_index, write_index
from embedstore.store._lock import acquire_lock, release_lock
from embedstore.store._rowindex import ROW_BITS, ROW_MASK, RowIndex
from embedstore.store._shard import Rows, write_shard
from embedstore.store.reader import gather, vectors_of

log = logging.getLogger("embedstore.store")

FOLD_ROWS = 65536  # 335 MB of 1280-d vectors: small shards are folded up to this size
NON_FINITE = "the backbone produced NaN or infinite values"


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
    skips inference. Opening a writer also finishes what a killed writer left:
    temp files are removed, format-1 parts replayed, a format-1 store upgraded.

    Committed rows are found through a RowIndex (about 32 bytes a row, see
    _rowindex); only what was added since the last commit is held in dicts.
    Lookups may come from decode threads while the main thread commits, so
    both take one lock.
    """

    def __init__(self, path: str | Path, backbone: dict):
        self.path = Path(path)
        self._real = real_path(self.path)  # locked and replaced: a symlink stays a symlink
        self.backbone = backbone
        self._real.parent.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.RLock()
        self._where: RowIndex | None = None
        self._lock_fd: int | None = acquire_lock(self._real)
        try:
            self._parts = parts_dir(self._real)
            self._remove_temp_files()
            self._check_backbone()
            self.changed = False  # whether opening had to finish or upgrade anything
            self._load()
            self.pending = PendingRows()
            self._finish_format1()
            self._remove_orphan_shards()
        except BaseException:
            self.release()
            raise

    # context manager -----------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None or exc_type is KeyboardInterrupt:
                self.commit()  # keep finished work even on Ctrl-C
        finally:
            self.release()
        return False

    def release(self) -> None:
        if self._where is not None:
            self._where.close()
        if self._lock_fd is not None:
            release_lock(self._lock_fd, self._real)
            self._lock_fd = None

    # opening -------------------------------------------------------------------------
    def _remove_temp_files(self) -> None:
        """Temp files of this store are orphans of a killed writer: we hold the lock."""
        orphans = list(self._real.parent.glob(f".{self._real.name}.tmp-*"))
        if self._parts.is_dir():
            orphans += self._parts.glob(".*.tmp-*")
        for p in orphans:
            p.unlink(missing_ok=True)

    def _check_backbone(self) -> None:
        candidates = [self._real] if self._real.exists() else _legacy.part_files(self._parts)[:1]
        for p in candidates:
            try:
                with open_h5(p) as f:
                    theirs = backbone_attrs(f)
            except StoreError:
                if p == self._real:
                    raise
                continue  # an unreadable part is quarantined later
            try:
                check_same_backbone(BackboneRef.from_dict(theirs, p),
                                    BackboneRef.from_dict(self.backbone, "the writer"),
                                    str(self.path), "this extraction",
                                    advice=f"write to another store file, or extract with "
                                           f"--backbone {theirs['name']}")
            except BackboneError as exc:
                raise StoreError(str(exc)) from None

    def _load(self) -> None:
        """Read the committed state: the index, and the lookup keys of every live row."""
        self.index = Index(self._parts.name, [], [], {}, 0, 1)
        self._format1 = False
        if self._real.exists():
            with open_h5(self._real) as f:
                if int(f.attrs.get("format_version", 1)) == 1:
                    self._format1 = True
                    self.index.absorbed_seq = int(f.attrs.get("absorbed_seq", 0))
                else:
                    self.index = read_index(f)
        self._shard_dir = self._real.parent / self.index.parts_name
        self._class_index = {c: i for i, c in enumerate(self.index.classes)}
        self.failed: dict[str, str] = {p: s for p, (s, _) in self.index.failures.items()}
        self._added: dict[str, str | None] = {}  # path -> sha since the last commit; None: gone
        self._added_sha: dict[str, list[str]] = {}  # sha -> paths added since the last commit
        if self._where is not None:
            self._where.close()
        self._where = RowIndex(self._shard_dir)
        bad = self._where.load(self.index.shards, int(self.backbone["dim"]))
        if bad:
            for shard, exc in bad:
                self._quarantine(self._shard_dir / shard.name, exc)
                self.index.shards.remove(shard)
            write_index(self._real, self.backbone, self.index)
            self._load()  # the quarantined rows are gone: rebuild the lookups without them

    def _quarantine(self, file: Path, why) -> None:
        """Move an unusable shard or part aside and say so in one line; the run goes on."""
        target_dir = quarantine_dir(self._real)
        if file.exists():
            target_dir.mkdir(exist_ok=True)
            shutil.move(str(file), target_dir / file.name)
            where = f"moved to {target_dir}/"
        else:
            where = "missing"
        log.warning(f"embedstore: warning: {file} cannot be used ({why}); {where}, left out of "
                    f"{self.path} (its images are re-embedded by the next extract)")

    def _finish_format1(self) -> None:
        """Upgrade a format-1 store and replay format-1 parts a killed writer left."""
        if self._format1:
            _legacy.import_store(self._real, self)
        for part in _legacy.part_files(self._parts):
            seq = _legacy.part_seq(part)
            if seq is None:
                self._quarantine(part, "not a part-<number>.h5 name")
                continue
            if seq <= self.index.absorbed_seq:
                part.unlink()  # replayed before a crash
                continue
            try:
                _legacy.replay_part(part, self)
            except (OSError, KeyError, ValueError) as exc:
                self.pending = PendingRows()
                self._quarantine(part, exc)
                continue
            self.index.absorbed_seq = seq
            self._commit(force_index=True)
            part.unlink()
            self.changed = True
        if self._format1:
            self._commit(force_index=True)  # the store file becomes a format-2 index
            self._format1 = False
            self.changed = True

    def _remove_orphan_shards(self) -> None:
        """Shard files no index names: written by a writer killed before its commit point."""
        if not self._shard_dir.is_dir():
            return
        named = {s.name for s in self.index.shards}
        for p in self._shard_dir.glob("shard-*.h5"):
            if p.name not in named:
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

    @property
    def path_sha(self) -> "_Lookup":
        """path -> sha, as a read-only mapping with `get` and `in` (extract's interface)."""
        return _Lookup(self.sha_of)

    @property
    def sha_paths(self) -> "_Lookup":
        """sha -> the paths of paths_of(sha), with `get` and `in`."""
        return _Lookup(lambda sha: self.paths_of(sha) or None)

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
        write_index(self._real, self.backbone, self.index)
        for shard in dropped:
            (self._shard_dir / shard.name).unlink(missing_ok=True)

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

    def _place(self, batch: "_Batch", path: str, sha: str, label: str, view: int,
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

    def _sources_of(self, batch: "_Batch", sha: str) -> dict:
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

    def _write_batch(self, batch: "_Batch", vectors: np.ndarray | None) -> None:
        rows = batch.kept()
        emb = np.empty((len(rows), int(self.backbone["dim"])), np.float32)
        new = [(j, src[1]) for j, (*_, src) in enumerate(rows) if src[0] == "new"]
        if new:
            at, i = zip(*new)
            emb[list(at)] = vectors[list(i)]
        copied = [(j, src[1]) for j, (*_, src) in enumerate(rows) if src[0] == "loc"]
        if copied:
            at, locs = zip(*copied)
            emb[list(at)] = self._read_locs(np.array(locs, np.int64))
        block = Rows(emb, fixed([r[0] for r in rows]), fixed([r[1] for r in rows], SHA_WIDTH),
                     np.array([r[2] for r in rows], np.int32),
                     np.array([r[3] for r in rows], np.int16))
        self._add_shard([block], len(block), block.paths.dtype.itemsize)

    def _add_shard(self, blocks, n_rows: int, path_width: int) -> Shard:
        """Write a shard of `blocks` and index its rows (found from now on)."""
        self._shard_dir.mkdir(exist_ok=True)
        shard = write_shard(self._shard_dir, self._next_seq(), self.backbone, blocks, n_rows,
                            path_width)
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
            with h5py.File(self._shard_dir / self._where.shards[int(seq)].name, "r") as f:
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
            with h5py.File(self._shard_dir / s.name, "r") as f:
                cols = {c: f[c][()][live] for c in ("paths", "sha256", "labels", "views")}
                vectors = vectors_of(f)
                for a in range(0, len(live), COPY_BLOCK_ROWS):
                    take = slice(a, a + COPY_BLOCK_ROWS)
                    yield Rows(gather(vectors, live[take]), cols["paths"][take],
                               cols["sha256"][take], cols["labels"][take], cols["views"][take])

    def compact(self, target_rows: int) -> dict:
        """Fold every shard smaller than `target_rows` or more than a quarter tombstoned."""
        with self._mutex:
            self.commit()
            before = len(self.index.shards)
            dropped = self._drop_empty_shards() + self._fold(target_rows, 0.25, always=True)
            if dropped:
                self._publish(dropped)
        return {"shards_before": before, "shards_after": len(self.index.shards),
                "rows_rewritten": sum(s.n_live for s in dropped)}


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


class _Lookup:
    """A read-only mapping over a lookup function (None: absent): `get` and `in`."""

    def __init__(self, find):
        self._find = find

    def get(self, key: str, default=None):
        found = self._find(key)
        return default if found is None else found

    def __contains__(self, key: str) -> bool:
        return self._find(key) is not None
