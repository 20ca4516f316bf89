"""Does the store folder (format 3) cost anything against the format-2 file + parts layout?

    git worktree add /tmp/es-old 988ee2b        # the last format-2 version
    python -m bench.bench_layout --old-tree /tmp/es-old [--rows 1000000] [--dir /work/es-layout]

Both versions build a store of --rows synthetic 1280-d rows (commits of 10^4,
one writer), each in its own child process with that version on its
PYTHONPATH. Then, in alternating rounds (old, new, old, new, ...), a child
re-opens the writer (what a resumed extract pays), makes 10 more commits of
10^4 rows, and opens a reader. Reported: the medians per version and the
median of the per-round ratios new / old (side by side: each pair sees the
same machine load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, report, table

CHILD = r"""
import json, sys, time
import numpy as np
from embedstore.store import StoreWriter, open_store
store, start, commits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
meta = {"name": "synthetic", "fingerprint": "5" * 64, "dim": 1280, "config": {}}
rows = 10_000
base = np.random.default_rng(0).standard_normal((rows, 1280)).astype(np.float32)
t = time.perf_counter()
w = StoreWriter(store, meta)
reopen = time.perf_counter() - t
commit = []
for c in range(commits):
    n = start + c * rows
    ids = range(n, n + rows)
    t = time.perf_counter()
    w.add(base + np.float32(n), [f"c{i % 10}/img{i:09d}.png" for i in ids],
          [f"{i:064x}" for i in ids], [f"c{i % 10}" for i in ids])
    w.commit()
    commit.append(time.perf_counter() - t)
w.release()
t = time.perf_counter()
with open_store(store) as s:
    n_rows = s.n_rows
reader = time.perf_counter() - t
print(json.dumps({"reopen_s": reopen, "commit_s": commit, "reader_open_s": reader,
                  "rows": n_rows}))
"""


def run(tree: Path, store: Path, start: int, commits: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(store), str(start), str(commits)],
                         env=env, cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-tree", type=Path, required=True,
                    help="a checkout of the last format-2 version (see the docstring)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/work/es-layout"))
    a = ap.parse_args()
    trees = {"format 2 (file + parts)": a.old_tree.resolve(), "format 3 (folder)": REPO}
    stores = {name: a.dir / f"{i}.h5" for i, name in enumerate(trees)}
    a.dir.mkdir(parents=True, exist_ok=True)
    for name, store in stores.items():
        for p in (store, Path(f"{store}.parts")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        built = run(trees[name], store, 0, a.rows // 10_000)
        print(f"{name}: built {built['rows']:,} rows", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    n = a.rows
    for r in range(a.rounds):
        for name in trees:
            results[name].append(run(trees[name], stores[name], n, 10))
        n += 100_000
        print(f"round {r + 1}: " + json.dumps({k: round(statistics.median(v[-1]["commit_s"]), 3)
                                               for k, v in results.items()}), flush=True)
    old, new = (results[name] for name in trees)
    ratio = lambda key: statistics.median(  # noqa: E731
        [b[key] / a_[key] for a_, b in zip(old, new)])
    commit_ratio = statistics.median([statistics.median(b["commit_s"]) /
                                      statistics.median(a_["commit_s"]) for a_, b in zip(old, new)])
    rows = []
    for name, runs in results.items():
        commit = statistics.median([statistics.median(x["commit_s"]) for x in runs])
        rows.append([name, f"{commit:.3f}",
                     f"{statistics.median([x['reopen_s'] for x in runs]):.2f}",
                     f"{statistics.median([x['reader_open_s'] for x in runs]):.3f}"])
    rows.append(["**new / old, median of per-round ratios**", f"**{commit_ratio:.2f}**",
                 f"**{ratio('reopen_s'):.2f}**", f"**{ratio('reader_open_s'):.2f}**"])
    body = table(["layout", "commit of 10^4 rows s (median)", "re-open writer s",
                  "open_store s"], rows)
    body += (f"\n\nStores of {a.rows:,} rows growing by 10^5 a round, {a.rounds} rounds "
             f"alternating the two versions; old tree {a.old_tree}.")
    report(f"Store layout: folder (format 3) against file + parts (format 2) at "
           f"{a.rows:,} rows", body)
    for store in stores.values():
        for p in (store, Path(f"{store}.parts")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
