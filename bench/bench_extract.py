"""Extraction: model-only vs end-to-end vs the tutorials' way; memory; re-runs.

    python bench/bench_extract.py [--sizes 1000,7000,70000] [--work /tmp/es-bench]
                                  [--tutorial-max 7000] [--jpegs 1000]

Data: Fashion-MNIST (Debian `dataset-fashion-mnist`) as PNG class folders,
N images spread evenly over train then test; plus synthetic 500x375 and
3000x2000 JPEGs for decode cost. Every measurement runs in its own process
(peak RSS from the kernel's rusage of that process). Model-only throughput is
measured in the same run, right before and right after each end-to-end run;
the ratio uses the faster of the two.

The tutorials' way: decode and resize every image into one float32 NumPy
array, then `model.predict`. Above --tutorial-max it is not run: the array
alone would need N x 224 x 224 x 3 x 4 bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, run_child, table  # noqa: E402

MODEL_ONLY = """
import json, time, numpy as np
from embedstore.backbones import load_backbone
bb = load_backbone("mobilenet_v2")
x = np.random.default_rng(0).uniform(0, 255, (32, 224, 224, 3)).astype(np.float32)
bb.embed(x); bb.embed(x)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < 20:
    bb.embed(x); n += 32
print(json.dumps({"images_per_second": n / (time.perf_counter() - t)}))
"""

EXTRACT = """
import json, sys, time
from embedstore.backbones import load_backbone
from embedstore.extract import extract
import numpy as np
bb = load_backbone("mobilenet_v2")
bb.embed(np.zeros((1, 224, 224, 3), np.float32))  # trace once, as model-only does
t = time.perf_counter()
r = extract(sys.argv[1], sys.argv[2], bb)
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "embedded": r.embedded, "unchanged": r.unchanged,
                  "failed": r.failed, "images_per_second": r.embedded / s if s else 0}))
"""

TUTORIAL = """
import json, sys, time, glob, numpy as np
from PIL import Image
from embedstore.backbones import load_backbone
bb = load_backbone("mobilenet_v2")
paths = sorted(glob.glob(sys.argv[1] + "/*/*"))
t = time.perf_counter()
# the tutorials: every image decoded and resized into one array, then predict
x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR),
                         dtype=np.float32) for p in paths])
emb = bb.model.predict(x, batch_size=32, verbose=0)
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "images_per_second": len(paths) / s, "array_gb": x.nbytes / 1e9}))
"""


def make_tree(src_root: Path, out: Path, n: int) -> Path:
    """The first n images of the full tree (sorted), hard-linked into a new tree."""
    if out.exists():
        shutil.rmtree(out)
    files = sorted(src_root.glob("*/*.png"))
    step = len(files) / n
    for i in range(n):
        f = files[int(i * step)]
        (out / f.parent.name).mkdir(parents=True, exist_ok=True)
        (out / f.parent.name / f.name).hardlink_to(f)
    return out


def make_jpegs(out: Path, n: int, width: int = 500, height: int = 375) -> Path:
    """n distinct photo-sized JPEGs (gradients plus noise: realistic decode cost)."""
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(0)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(n):
        base = np.stack([(x + i) % 256, (y * 2 + i) % 256, (x + y) % 256], -1)
        noise = rng.integers(0, 60, base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
            out / "photos" / f"{i:05d}.jpg", quality=90)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,7000,70000")
    ap.add_argument("--work", type=Path, default=Path("/tmp/es-bench"))
    ap.add_argument("--tutorial-max", type=int, default=7000)
    ap.add_argument("--jpegs", type=int, default=2000, help="500x375 JPEGs")
    ap.add_argument("--big-jpegs", type=int, default=300, help="3000x2000 JPEGs")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fashion_mnist import write_pngs

    full = a.work / "fm-all"
    if not full.exists():
        write_pngs(full, "train")
        write_pngs(full, "test")
    rows = []
    results = {}
    datasets = [(f"Fashion-MNIST PNG 28x28", n, make_tree(full, a.work / f"fm-{n}", n))
                for n in sizes]
    if a.big_jpegs:
        datasets.insert(0, ("synthetic JPEG 3000x2000", a.big_jpegs,
                            make_jpegs(a.work / "jpeg-big", a.big_jpegs, 3000, 2000)))
    if a.jpegs:
        datasets.insert(0, ("synthetic JPEG 500x375", a.jpegs, make_jpegs(a.work / "jpeg", a.jpegs)))
    for label, n, tree in datasets:
        store = a.work / f"{tree.name}.h5"
        for p in (store, Path(f"{store}.parts"), Path(f"{store}.lock")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        # model-only right before and right after: the faster one is the (conservative)
        # denominator, so a noisy neighbour cannot flatter the ratio
        before = run_child(MODEL_ONLY)
        e2e = run_child(EXTRACT, str(tree), str(store))
        after = run_child(MODEL_ONLY)
        model = max(before, after, key=lambda r: r["images_per_second"])
        tut = None
        if n <= a.tutorial_max:
            tut = run_child(TUTORIAL, str(tree))
        results[(label, n)] = (model, e2e, tut)
        rows.append([label, n, f"{model['images_per_second']:.1f}",
                     f"{e2e['images_per_second']:.1f}",
                     f"**{e2e['images_per_second'] / model['images_per_second']:.2f}**",
                     f"{e2e['seconds']:.1f}", f"{e2e['peak_rss_mb']:.0f}",
                     f"{tut['images_per_second']:.1f}" if tut else "not run",
                     f"{tut['seconds']:.1f}" if tut else "-",
                     f"{tut['peak_rss_mb']:.0f}" if tut else f"needs {n * 224 * 224 * 3 * 4 / 1e9:.0f} GB for the array"])
        if n == max(sizes):
            big_tree, big_store = tree, store
    body = table(["data", "images", "model-only img/s", "end-to-end img/s",
                  "end-to-end / model-only", "end-to-end s", "peak RSS MB",
                  "tutorial img/s", "tutorial s", "tutorial peak RSS MB"], rows)
    fm = [(k[1], v[1]["peak_rss_mb"]) for k, v in results.items() if k[0].startswith("Fashion")]
    if len(fm) >= 2:
        (n0, r0), (n1, r1) = fm[-2], fm[-1]
        body += f"\n\nPeak RSS {n1} / {n0} images: **{r1 / r0:.2f}** ({r1:.0f} / {r0:.0f} MB)."

    # incremental: unchanged re-run, then 1% new images
    again = run_child(EXTRACT, str(big_tree), str(big_store))
    n_new = max(1, max(sizes) // 100)
    added = 0
    for f in sorted(big_tree.glob("*/*.png"))[:n_new]:
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(f.with_name("flip-" + f.name))
        added += 1
    grown = run_child(EXTRACT, str(big_tree), str(big_store))
    for f in big_tree.glob("*/flip-*.png"):
        f.unlink()
    body += "\n\n" + table(["re-run on the largest tree", "embedded", "unchanged", "wall s (incl. start-up)", "job s"], [
        ["unchanged", again["embedded"], again["unchanged"], again["wall_s"], f"{again['seconds']:.1f}"],
        [f"+{added} new images (1%)", grown["embedded"], grown["unchanged"], grown["wall_s"], f"{grown['seconds']:.1f}"],
    ])
    report("Extraction", body)


if __name__ == "__main__":
    main()
