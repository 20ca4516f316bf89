"""Extraction: Keras vs TFLite fp32 vs int8 runtimes, model-only vs end-to-end; memory; re-runs.

    python -m bench.bench_extract [--sizes 2000] [--jpegs 500] [--big-jpegs 100]
                                  [--work /tmp/es-bench] [--tutorial-max 0] [--no-int8]

Data: Fashion-MNIST (Debian `dataset-fashion-mnist`) as PNG class folders,
N images spread evenly over the 10k test split; plus synthetic 500x375 and
3000x2000 JPEGs for decode cost. Every measurement runs in its own process
(peak RSS from the kernel's rusage of that process). For each data set, in
one run: model-only of every runtime right before and right after the
end-to-end runs of every runtime; a ratio uses the faster model-only run as
its denominator, so a noisy neighbour cannot flatter it.

The decode side's own cost (read, hash, decode, resize of up to 300 files,
one thread) bounds end-to-end: with inference taking t_inf core-seconds per
image (cores / model-only rate) and the decode side t_dec, no split of the
cores does better than t_inf / (t_inf + t_dec) of the model-only rate.

int8 end-to-end runs calibrate on the data set itself (`--runtime int8`; the
calibration is start-up, not job time); int8 model-only uses the model
calibrated on the Fashion-MNIST set.

The tutorials' way (with --tutorial-max N): decode and resize every image into
one float32 NumPy array, then `model.predict`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import report, run_child, table

MODEL_ONLY = """
import json, os, sys, time, numpy as np
from embedstore.backbones.runtimes import load_for_inference
bb = load_for_inference(sys.argv[3] or "mobilenet_v2", sys.argv[1])
x = np.random.default_rng(0).uniform(0, 255, (32, 224, 224, 3)).astype(np.float32)
bb.embed(x); bb.embed(x)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < float(sys.argv[2]):
    bb.embed(x); n += 32
print(json.dumps({"images_per_second": n / (time.perf_counter() - t)}))
"""

DECODE_COST = """
import glob, json, sys, time
from embedstore.pipeline import Resizer, load_file
files = sorted(glob.glob(sys.argv[1] + "/*/*"))[:300]
resizer = Resizer(224, 0.875)
load_file(files[0], resizer, lambda s: False)
t = time.process_time()
for f in files:
    load_file(f, resizer, lambda s: False)
print(json.dumps({"seconds_per_image": (time.process_time() - t) / len(files)}))
"""

FIDELITY = """
import json, sys, glob, numpy as np
from embedstore.backbones.runtimes import load_for_inference
from embedstore.pipeline import decode_image, resize_for_backbone, Resizer
files = sorted(glob.glob(sys.argv[1] + "/*/*"))[:64]
images = [decode_image(open(f, "rb").read(), min_side=256) for f in files]
fast = load_for_inference("mobilenet_v2", "tflite").embed(Resizer(224, 0.875).batch(images))
ref = load_for_inference("mobilenet_v2", "keras").embed(
    np.stack([resize_for_backbone(i, 224, 0.875).numpy() for i in images]))
print(json.dumps({"images": len(files), "max_abs_diff": float(np.abs(fast - ref).max())}))
"""

EXTRACT = """
import json, sys, time
from embedstore.extraction import extract
t = time.perf_counter()
r = extract(sys.argv[1], sys.argv[2], runtime=sys.argv[3])
print(json.dumps({"seconds": r.seconds, "startup_seconds": r.startup_seconds,
                  "embedded": r.embedded, "unchanged": r.unchanged, "failed": r.failed,
                  "images_per_second": r.images_per_second, "stages": r.stages}))
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


