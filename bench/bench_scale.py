"""The sharded store at scale, no model: does a commit's cost grow with the store?

    python -m bench.bench_scale [--max-rows 10000000] [--dir /work/es-scale] [--keep]

Synthetic 1280-d float32 vectors go through the real StoreWriter in commits
of 10^4 rows (one writer, as one long extract would). At each checkpoint
(10^5, 10^6, 3x10^6, 10^7 rows, up to --max-rows) it reports the seconds
per commit over the last commits (median, p90, max: folds of small shards
are the spikes); the size of the writer's row index; in a fresh process, the
time to open the store, read 10k random rows, stream every row, and disk
bytes per row; in another, the time and peak RSS of re-opening a writer on
the store (what a resumed extract pays); then a side-by-side probe: 15
commits into this store alternated with 15 into a new, near-empty one, and
the median of the 15 ratios of neighbouring commits (the flatness figure on
a noisy machine: each pair sees the same load, and the median ignores the
folds' spikes); and the writer's peak RSS so far. The store is deleted
afterwards unless --keep. 10^7 rows need ~52 GB
of free disk (checked before it starts). SIGTERM/Ctrl-C stops at the next
commit and reports the checkpoints reached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import report, run_child, table  # noqa: E402
from embedstore.store import StoreWriter
from embedstore.store._lock import acquire_lock, release_lock

DIM = 1280
COMMIT_ROWS = 10_000
PROBE_COMMITS = 15
CHECKPOINTS = [100_000, 1_000_000, 3_000_000, 10_000_000]
META = {"name": "synthetic", "fingerprint": "5" * 64, "dim": DIM, "config": {}}

READ_CHILD = r"""
import json, sys, time
import numpy as np
from embedstore.store import open_store
t = time.perf_counter()
s = open_store(sys.argv[1])
n = s.n_rows
open_s = time.perf_counter() - t
rows = np.random.default_rng(0).choice(n, 10_000, replace=False)
t = time.perf_counter()
s.embeddings(rows)
random_s = time.perf_counter() - t
t = time.perf_counter()
total = 0
for _, block in s.iter_embeddings(chunk_rows=65536):
    total += len(block)
stream_s = time.perf_counter() - t
assert total == n
print(json.dumps({"rows": n, "open_s": open_s, "random_s": random_s, "stream_s": stream_s,
                  "shards": len(s.shards)}))
