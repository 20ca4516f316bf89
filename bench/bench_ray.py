"""Local engine vs Ray Data engine on this machine: the same Fashion-MNIST extraction.

    python -m bench.bench_ray [--images 2000] [--rounds 1] [--work /tmp/es-bench-ray]

Data: N Fashion-MNIST images (Debian `dataset-fashion-mnist`) as PNG class
folders. Each run is its own process into a fresh store, engines alternated
(local, ray, local, ray, ...) so a noisy neighbour hits both alike. Ray starts
inside the run (as `embedstore extract --engine ray` does), so its start-up
is in the total; "steady" is the rate from the first committed batch to the end,
which leaves start-up and model building out. The stores are compared at the end.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench.common import report, run_child, table

EXTRACT = """
import json, sys, time
from embedstore.extraction import extract
marks = []
def on_progress(state):
    if state.embedded and (not marks or marks[-1][1] != state.embedded):
        marks.append((time.perf_counter(), state.embedded))
t = time.perf_counter()
r = extract(sys.argv[1], sys.argv[2], "mobilenet_v2", engine=sys.argv[3], progress=on_progress)
s = time.perf_counter() - t
(t0, n0), (t1, n1) = marks[0], marks[-1]
print(json.dumps({"seconds": s, "embedded": r.embedded, "failed": r.failed,
                  "images_per_second": r.embedded / s,
                  # results arrive in blocks: a rate over less than half the images says little
                  "steady_images_per_second": (n1 - n0) / (t1 - t0)
                                              if n1 - n0 >= r.embedded / 2 else 0}))
"""

COMPARE = """
import json, sys, numpy as np
from embedstore.store import open_store
def rows(path):
    with open_store(path) as s:
        e = s.embeddings()
        return {p: (h, l, e[i]) for i, (p, h, l) in enumerate(zip(s.paths, s.sha256, s.labels))}
a, b = rows(sys.argv[1]), rows(sys.argv[2])
same = a.keys() == b.keys() and all(a[k][:2] == b[k][:2] for k in a)
diff = max(float(np.abs(a[k][2] - b[k][2]).max()) for k in a) if same else None
print(json.dumps({"same_rows": same, "max_abs_diff": diff}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/es-bench-ray"))
    a = ap.parse_args()
    from bench.bench_extract import make_tree
    from bench.fashion_mnist import write_pngs

    full = a.work / "fm-train"
    if not full.exists():
        write_pngs(full, "train")
    tree = make_tree(full, a.work / f"fm-{a.images}", a.images)
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for r in range(a.rounds):
        for engine in runs:
            store = a.work / f"{engine}-{r}.h5"
            for p in (store, Path(f"{store}.parts"), Path(f"{store}.lock")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            runs[engine].append(run_child(EXTRACT, str(tree), str(store), engine))
    rows = []
    for engine, results in runs.items():
        best = max(results, key=lambda x: x["images_per_second"])
        rows.append([f"--engine {engine}", best["embedded"], f"{best['wall_s']:.1f}",
                     f"{best['seconds']:.1f}", f"{best['images_per_second']:.1f}",
                     f"{best['steady_images_per_second']:.1f}", f"{best['peak_rss_mb']:.0f}"])
    ratio = (max(x["images_per_second"] for x in runs["ray"])
             / max(x["images_per_second"] for x in runs["local"]))
    steady = (max(x["steady_images_per_second"] for x in runs["ray"])
              / max(x["steady_images_per_second"] for x in runs["local"]))
    check = run_child(COMPARE, str(a.work / "local-0.h5"), str(a.work / "ray-0.h5"))
    body = table(["engine", "images", "process wall s", "extract s", "img/s (total)",
                  "img/s (steady)", "driver peak RSS MB"], rows)
    body += (f"\n\nRay / local, total: **{ratio:.2f}**; steady state: **{steady:.2f}** "
             f"(best of {a.rounds} round(s) each, engines alternated). Stores: same rows, "
             f"hashes and labels: {check['same_rows']}; embeddings max abs difference "
             f"{check['max_abs_diff']:.1e}. Driver RSS only: Ray's workers are other "
             "processes.")
    report(f"Extraction engines: local vs Ray Data ({a.images} Fashion-MNIST images)", body)


if __name__ == "__main__":
    main()
