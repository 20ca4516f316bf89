"""int8 (OpenVINO + NNCF) against fp32 (TFLite): fidelity and head accuracy.

    python -m bench.bench_int8 [--work /tmp/es-int8] [--skip-fashion-mnist]

1. The bundled sample (300 images, 10 classes): a fp32 store and an int8
   store calibrated on the sample itself (`extract --runtime int8`); cosine
   of each int8 vector to its fp32 vector; default logreg head, 5-fold CV
   (StratifiedGroupKFold by content hash, the same folds for both).
2. Fashion-MNIST (Debian `dataset-fashion-mnist`), 60k train / 10k test as
   PNG trees: train extracted with `--runtime int8` (calibrated on 300 of the
   train images), test with `--backbone TRAIN/int8`; fp32 both with the
   default runtime. Default logreg head on train, accuracy on test; cosine
   on the test images.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score

from bench.common import REPO, report, table
from embedstore import LogRegHead
from embedstore.backbones import int8
from embedstore.extraction import extract
from embedstore.store import open_store


def fresh(store: Path) -> Path:
    for p in (store, Path(f"{store}.parts"), Path(f"{store}.lock"), Path(f"{store}.int8")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return store


def rows(store: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, labels, content hashes, paths; sorted by path so two stores line up."""
    with open_store(store) as s:
        order = np.argsort(s.paths)
        return s.embeddings()[order], s.labels[order], s.sha256[order], s.paths[order]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def extract_pair(images: Path, work: Path, name: str, int8_backbone: str | None = None) -> dict:
    """fp32 and int8 stores of IMAGES; int8 calibrated on them unless given a model."""
    out = {}
    for kind in ("fp32", "int8"):
        store = fresh(work / f"{name}-{kind}.h5")
        start = time.perf_counter()
        if kind == "fp32":
            result = extract(images, store)
        elif int8_backbone:
            result = extract(images, store, int8_backbone)
        else:
            result = extract(images, store, runtime="int8")
        out[kind] = {"store": store, "wall": time.perf_counter() - start,
                     "rate": result.images_per_second, "startup": result.startup_seconds}
    return out


def sample_section(work: Path) -> list:
    pair = extract_pair(REPO / "data" / "fashion-mnist-sample", work, "sample")
    X32, y, sha, paths = rows(pair["fp32"]["store"])
    X8, y8, _, paths8 = rows(pair["int8"]["store"])
    assert (paths == paths8).all() and (y == y8).all()
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=0)
    acc = {k: cross_val_score(LogRegHead(), X, y, groups=sha, cv=cv)
           for k, X in (("fp32", X32), ("int8", X8))}
    cos = cosine(X8, X32)
    return ["bundled sample (5-fold CV)", len(y), f"{cos.min():.3f}", f"{np.median(cos):.3f}",
            f"{acc['fp32'].mean():.3f} ± {acc['fp32'].std():.3f}",
            f"{acc['int8'].mean():.3f} ± {acc['int8'].std():.3f}",
            f"**{acc['int8'].mean() - acc['fp32'].mean():+.3f}**",
            f"{pair['fp32']['rate']:.0f} / {pair['int8']['rate']:.0f}",
            f"{pair['int8']['startup']:.1f}"]


def fashion_mnist_section(work: Path) -> list:
    from bench.fashion_mnist import write_pngs

    trees = {}
    for split in ("train", "test"):
        trees[split] = work / f"fm-{split}"
        if not trees[split].exists():
            write_pngs(trees[split], split)
    train = extract_pair(trees["train"], work, "fm-train")
    test = extract_pair(trees["test"], work, "fm-test", f"{train['int8']['store']}/int8")
    acc, cos = {}, None
    for kind in ("fp32", "int8"):
        Xtr, ytr, _, _ = rows(train[kind]["store"])
        Xte, yte, _, _ = rows(test[kind]["store"])
        acc[kind] = LogRegHead().fit(Xtr, ytr).score(Xte, yte)
    cos = cosine(rows(test["int8"]["store"])[0], rows(test["fp32"]["store"])[0])
    return ["Fashion-MNIST 60k train / 10k test", f"{len(ytr)} + {len(yte)}",
            f"{cos.min():.3f}", f"{np.median(cos):.3f}", f"{acc['fp32']:.4f}",
            f"{acc['int8']:.4f}", f"**{acc['int8'] - acc['fp32']:+.4f}**",
            f"{train['fp32']['rate']:.0f} / {train['int8']['rate']:.0f}",
            f"{train['int8']['startup']:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/es-int8"))
    ap.add_argument("--skip-fashion-mnist", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    results = [sample_section(a.work)]
    if not a.skip_fashion_mnist:
        results.append(fashion_mnist_section(a.work))
    meta = int8.describe(f"{a.work / 'sample-int8.h5'}/int8")
    body = table(["data", "images", "min cosine int8/fp32", "median cosine", "fp32 logreg acc",
                  "int8 logreg acc", "int8 - fp32", "extract img/s fp32 / int8",
                  "int8 start-up s (calibration)"], results)
    body += (f"\n\nint8: OpenVINO {meta['calibration']['openvino'].split('-')[0]}, NNCF "
             f"{meta['calibration']['nncf']}, full bias correction, calibrated on "
             "min(300, N) images of the store's own folder; fp32: TFLite on XNNPACK. Heads: "
             "embedstore's default logreg (C=0.1, 40 iterations).")
    report("int8 runtime: fidelity and head accuracy", body)


if __name__ == "__main__":
    main()
