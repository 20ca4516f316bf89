"""Fine-tuning on cached activations: Fashion-MNIST accuracy, epoch speed, peak RSS.

    python -m bench.bench_finetune WORK_DIR [--train-sizes 5000,10000] [--test-per-class 1000]
                                            [--no-speed | --speed-only]

1. For each training-set size: a class-balanced Fashion-MNIST subset (from the
   Debian package) extracted with the default backbone, a logreg head trained
   on it (default split: 20% validation), then `finetune` at its defaults in a
   child process (peak RSS). Frozen logreg and the tuned head are scored on
   the same test images (the tuned head on the test set re-extracted with the
   tuned backbone).
2. One epoch of the same top (block 14 up + head) from the activation cache
   vs from pixels (the frozen bottom run every step; pixels pre-decoded in
   memory, which favours the pixel side). Best of two timed epochs each;
   --speed-only measures just this, on the head and cache a previous run
   left in WORK_DIR for the last training-set size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.common import report, run_child, table
from bench.fashion_mnist import write_pngs

FINETUNE = """
import json, sys, time
from embedstore.finetuning import finetune
start = time.perf_counter()
r = finetune(sys.argv[1], sys.argv[2], images=sys.argv[3], log=lambda m: print(m, file=sys.stderr))
print(json.dumps({"report": r, "seconds": time.perf_counter() - start}))
"""


def epoch_speed(head_dir: Path, cache_dir: Path, n: int = 256, batch: int = 64) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from embedstore.activations import ActivationCache
    from embedstore.backbones import load_backbone
    from embedstore.backbones.split import split_at
    from embedstore.finetuning import _training_model
    from embedstore.headdir import load_head

    backbone, head = load_backbone(), load_head(head_dir)
    bottom, top = split_at(backbone.model, 14)
    cache = ActivationCache(cache_dir, json.loads((cache_dir / "cache.json").read_text()))
    x = np.concatenate([x for _, x in cache.chunks()])[:n].astype(np.float32)
    y = keras.utils.to_categorical(np.arange(n) % len(head.classes_), len(head.classes_))
    pixels = np.random.default_rng(0).uniform(0, 255, (n, 224, 224, 3)).astype(np.float32)
    model = _training_model(top, len(head.classes_), False, "none")
    inputs = keras.Input((224, 224, 3))
    from_pixels = keras.Model(inputs, model(bottom(inputs, training=False)))
    bottom.trainable = False
    out = {}
    for name, m, data in (("cache", model, x), ("pixels", from_pixels, pixels)):
        m.compile(keras.optimizers.AdamW(1e-4), "categorical_crossentropy")
        m.fit(data[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)  # warm up
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            m.fit(tf.data.Dataset.from_tensor_slices((data, y)).batch(batch), epochs=1, verbose=0)
            seconds.append(time.perf_counter() - start)
        out[name] = n / min(seconds)
    return out


def speed_table(speed: dict) -> str:
    return table(["one epoch of blocks 14-18 + head", "images/s", "ratio"],
                 [["from cached activations", f"{speed['cache']:.1f}",
                   f"{speed['cache'] / speed['pixels']:.1f}x"],
                  ["from pixels (bottom re-run)", f"{speed['pixels']:.1f}", "1.0x"]])


def one_size(work: Path, n_train: int, test_store: Path, test_images: Path) -> dict:
    """Extract, train frozen logreg, finetune (child), score both on the test store."""
    from embedstore.evaluate import evaluate_head
    from embedstore.extraction import extract
    from embedstore.training import train

    images = work / f"train{n_train}"
    if not images.is_dir():
        write_pngs(images, "train", n_train // 10)
    store, head = work / f"train{n_train}.h5", work / f"head{n_train}"
    tuned_dir = work / f"tuned{n_train}"
    start = time.perf_counter()
    extract(images, store)
    extract_s = time.perf_counter() - start
    train(store, head, head="logreg", overwrite=True)
    frozen = evaluate_head(head, test_store, plots=False)
    run = run_child(FINETUNE, str(head), str(tuned_dir), str(images))
    tuned_test = work / f"test-tuned{n_train}.h5"
    extract(test_images, tuned_test, str(tuned_dir / "backbone"))
    tuned = evaluate_head(tuned_dir / "head", tuned_test, plots=False)
    return {"n": n_train, "extract_s": extract_s, "frozen": frozen["accuracy"],
            "tuned": tuned["accuracy"], **run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--train-sizes", default="5000,10000",
                    help="comma-separated training-set sizes (multiples of 10)")
    ap.add_argument("--test-per-class", type=int, default=1000)
    ap.add_argument("--no-speed", action="store_true", help="skip the epoch-speed comparison")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the epoch-speed comparison, on a previous run's head and cache")
    a = ap.parse_args()
    from embedstore.extraction import extract

    work = a.work
    if a.speed_only:
        n = a.train_sizes.split(",")[-1]
        cache_dir = next((work / f"train{n}.h5.activations").glob("*"))
        report("Fine-tuning: one epoch from the cache vs from pixels (bench/bench_finetune.py)",
               speed_table(epoch_speed(work / f"head{n}", cache_dir)))
        return
    for stale in list(work.glob("tuned*")) + list(work.glob("test-tuned*")):  # outputs of a run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    test_images = work / "test"
    if not test_images.is_dir():
        write_pngs(test_images, "test", a.test_per_class)
    extract(test_images, work / "test.h5")
    runs = [one_size(work, int(n), work / "test.h5", test_images)
            for n in a.train_sizes.split(",")]
    rows = []
    for r in runs:
        rep, t = r["report"], r["report"]["timings"]
        rows.append([r["n"], a.test_per_class * 10, f"{r['frozen']:.4f}", f"{r['tuned']:.4f}",
                     "tuned" if not rep["kept_original_weights"] else "original",
                     rep["n_fit"], rep["epochs_run"], round(r["extract_s"]), t["cache_seconds"],
                     t["train_seconds"], t["rebuild_seconds"], t["guard_seconds"],
                     rep["peak_rss_mb_through_training"], r["peak_rss_mb"]])
    body = table(["train images", "test images", "frozen logreg test acc", "finetune test acc",
                  "weights", "rows trained on", "epochs", "extract s", "cache s", "train s",
                  "rebuild s", "guard s", "peak RSS MB through training",
                  "peak RSS MB whole run"], rows)
    big = runs[-1]["report"]
    body += (f"\n\nfinetune defaults: block 14, 3 epochs (more below 150 steps), AdamW lr "
             f"1e-3 warm-up + cosine, batch 64, flip, BatchNorm trained + recalibrated, fresh "
             f"softmax, guard; head logreg "
             f"(C=0.1). Cache: {big['cache']['bytes'] / 1e6:.0f} MB for {runs[-1]['n']} images "
             f"(16-bit). Guard of the largest run: {json.dumps(big['guard'])}.")
    if not a.no_speed:
        speed = epoch_speed(work / f"head{runs[-1]['n']}", Path(big["cache"]["dir"]))
        body += "\n\n" + speed_table(speed)
    report("Fine-tuning on cached activations (bench/bench_finetune.py)", body)
    (work / "bench_finetune.json").write_text(json.dumps(runs, indent=2, default=str))


if __name__ == "__main__":
    main()
