"""`similar` at scale: exact blockwise cosine search over 10^6 simulated rows.

    python -m bench.bench_similar [--rows 1000000] [--dir /tmp/es-similar] [--keep]

Synthetic 1280-d float32 vectors (100 Gaussian clusters, so neighbours are not
ties) go through the real StoreWriter in commits of 50k rows. Then, in a fresh
process, `embedstore.similarity.similar` answers one query (a stored path) three
times (the first reads the store from disk; "warm" is the median of the other
two) and 100 queries at once, warm, at the default block of 4096 rows. The
child's peak RSS counts the store's pages, which the reader maps rather than
copies (10^6 rows are 4.9 GB of page cache, shared and reclaimable); its peak
anonymous memory (RssAnon, sampled every 10 ms) is what the search itself
holds, and stays at a block, not the store. The store is deleted afterwards
unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from bench.common import report, run_child, table

DIM = 1280
COMMIT_ROWS = 50_000
META = {"name": "synthetic", "fingerprint": "7" * 64, "dim": DIM, "config": {}}

QUERY_CHILD = r"""
import json, sys, threading, time
import numpy as np
from embedstore.similarity import similar
peak_anon = [0]
def sample():
    while True:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        peak_anon[0] = max(peak_anon[0], kb)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
store, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(1)
paths = [f"c{i % 100}/img{i:09d}.png" for i in rng.choice(n, 101, replace=False)]
one = []
for _ in range(3):
    t = time.perf_counter()
    r = similar(store, paths[:1], k=10)
    one.append(time.perf_counter() - t)
t = time.perf_counter()
many = similar(store, paths[1:], k=10)
hundred = time.perf_counter() - t
assert len(many) == 100 and all(len(m["neighbours"]) == 10 for m in many)
print(json.dumps({"first_s": one[0], "one_warm_s": float(np.median(one[1:])),
                  "hundred_warm_s": hundred, "peak_anon_mb": round(peak_anon[0] / 1024, 1)}))
"""


def build(store: Path, n: int) -> None:
    from embedstore.store import StoreWriter

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, DIM)).astype(np.float32)
    with StoreWriter(store, META) as w:
        for start in range(0, n, COMMIT_ROWS):
            ids = np.arange(start, min(start + COMMIT_ROWS, n))
            X = centres[ids % 100] + rng.normal(scale=0.7, size=(len(ids), DIM)).astype(np.float32)
            paths = [f"c{i % 100}/img{i:09d}.png" for i in ids]
            w.add(X, paths, [hashlib.sha256(p.encode()).hexdigest() for p in paths],
                  [f"c{i % 100}" for i in ids])
            w.commit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/es-similar"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    store = a.dir / f"sim{a.rows}.h5"
    if not store.exists():
        build(store, a.rows)
    try:
        r = run_child(QUERY_CHILD, str(store), str(a.rows))
    finally:
        if not a.keep:
            shutil.rmtree(a.dir)
    print(json.dumps(r))
    report(f"similar: exact search over {a.rows:,} simulated rows", table(
        ["rows", "1 query, first (s)", "1 query, warm (s)", "100 queries, warm (s)",
         "peak RSS, store pages included (MB)", "peak anonymous memory (MB)"],
        [[f"{a.rows:,}", f"{r['first_s']:.2f}", f"{r['one_warm_s']:.2f}",
          f"{r['hundred_warm_s']:.2f}", r["peak_rss_mb"], r["peak_anon_mb"]]]))


if __name__ == "__main__":
    main()