def _fresh(store: Path) -> Path:
    for p in (store, Path(f"{store}.parts"), Path(f"{store}.lock"), Path(f"{store}.int8")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000", help="Fashion-MNIST tree sizes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/es-bench"))
    ap.add_argument("--tutorial-max", type=int, default=0)
    ap.add_argument("--jpegs", type=int, default=500, help="500x375 JPEGs")
    ap.add_argument("--big-jpegs", type=int, default=100, help="3000x2000 JPEGs")
    ap.add_argument("--model-seconds", default="12", help="length of each model-only run")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 runtime")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    from bench.fashion_mnist import write_pngs

    full = a.work / "fm-test"  # not fm-all, which bench_heads.py wants with all 70k
    if not full.exists():
        write_pngs(full, "test")  # 10k images: enough for the modest sizes of a shared CPU
    datasets = [("synthetic JPEG 500x375", a.jpegs, make_jpegs(a.work / "jpeg", a.jpegs))]
    if a.big_jpegs:
        datasets.append(("synthetic JPEG 3000x2000", a.big_jpegs,
                         make_jpegs(a.work / "jpeg-big", a.big_jpegs, 3000, 2000)))
    datasets += [("Fashion-MNIST PNG 28x28", n, make_tree(full, a.work / f"fm-{n}", n))
                 for n in sizes]
    runtimes = ["keras", "tflite"] + ([] if a.no_int8 else ["int8"])
    int8_dir = ""
    if not a.no_int8:  # a calibrated model for the model-only runs, outside any timing
        calibration = _fresh(a.work / "calibration.h5")
        run_child(EXTRACT, str(datasets[-1][2]), str(calibration), "int8")
        int8_dir = f"{calibration}/int8"
    run_child(MODEL_ONLY, "tflite", "1", "")  # converts once into the cache, outside any timing
    fidelity = run_child(FIDELITY, str(datasets[0][2]))

    def model_only(rt: str) -> dict:
        return run_child(MODEL_ONLY, rt, a.model_seconds, int8_dir if rt == "int8" else "")

    rows, e2e_rows, stage_rows, tut_rows = [], [], [], []
    for label, n, tree in datasets:
        before = {rt: model_only(rt) for rt in runtimes}
        e2e = {rt: run_child(EXTRACT, str(tree), str(_fresh(a.work / f"{tree.name}-{rt}.h5")), rt)
               for rt in runtimes}
        after = {rt: model_only(rt) for rt in runtimes}
        model = {rt: max(before[rt]["images_per_second"], after[rt]["images_per_second"])
                 for rt in runtimes}
        t_dec = run_child(DECODE_COST, str(tree))["seconds_per_image"]
        cores = _cores()
        rows.append([label, n, *(f"{model[rt]:.1f}" for rt in runtimes),
                     *(f"**{model[rt] / model['keras']:.2f}**" for rt in runtimes[1:])])
        for rt in runtimes[1:]:
            t_inf = cores / model[rt]
            e = e2e[rt]
            e2e_rows.append([label, rt, f"{e['images_per_second']:.1f}",
                             f"**{e['images_per_second'] / model[rt]:.2f}**",
                             f"{1000 * t_inf:.2f}", f"{1000 * t_dec:.2f}",
                             f"{t_inf / (t_inf + t_dec):.2f}",
                             f"{e['images_per_second'] / e2e['keras']['images_per_second']:.2f}",
                             f"{e['startup_seconds']:.1f}", f"{e['peak_rss_mb']:.0f}"])
            stage_rows.append([label, rt, *(f"{e['stages'][k]:.1f}" for k in
                                            ("read", "hash", "decode", "resize", "infer",
                                             "write")), f"{e['seconds']:.1f}"])
        k = e2e["keras"]
        e2e_rows.append([label, "keras", f"{k['images_per_second']:.1f}",
                         f"{k['images_per_second'] / model['keras']:.2f}", "", "", "", "1.00",
                         f"{k['startup_seconds']:.1f}", f"{k['peak_rss_mb']:.0f}"])
        if n <= a.tutorial_max:
            tut = run_child(TUTORIAL, str(tree))
            tut_rows.append([label, n, f"{tut['images_per_second']:.1f}",
                             f"{tut['peak_rss_mb']:.0f}"])
        last_tree, last_store = tree, a.work / f"{tree.name}-tflite.h5"
    body = (f"Embeddings, TFLite path (NumPy/Pillow resize + TFLite) vs Keras path (TF resize + "
            f"Keras) on {fidelity['images']} 500x375 JPEGs: max abs diff "
            f"**{fidelity['max_abs_diff']:.1e}**.\n\nModel-only img/s (pixels already "
            "resized; best of the runs before and after the end-to-end ones):\n\n")
    body += table(["data", "images", *(f"{rt} img/s" for rt in runtimes),
                   *(f"{rt} / keras" for rt in runtimes[1:])], rows)
    body += ("\n\nEnd-to-end (files in, store out). t_inf = cores / model-only rate, t_dec = "
             "one thread's read+hash+decode+resize per image; bound = t_inf / (t_inf + t_dec), "
             "the best end-to-end / model-only any split of the cores can reach:\n\n")
    body += table(["data", "runtime", "img/s", "end-to-end / model-only", "t_inf ms",
                   "t_dec ms", "bound", "x keras end-to-end", "start-up s", "peak RSS MB"],
                  e2e_rows)
    body += ("\n\nSeconds per stage (read..resize summed over the decode threads, so they "
             "overlap inference and each other):\n\n")
    body += table(["data", "runtime", "read", "hash", "decode", "resize", "infer", "write",
                   "job s"], stage_rows)
    if tut_rows:
        body += "\n\n" + table(["tutorial way", "images", "img/s", "peak RSS MB"], tut_rows)
    again = run_child(EXTRACT, str(last_tree), str(last_store), "tflite")
    body += "\n\n" + table(
        ["unchanged re-run, tflite", "embedded", "unchanged", "wall s (process)", "start-up s",
         "job s", "peak RSS MB"],
        [[last_tree.name, again["embedded"], again["unchanged"], again["wall_s"],
          again["startup_seconds"], again["seconds"], again["peak_rss_mb"]]])
    report("Extraction runtimes: keras, tflite, int8", body)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
