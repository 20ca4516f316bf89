"""The sharded store at scale, no model: does a commit's cost grow with the store?

    python bench/bench_scale.py [--max-rows 10000000] [--dir /work/es-scale] [--keep]

Synthetic 1280-d float32 vectors go through the real StoreWriter in commits
of 10^4 rows (one writer, as one long extract would). At each checkpoint
(10^5, 10^6, 3x10^6, 10^7 rows, up to --max-rows) it reports the seconds
per commit over the last commits (median, p90, max: folds of small shards
are the spikes), the writer's peak RSS, and, in a fresh process, the time to
open the store, read 10k random rows, stream every row, and disk bytes per
row. The store is deleted afterwards unless --keep. 10^7 rows need ~52 GB
of free disk (checked before it starts).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import report, run_child, table  # noqa: E402
from embedstore.store import StoreWriter, parts_dir  # noqa: E402

DIM = 1280
COMMIT_ROWS = 10_000
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


def disk_bytes(store: Path) -> int:
    return store.stat().st_size + sum(p.stat().st_size for p in parts_dir(store).iterdir())


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
    try:
        t = time.perf_counter()
        w = StoreWriter(store, META)
        writer_open_s = time.perf_counter() - t
        n = 0
        for checkpoint in checkpoints:
            while n < checkpoint:
                ids = range(n, n + COMMIT_ROWS)
                t = time.perf_counter()
                w.add(base + np.float32(n), [f"c{i % 10}/img{i:09d}.png" for i in ids],
                      [f"{i:064x}" for i in ids], [f"c{i % 10}" for i in ids])
                w.commit()
                commit_s.append(time.perf_counter() - t)
                n += COMMIT_ROWS
            window = np.array(commit_s[-50:])
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            read = run_child(READ_CHILD, str(store))
            results.append([f"{n:,}", f"{np.median(window):.3f}", f"{np.percentile(window, 90):.3f}",
                            f"{window.max():.2f}", f"{peak_rss:.0f}", read["shards"],
                            f"{read['open_s']:.3f}", f"{read['random_s']:.2f}",
                            f"{read['stream_s']:.1f}", f"{n * DIM * 4 / 1e9 / read['stream_s']:.2f}",
                            f"{disk_bytes(store) / n:.0f}"])
            print(results[-1], flush=True)
        w.release()
        t = time.perf_counter()
        StoreWriter(store, META).release()
        reopen_s = time.perf_counter() - t
    finally:
        if not a.keep:
            shutil.rmtree(parts_dir(store), ignore_errors=True)
            store.unlink(missing_ok=True)
    not_run = [f"{c:,}" for c in CHECKPOINTS if c > a.max_rows]
    body = table(["rows", "commit s (median of last 50)", "p90", "max", "writer peak RSS MB",
                  "shards", "open_store s", "10k random rows s", "stream all s", "stream GB/s",
                  "disk bytes/row"], results)
    body += (f"\n\nCommits of {COMMIT_ROWS:,} rows x {DIM} float32 ({COMMIT_ROWS * DIM * 4 / 1e6:.0f}"
             f" MB of vectors each), one writer. Writer open on an empty store "
             f"{writer_open_s:.2f} s; re-opening a writer on the final {n:,}-row store (it loads "
             f"every path and hash) {reopen_s:.1f} s. Raw vectors are {DIM * 4} bytes/row."
             + (f" Not measured: {', '.join(not_run)} rows (--max-rows {a.max_rows:,})."
                if not_run else ""))
    report("Sharded store at scale (synthetic vectors, no model)", body)


if __name__ == "__main__":
    main()