"""

WRITER_CHILD = r"""
import json, sys, time
from embedstore.store import StoreWriter
t = time.perf_counter()
w = StoreWriter(sys.argv[1], json.loads(sys.argv[2]))
open_s = time.perf_counter() - t
w.release()
# VmHWM, not ru_maxrss: the latter counts the parent's pages at fork, before exec
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({"open_s": open_s, "hwm_mb": int(hwm) / 1024}))
"""


def reopen_in_child(w: StoreWriter) -> dict:
    """Time a fresh writer opening the store, in a child process. The running writer lends
    it the lock and takes it back; the child changes nothing, so its state stays current."""
    release_lock(w._lock_fd, w.layout.lock)
    try:
        return run_child(WRITER_CHILD, str(w.path), json.dumps(META))
    finally:
        w._lock_fd = acquire_lock(w.layout.lock, w.path)


def commit_batch(w: StoreWriter, n: int, base: np.ndarray, prefix: str = "c") -> float:
    """Add and commit rows n .. n+COMMIT_ROWS; seconds taken."""
    ids = range(n, n + COMMIT_ROWS)
    t = time.perf_counter()
    w.add(base + np.float32(n), [f"{prefix}{i % 10}/img{i:09d}.png" for i in ids],
          [f"{i:064x}" for i in ids], [f"c{i % 10}" for i in ids])
    w.commit()
    return time.perf_counter() - t


def probe(w: StoreWriter, n: int, small_store: Path, base) -> tuple[float, float, float]:
    """Alternate commits into the big store and a new one: (median big s, median small s,
    median of the ratios big / small of each pair)."""
    remove_store(small_store)
    big_s, small_s = [], []
    with StoreWriter(small_store, META) as small:
        for k in range(PROBE_COMMITS):
            big_s.append(commit_batch(w, n + k * COMMIT_ROWS, base))
            small_s.append(commit_batch(small, k * COMMIT_ROWS, base, prefix="s"))
    remove_store(small_store)
    return (float(np.median(big_s)), float(np.median(small_s)),
            float(np.median(np.array(big_s) / np.array(small_s))))


def remove_store(store: Path) -> None:
    shutil.rmtree(store, ignore_errors=True)


def disk_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-rows", type=int, default=10_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/work/es-scale"))
    ap.add_argument("--keep", action="store_true", help="Keep the store afterwards.")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    store = a.dir / "scale.h5"
    if store.exists():
        sys.exit(f"{store} exists: delete it first")
    need = a.max_rows * (DIM * 4 + 100) * 1.02
    free = shutil.disk_usage(a.dir).free
    if need > free:
        sys.exit(f"{a.max_rows} rows need {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free on "
                 f"{a.dir}: lower --max-rows")
    checkpoints = [c for c in CHECKPOINTS if c <= a.max_rows]
    base = np.random.default_rng(0).standard_normal((COMMIT_ROWS, DIM)).astype(np.float32)
    results, commit_s = [], []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    small_store = a.dir / "probe.h5"
    n = 0
    try:
        t = time.perf_counter()
        w = StoreWriter(store, META)
        writer_open_s = time.perf_counter() - t
        for checkpoint in checkpoints:
            while n < checkpoint:
                commit_s.append(commit_batch(w, n, base))
                n += COMMIT_ROWS
                if len(commit_s) % 100 == 0:
                    print(f"{n:,} rows, median of the last 100 commits "
                          f"{np.median(commit_s[-100:]):.2f} s", flush=True)
            window = np.array(commit_s[-50:])
            index_mb = w._where.nbytes / 1e6
            read = run_child(READ_CHILD, str(store))
            reopen = reopen_in_child(w)
            disk = disk_bytes(store) / n
            big_s, small_s, ratio = probe(w, n, small_store, base)  # from the checkpoint on
            n += PROBE_COMMITS * COMMIT_ROWS
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            results.append([f"{checkpoint:,}", f"{np.median(window):.3f}",
                            f"{np.percentile(window, 90):.3f}",
                            f"{window.max():.2f}", f"{big_s:.3f} / {small_s:.3f}; "
                            f"**{ratio:.2f}**", f"{peak_rss:.0f}", f"{index_mb:.0f}",
                            read["shards"], f"{read['open_s']:.3f}", f"{read['random_s']:.2f}",
                            f"{read['stream_s']:.1f}",
                            f"{checkpoint * DIM * 4 / 1e9 / read['stream_s']:.2f}",
                            f"{disk:.0f}", f"{reopen['open_s']:.2f}",
                            f"{reopen['hwm_mb']:.0f}"])
            print(results[-1], flush=True)
        w.release()
    except KeyboardInterrupt:
        pass
    finally:
        if not a.keep:
            for s in (store, small_store):
                remove_store(s)
    done = {row[0] for row in results}
    not_run = [f"{c:,}" for c in CHECKPOINTS if f"{c:,}" not in done]
    body = table(["rows", "commit s (median of last 50)", "p90", "max",
                  "probe: median commit s here / in a new store; median ratio of pairs",
                  "writer peak RSS MB",
                  "row index MB", "shards", "open_store s", "10k random rows s", "stream all s",
                  "stream GB/s", "disk bytes/row", "re-open writer s",
                  "re-opened writer peak RSS MB"], results)
    commit_mb = COMMIT_ROWS * DIM * 4 / 1e6
    body += (f"\n\nCommits of {COMMIT_ROWS:,} rows x {DIM} float32 ({commit_mb:.0f}"
             f" MB of vectors each), one writer. Writer open on an empty store "
             f"{writer_open_s:.2f} s. Raw vectors are {DIM * 4} bytes/row. Load "
             f"average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
             + (f" Not measured: {', '.join(not_run)} rows." if not_run else ""))
    report("Sharded store at scale (synthetic vectors, no model)", body)


if __name__ == "__main__":
    main()
