"""The activation cache: a frozen bottom's output for every image, on disk.

A directory of chunk files `chunk-NNNNNNNNN.npz` (uncompressed: gzip would
cost more time than the bytes save), each holding `sha256` (the content
hashes) and `x` (float16 activations, N x H x W x C), plus `cache.json`
(backbone fingerprint, block, shape). Each chunk is written to a temporary
name, fsynced and renamed, so a crash or kill -9 loses at most the chunk in
progress and a re-run computes only the images no chunk holds. Readers load
one chunk at a time, so memory does not depend on the number of images.

16-bit halves the disk and I/O; the rebuild through a tuned top stays at
cosine >= 0.999 to a fresh float32 extraction (tests/test_finetune.py).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

META = "cache.json"


class CacheError(ValueError):
    """The activation cache cannot be used or written, with what to do about it."""


class ActivationCache:
    def __init__(self, directory: str | Path, meta: dict):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / META
        if meta_path.is_file():
            theirs = json.loads(meta_path.read_text())
            key = ("fingerprint", "block", "shape")
            if [theirs.get(k) for k in key] != [meta.get(k) for k in key]:
                raise CacheError(f"{self.dir} caches block {theirs.get('block')} of backbone "
                                 f"{str(theirs.get('fingerprint'))[:12]}, not block "
                                 f"{meta['block']} of {meta['fingerprint'][:12]}; give another "
                                 "--cache-dir or delete it")
            self.meta = {**meta, **theirs}
        else:
            self.meta = meta
            self._write_atomic(meta_path, json.dumps(meta, indent=2).encode())
        for tmp in self.dir.glob(".chunk-*.tmp"):  # a chunk a crash left half-written
            tmp.unlink()

    def chunk_files(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz"))

    def cached_sha(self) -> set[str]:
        done: set[str] = set()
        for path in self.chunk_files():
            with np.load(path) as z:
                done.update(z["sha256"].tolist())
        return done

    def write_chunk(self, sha256: list[str], x: np.ndarray) -> Path:
        """Commit one chunk: after this returns it survives any crash."""
        files = self.chunk_files()
        seq = int(files[-1].stem.split("-")[1]) + 1 if files else 1
        path = self.dir / f"chunk-{seq:09d}.npz"
        tmp = self.dir / f".chunk-{seq:09d}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, sha256=np.array(sha256), x=x.astype(np.float16))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(
                    f"disk full while writing the activation cache in {self.dir}: the "
                    f"{len(files)} chunks already written are kept; free about "
                    f"{x.size * 2 / 1e6:.0f} MB per chunk or give --cache-dir on another "
                    "disk, then re-run to continue") from None
            raise CacheError(f"cannot write {path} ({exc.strerror}); give a writable "
                             "--cache-dir") from None
        return path

    def chunks(self, order=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(sha256, float16 activations) per chunk, in file order or the order given."""
        files = self.chunk_files()
        for i in (range(len(files)) if order is None else order):
            with np.load(files[i]) as z:
                yield z["sha256"], z["x"]

    def update_meta(self, **fields) -> None:
        """Record more about the cache (e.g. where the images are) in cache.json."""
        self.meta.update(fields)
        self._write_atomic(self.dir / META, json.dumps(self.meta, indent=2).encode())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.chunk_files())

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
