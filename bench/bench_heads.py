"""Heads on the cache vs the tutorials' way; Fashion-MNIST accuracy; store I/O.

    python -m bench.bench_heads --store /tmp/es-bench/fm-70000.h5
        [--tutorial-images 500] [--tutorial-epochs 20]

STORE is the 70k Fashion-MNIST store that bench_extract.py builds (train and
test images in one tree). Its rows are split by file name into a 60k train
store and a separate 10k test store (store.copy_rows: the same vectors a
separate extraction would give). Then:

1. train time on 60k x 1280 of logreg, dense (20 epochs, no early stop) and
   knn, and their accuracy on the 10k test store;
2. one head experiment side by side with the tutorials' way: a frozen
   backbone inside `model.fit`, the same dense head and epochs, images in
   memory; on a subset, then extrapolated to 60k images x 20 epochs;
3. store I/O: full read and random-row reads of the 70k store.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import report, table
from embedstore import DenseHead, KNNHead, LogRegHead
from embedstore.store import copy_rows, open_store

DENSE = dict(hidden=(256,), dropout=0.2, epochs=20, early_stopping=False)  # head defaults otherwise


def split_store(store: Path, work: Path) -> tuple[Path, Path]:
    with open_store(store) as s:
        names = np.array([p.rsplit("/", 1)[1] for p in s.paths])
    train, test = work / "fm-train.h5", work / "fm-test.h5"
    for out, prefix in ((train, "train-"), (test, "test-")):
        out.unlink(missing_ok=True)
        copy_rows(store, out, np.flatnonzero(np.char.startswith(names.astype(str), prefix)))
    return train, test


def load(store: Path):
    with open_store(store) as s:
        rows = np.flatnonzero(s.labels >= 0)
        return s.embeddings(rows), s.labels[rows], s.classes


def time_fit(head, X, y) -> float:
    t = time.perf_counter()
    head.fit(X, y)
    return time.perf_counter() - t


def heads_section(train: Path, test: Path) -> tuple[str, dict]:
    from sklearn.metrics import accuracy_score, f1_score

    X, y, classes = load(train)
    Xt, yt, _ = load(test)
    rows, seconds_by_head = [], {}
    for name, head in [("logreg (defaults: C=0.1, 40 iterations)", LogRegHead()),
                       ("dense 256, 20 epochs", DenseHead(**DENSE)),
                       ("knn (k=10, cosine)", KNNHead(k=10))]:
        seconds = seconds_by_head[name] = time_fit(head, X, y)
        t = time.perf_counter()
        pred = head.predict(Xt)
        predict_s = time.perf_counter() - t
        rows.append([name, len(y), f"{seconds:.2f}", f"{predict_s:.2f}",
                     f"**{accuracy_score(yt, pred):.4f}**",
                     f"{f1_score(yt, pred, average='macro'):.4f}"])
    return table(["head", "train rows", "train s", "predict 10k s", "test accuracy",
                  "test macro F1"], rows), seconds_by_head


def tutorial_section(train_store: Path, images_root: Path, n: int, epochs: int,
                     dense_60k_seconds: float | None) -> str:
    import keras

    from embedstore.backbones import load_backbone
    from embedstore.pipeline import Resizer, decode_image

    files = sorted(images_root.glob("*/train-*.png"))
    files = files[:: max(1, len(files) // n)][:n]
    classes = sorted({f.parent.name for f in files})
    y = np.array([classes.index(f.parent.name) for f in files])
    bb = load_backbone("mobilenet_v2")
    resizer = Resizer(bb.input_size, bb.crop_fraction)

    # the tutorials: all images in RAM, frozen backbone inside model.fit
    t = time.perf_counter()
    images = resizer.batch([decode_image(f.read_bytes()) for f in files])
    load_s = time.perf_counter() - t
    bb.model.trainable = False
    model = keras.Sequential([keras.Input((224, 224, 3)), bb.model,
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dropout(0.2),
                              keras.layers.Dense(len(classes), activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    t = time.perf_counter()
    model.fit(images, y, epochs=epochs, batch_size=32, verbose=0)
    tutorial_s = time.perf_counter() - t

    # ours: extraction once, then the same head on the cached vectors
    t = time.perf_counter()
    vectors = np.concatenate([bb.embed(images[i:i + 32]) for i in range(0, n, 32)])
    embed_s = time.perf_counter() - t
    ours = DenseHead(**{**DENSE, "epochs": epochs})
    ours_s = time_fit(ours, vectors, y)
    rows = [[f"{n} images x {epochs} epochs, measured", f"{tutorial_s:.1f}", f"{ours_s:.2f}",
             f"**{tutorial_s / ours_s:.0f}x**", f"{embed_s:.1f} (once)"]]
    per_image_epoch = tutorial_s / (n * epochs)
    if dense_60k_seconds:
        projected = per_image_epoch * 60000 * 20
        rows.append(["60k images x 20 epochs (tutorial extrapolated, ours measured)",
                     f"{projected:.0f}", f"{dense_60k_seconds:.1f}",
                     f"**{projected / dense_60k_seconds:.0f}x**", "-"])
    note = (f"\n\nDecoding the {n} images into RAM first took {load_s:.1f} s "
            f"({images.nbytes / 1e9:.2f} GB as float32; 60k would need "
            f"{60000 * 224 * 224 * 3 * 4 / 1e9:.0f} GB).")
    return table(["experiment", "tutorial s (frozen backbone in model.fit)",
                  "embedstore head s", "speed-up", "embedstore extraction s"], rows) + note


def store_io_section(store: Path) -> str:
    import h5py

    rng = np.random.default_rng(0)
    with open_store(store) as s:
        n, dim = s.n_rows, s.dim
        t = time.perf_counter()
        full = s.embeddings()
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        sum(block.shape[0] for _, block in s.iter_embeddings(8192))
        chunked_s = time.perf_counter() - t
        rows = rng.choice(n, 10000, replace=False)
        t = time.perf_counter()
        s.embeddings(rows)
        gather_s = time.perf_counter() - t
    with h5py.File(store, "r") as f:
        ds = f["embeddings"]
        single = rng.choice(n, 1000, replace=False)
        t = time.perf_counter()
        for r in single:
            ds[int(r)]
        single_s = time.perf_counter() - t
    gb = full.nbytes / 1e9
    return table(["read", "rows", "seconds", "throughput"], [
        ["full (StoreReader.embeddings())", n, f"{full_s:.2f}", f"{gb / full_s:.2f} GB/s"],
        ["chunked (iter_embeddings, 8192 rows)", n, f"{chunked_s:.2f}",
         f"{gb / chunked_s:.2f} GB/s"],
        ["10k random rows (StoreReader.embeddings(rows))", 10000, f"{gather_s:.2f}",
         f"{10000 / gather_s:,.0f} rows/s"],
        ["1k random rows, one h5py read each", 1000, f"{single_s:.2f}",
         f"{1000 / single_s:,.0f} rows/s"],
    ]) + f"\n\nStore: {n} x {dim} float32, {Path(store).stat().st_size / 1e6:.0f} MB on disk."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=Path("/tmp/es-bench/fm-70000.h5"))
    ap.add_argument("--images", type=Path, default=Path("/tmp/es-bench/fm-all"))
    ap.add_argument("--tutorial-images", type=int, default=500)
    ap.add_argument("--tutorial-epochs", type=int, default=20)
    a = ap.parse_args()
    train, test = split_store(a.store, a.store.parent)
    heads, seconds = heads_section(train, test)
    dense_s = seconds["dense 256, 20 epochs"]
    body = ("### Train time and Fashion-MNIST test accuracy (60k train / 10k test store)\n\n"
            + heads + "\n\n### One head experiment vs the tutorials' way\n\n"
            + tutorial_section(train, a.images, a.tutorial_images, a.tutorial_epochs, dense_s)
            + "\n\n### Store I/O (70k store)\n\n" + store_io_section(a.store))
    report("Heads, accuracy and store I/O", body)


if __name__ == "__main__":
    main()
