"""Fine-tuning on cached activations: Fashion-MNIST accuracy, epoch speed, peak RSS.

    python bench/bench_finetune.py WORK_DIR [--train-per-class 200] [--test-per-class 100]

1. Fashion-MNIST subsets (from the Debian package) extracted with the
   default backbone; frozen logreg vs `finetune` at its defaults, both scored
   on the same test images (the tuned head on the test set re-extracted with
   the tuned backbone). Each finetune runs in a child process for peak RSS,
   at two training-set sizes.
2. One epoch of the same top (block 14 up + head) from the activation cache
   vs from pixels (the frozen bottom run every step; pixels pre-decoded in
   memory, which favours the pixel side).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report, run_child, table  # noqa: E402
from fashion_mnist import write_pngs  # noqa: E402

FINETUNE = """
import json, sys, time
from embedstore.finetune import finetune
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
    from embedstore.finetune import _training_model
    from embedstore.headdir import load_head

    backbone, head = load_backbone(), load_head(head_dir)
    bottom, top = split_at(backbone.model, 14)
    cache = ActivationCache(cache_dir, json.loads((cache_dir / "cache.json").read_text()))
    x = np.concatenate([x for _, x in cache.chunks()])[:n].astype(np.float32)
    y = keras.utils.to_categorical(np.arange(n) % len(head.classes_), len(head.classes_))
    pixels = np.random.default_rng(0).uniform(0, 255, (n, 224, 224, 3)).astype(np.float32)
    model = _training_model(top, head, len(head.classes_), False, "none")
    inputs = keras.Input((224, 224, 3))
    from_pixels = keras.Model(inputs, model(bottom(inputs, training=False)))
    bottom.trainable = False
    out = {}
    for name, m, data in (("cache", model, x), ("pixels", from_pixels, pixels)):
        m.compile(keras.optimizers.AdamW(1e-4), "categorical_crossentropy")
        m.fit(data[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)  # warm up
        start = time.perf_counter()
        m.fit(tf.data.Dataset.from_tensor_slices((data, y)).batch(batch), epochs=1, verbose=0)
        out[name] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    a = ap.parse_args()
    from embedstore.extract import extract
    from embedstore.evaluate import evaluate_head
    from embedstore.train import train

    work = a.work
    for stale in list(work.glob("tuned*")) + list(work.glob("test-tuned*")):  # outputs of a run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    test_images = work / "test"
    write_pngs(test_images, "test", a.test_per_class)
    start = time.perf_counter()
    extract(test_images, work / "test.h5")
    extract_rate = a.test_per_class * 10 / (time.perf_counter() - start)
    rows, runs = [], {}
    for per_class in (a.train_per_class // 2, a.train_per_class):
        images = work / f"train{per_class}"
        write_pngs(images, "train", per_class)
        store, head = work / f"train{per_class}.h5", work / f"head{per_class}"
        extract(images, store)
        train(store, head, head="logreg")
        frozen = evaluate_head(head, work / "test.h5", plots=False)
        run = run_child(FINETUNE, str(head), str(work / f"tuned{per_class}"), str(images))
        tuned_test = work / f"test-tuned{per_class}.h5"
        extract(test_images, tuned_test, str(work / f"tuned{per_class}" / "backbone"))
        tuned = evaluate_head(work / f"tuned{per_class}" / "head", tuned_test, plots=False)
        t = run["report"]["timings"]
        runs[per_class] = run
        rows.append([per_class * 10, a.test_per_class * 10, f"{frozen['accuracy']:.4f}",
                     f"{tuned['accuracy']:.4f}", run["report"]["epochs_run"],
                     t["cache_seconds"], t["train_seconds"], t["rebuild_seconds"],
                     run["peak_rss_mb"]])
    big = runs[a.train_per_class]["report"]
    speed = epoch_speed(work / f"head{a.train_per_class}", Path(big["cache"]["dir"]))
    n_train = a.train_per_class * 10
    train_rate = big["n_fit"] * big["epochs_run"] / big["timings"]["train_seconds"]
    cache_rate = n_train / big["timings"]["cache_seconds"]
    est = 60000 / cache_rate + 60000 * 0.9 * 3 / train_rate + 60000 / extract_rate
    body = (table(["train images", "test images", "frozen logreg test acc",
                   "finetune test acc", "epochs", "cache s", "train s", "rebuild s",
                   "finetune peak RSS MB"], rows)
            + f"\n\nfinetune defaults: block 14, 3 epochs, AdamW lr 1e-4 warm-up + cosine, batch "
              f"64, flip; head logreg (C=0.1). Cache: {big['cache']['bytes'] / 1e6:.0f} MB for "
              f"{n_train} images (16-bit).\n\n"
            + table(["one epoch of blocks 14-18 + head", "images/s", "ratio"],
                    [["from cached activations", f"{speed['cache']:.1f}",
                      f"{speed['cache'] / speed['pixels']:.1f}x"],
                     ["from pixels (bottom re-run)", f"{speed['pixels']:.1f}", "1.0x"]])
            + f"\n\nExtrapolated, not measured: the full 60k train set at the rates measured "
              f"here (cache {cache_rate:.0f} img/s, training {train_rate:.0f} rows/s, "
              f"extraction {extract_rate:.0f} img/s) would take about {est / 3600:.1f} h of "
              f"extraction + caching + 3 epochs on this shared 2-core machine.")
    report("Fine-tuning on cached activations (bench/bench_finetune.py)", body)


if __name__ == "__main__":
    main()
