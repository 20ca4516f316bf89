"""Operations over whole stores: finish, compact, merge, copy, verify."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedstore.store import _legacy
from embedstore.store._format import COPY_BLOCK_ROWS, StoreError, backbone_attrs, open_h5
from embedstore.store._index import COLUMNS, read_index
from embedstore.store._layout import (
    PARTS,
    check_self_contained,
    is_regular_file,
    layout,
    store_root,
)
from embedstore.store._shard import file_sha256
from embedstore.store.backends import (
    CompactResult,
    MergeResult,
    Reader,
    VerifyResult,
    Writer,
    open_store,
    open_writer,
)
from embedstore.store.writer import CHANGED

log = logging.getLogger("embedstore.store")

COMPACT_ROWS = 1 << 20  # 5.4 GB shards of 1280-d vectors: few files even at 10^8 rows
MERGE_COMMIT_ROWS = 65536


def stored_backbone(path: str | Path) -> dict | None:
    """The backbone recorded in STORE, or in a format-1 part beside it; None if neither."""
    where = layout(path)
    for candidate in [where.index] + _legacy.part_files(where.parts):
        if not candidate.is_file():
            continue
        try:
            with open_h5(candidate) as f:
                return backbone_attrs(f, where.root)
        except StoreError:
            if candidate == where.index:
                raise
    return None


def merge(path: str | Path) -> bool:
    """Finish STORE: upgrade a format-1/2 store to a folder (replaying parts a killed
    format-1 writer left), clean temp files. True if anything changed."""
    backbone = stored_backbone(path)
    if backbone is None:
        return False
    with open_writer(path, backbone) as w:
        return w.changed


def compact(path: str | Path, target_rows: int = COMPACT_ROWS) -> CompactResult:
    """Check every shard's checksum (quarantining a changed one), then fold small and
    mostly-tombstoned shards of STORE into shards of ~target_rows rows."""
    backbone = stored_backbone(path)
    if backbone is None:
        raise StoreError(f"store {path} does not exist; create it with `embedstore extract`")
    with open_writer(path, backbone) as w:
        return w.compact(target_rows)


def merge_stores(sources, out: str | Path) -> MergeResult:
    """Combine stores of one backbone into OUT (created or added to).

    A row (path, content, view) is kept once; for a path with different content
    in two sources the later source wins; classes are matched by name; a failure
    is kept only for a path no source has rows for.
    """
    out_real = store_root(out)
    sources = [Path(s) for s in sources]
    readers = [open_store(s) for s in sources if store_root(s) != out_real]
    try:
        fingerprints = {r.backbone["fingerprint"]: r.path for r in readers}
        if len(fingerprints) > 1:
            (fa, pa), (fb, pb) = list(fingerprints.items())[:2]
            raise StoreError(f"{pa} and {pb} hold embeddings of different backbones "
                             f"(fingerprints {fa[:12]}, {fb[:12]}); merge only stores of one "
                             "backbone")
        if not readers:
            raise StoreError("give at least one source store other than --out")
        meta = {k: readers[0].backbone[k] for k in ("name", "fingerprint", "dim", "config")}
        added = 0
        with open_writer(out, meta) as w:
            for r in readers:
                added += _copy_into(w, r, _sound_rows(r), skip_known=True)
            for r in readers:
                for f in r.failures():
                    if w.sha_of(f["path"]) is None and not w.failed_before(f["path"], f["sha256"]):
                        w.add_failure(f["path"], f["sha256"], f["reason"])
        with open_store(out) as s:
            return MergeResult(out=str(out), sources=len(readers), rows_added=added,
                               rows=s.n_rows, failures=len(s.failures()),
                               classes=len(s.classes))
    finally:
        for r in readers:
            r.close()


def _copy_into(w: Writer, r: Reader, rows: np.ndarray, skip_known: bool) -> int:
    paths, sha, labels, views, classes = r.paths, r.sha256, r.labels, r.views, r.classes
    if skip_known:
        rows = np.array([i for i in rows if not w.has_row(paths[i], sha[i], int(views[i]))],
                        np.int64)
    names = np.array(classes + [""], dtype=object)[labels]  # -1 -> ""
    since = 0
    for a in range(0, len(rows), COPY_BLOCK_ROWS):
        take = rows[a:a + COPY_BLOCK_ROWS]
        w.add(r.embeddings(take), list(paths[take]), list(sha[take]), list(names[take]),
              views[take].tolist())
        since += len(take)
        if since >= MERGE_COMMIT_ROWS:
            w.commit()
            since = 0
    return len(rows)


def _sound_rows(r: Reader, rows: np.ndarray | None = None) -> np.ndarray:
    """`rows` (default all) of a source store, less those in shard files whose checksum
    no longer matches its index: a changed file is never copied into a new shard with a
    fresh checksum. Each one skipped is named in a warning."""
    rows = np.arange(r.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    for file, bad in r.corrupt_shards():
        log.warning(f"embedstore: warning: {file}: {CHANGED}; its {len(bad)} rows are not "
                    f"copied (run `embedstore compact {r.path}` to move it aside)")
        rows = rows[~np.isin(rows, bad)]
    return rows


def copy_rows(source: str | Path, destination: str | Path, rows) -> int:
    """Write a store holding only `rows` of SOURCE (same backbone, vectors copied)."""
    with open_store(source) as r:
        meta = {k: r.backbone[k] for k in ("name", "fingerprint", "dim", "config")}
        with open_writer(destination, meta) as w:
            return _copy_into(w, r, _sound_rows(r, rows), skip_known=False)


def verify(path: str | Path, block_rows: int = 65536) -> VerifyResult:
    """Check the index (nothing in it reaches outside the store; its virtual columns map
    exactly its own shards), every shard's checksum and structure, and every vector for
    NaN/inf. {"ok", "problems", "files", "rows_checked"}"""
    where = layout(path)
    problems: list[str] = []
    with open_h5(where.index) as f:
        try:
            check_self_contained(f, where.index, virtual_ok=COLUMNS)
        except StoreError as exc:
            problems.append(str(exc))
        files: list[tuple[Path, Any, Any]]  # (file, open handle or None, live rows or None)
        if int(f.attrs.get("format_version", 1)) == 1:
            files = [(where.index, f, None)]
        else:
            index = read_index(f)
            if not where.legacy:
                problems += _virtual_problems(f, index, where.index)
            files = []
            for shard in index.shards:
                file = where.shard(shard.name)
                if not is_regular_file(file):
                    problems.append(f"{file}: missing or not a regular file (rows of "
                                    f"{shard.n_live} images lost)")
                    continue
                if file_sha256(file) != shard.sha256:
                    problems.append(f"{file}: {CHANGED}")
                files.append((file, None, shard.live()))
        rows_checked = 0
        for file, handle, live in files:
            try:
                g = handle or h5py.File(file, "r")
            except OSError as exc:
                problems.append(f"{file}: unreadable ({exc})")
                continue
            try:
                if handle is None:
                    check_self_contained(g, file)
                rows_checked += _check_vectors(g, file, live, block_rows, problems)
            except StoreError as exc:
                problems.append(str(exc))
            except (OSError, KeyError) as exc:
                problems.append(f"{file}: unreadable ({exc})")
            finally:
                if handle is None:
                    g.close()
    return VerifyResult(path=str(path), ok=not problems, problems=problems, files=len(files),
                        rows_checked=rows_checked)


def _virtual_problems(f: h5py.File, index, where: Path) -> list[str]:
    """The index's columns must be virtual datasets over its own shards only, covering
    every live row: what plain-h5py readers see must be what the library reads."""
    problems = []
    own = {f"{PARTS}/{s.name}" for s in index.shards}
    n = sum(s.n_live for s in index.shards)
    for column in COLUMNS:
        link = f.get(column, getlink=True)
        if not isinstance(link, h5py.HardLink):
            continue  # already reported by check_self_contained
        ds = f[column]
        if not ds.is_virtual:
            problems.append(f"{where}: /{column} is not the store's virtual view of its shards")
            continue
        if ds.shape[0] != n:
            problems.append(f"{where}: /{column} has {ds.shape[0]} rows, the shards hold {n}")
        foreign = {m.file_name for m in ds.virtual_sources()
                   if m.file_name not in own or m.dset_name.lstrip("/") != column}
        if foreign:
            problems.append(f"{where}: /{column} maps {', '.join(sorted(foreign)[:3])}, "
                            "which is not one of the store's shards")
    return problems


def _check_vectors(g: h5py.File, file: Path, live, block_rows: int, problems: list) -> int:
    ds = g["embeddings"]
    live = np.arange(ds.shape[0]) if live is None else live
    bad = []
    for a in range(0, len(live), block_rows):
        block = ds[int(live[a]):int(live[min(a + block_rows, len(live)) - 1]) + 1]
        block = block[live[a:a + block_rows] - live[a]]
        bad.extend((live[a:a + block_rows][~np.isfinite(block).all(axis=1)]).tolist())
    if bad:
        names = [p.decode() if isinstance(p, bytes) else p for p in g["paths"][sorted(bad)[:5]]]
        problems.append(f"{file}: {len(bad)} vectors with NaN or inf (rows "
                        f"{', '.join(map(str, bad[:5]))}: {', '.join(names)}"
                        f"{' ...' if len(bad) > 5 else ''})")
    return len(live)
