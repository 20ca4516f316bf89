"""The dense head's defaults vs logreg's, by 5-fold CV, across sizes; Fashion-MNIST 60k.

    python -m bench.bench_dense_defaults [--work /tmp/dense-bench]
        [--fm-store /tmp/dense-bench/fm-70000.h5]

Side by side in one run: `LogRegHead()`, `DenseHead()` (this branch's
defaults) and `DenseHead()` as on main (its heads.py, read with `git show`).

1. 5-fold stratified CV (StratifiedGroupKFold, rows grouped by content hash so
   views of one image stay in one fold) on:
   - the bundled sample `data/fashion-mnist-sample` (300 images, 10 classes)
     and stratified subsets of it (50, 150 rows);
   - a small photo set built here from the only colour photos available
     offline (scikit-image's astronaut, coffee, chelsea, rocket; scikit-learn's
     china, flower): 6 classes x 26 random square crops (20-45% of the short
     side, random position, half of them mirrored), saved as JPEG. Like a
     user's first few hundred photos: ~150 images, ~5 classes, JPEG crops of
     real scenes; easier than real categories (one scene per class);
2. With FM_STORE (train and test images in one store, as bench_extract.py
   builds): train on the 60k train rows, test accuracy on the 10k test rows;
   then the CV of 1. on stratified 1000- and 10000-row subsets of the train rows.

The stores are extracted with embedstore's own extract (the real backbone);
a re-run reuses them.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score, train_test_split

from bench.common import REPO, report, table
from embedstore import DenseHead, LogRegHead
from embedstore.store import open_store

PHOTO_CLASSES, CROPS_PER_CLASS = 6, 26


def main_dense_head(work: Path):
    """DenseHead as it is on main, for the side-by-side comparison."""
    source = subprocess.run(["git", "-C", str(REPO), "show", "main:embedstore/heads.py"],
                            check=True, capture_output=True, text=True).stdout
    path = work / "heads_main.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("heads_main", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DenseHead


def write_photo_set(root: Path, seed: int = 0) -> Path:
    import sklearn.datasets
    from skimage import data

    photos = {n: getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")}
    photos.update({n: sklearn.datasets.load_sample_image(f"{n}.jpg") for n in ("china", "flower")})
    rng = np.random.default_rng(seed)
    for name, img in photos.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        h, w = img.shape[:2]
        for i in range(CROPS_PER_CLASS):
            side = int(min(h, w) * rng.uniform(0.2, 0.45))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(img[y:y + side, x:x + side])
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / name / f"{name}-{i:03d}.jpg", quality=90)
    return root


def extracted(images: Path, store: Path) -> Path:
    from embedstore.extraction import extract

    extract(images, store)  # embeds only what the store does not hold yet
    return store


def labelled(store: Path, prefix: str | None = None):
    """(X, y, sha256) of the labelled rows, optionally only files named prefix*."""
    with open_store(store) as s:
        rows = s.labels >= 0
        if prefix is not None:
            rows &= np.char.startswith([p.rsplit("/", 1)[-1] for p in s.paths], prefix)
        rows = np.flatnonzero(rows)
        return s.embeddings(rows), s.labels[rows], s.sha256[rows]


def subset(data, n: int, seed: int = 0):
    X, y, sha = data
    if n >= len(y):
        return data
    idx, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return X[idx], y[idx], sha[idx]


def cv_accuracy(head, data) -> str:
    X, y, sha = data
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=0)
    try:
        scores = cross_val_score(head, X, y, groups=sha, cv=cv, error_score="raise")
    except ValueError as e:  # main's dense head cannot split 45 rows of 10 classes
        return f"fails ({str(e)[:60]})"
    return f"{scores.mean():.3f} ± {scores.std():.3f}"


def cv_section(sets: dict, old_dense) -> str:
    rows = []
    for name, data in sets.items():
        start = time.perf_counter()
        logreg = cv_accuracy(LogRegHead(), data)
        dense = cv_accuracy(DenseHead(), data)
        old = cv_accuracy(old_dense(), data)
        gap = float(dense.split()[0]) - float(logreg.split()[0])
        rows.append([name, len(data[1]), len(np.unique(data[1])), logreg, f"**{dense}**",
                     f"{gap:+.3f}", old, round(time.perf_counter() - start)])
        print(rows[-1], flush=True)
    return table(["data", "rows", "classes", "logreg (defaults)", "dense (new defaults)",
                  "dense - logreg", "dense (main's defaults)", "s"], rows)


def fm60k_section(fm_store: Path, old_dense) -> str:
    Xtr, ytr, _ = labelled(fm_store, "train-")
    Xte, yte, _ = labelled(fm_store, "test-")
    rows = []
    for name, head in [("dense, new defaults", DenseHead()),
                       ("dense, main's defaults", old_dense()),
                       ("dense, no early stopping (main's benchmark: 0.909)",
                        DenseHead(early_stopping=False)),
                       ("logreg (defaults)", LogRegHead())]:
        start = time.perf_counter()
        head.fit(Xtr, ytr)
        seconds = time.perf_counter() - start
        epochs = getattr(head, "n_epochs_", "-")
        rows.append([name, len(ytr), epochs, round(seconds, 1),
                     f"**{np.mean(head.predict(Xte) == yte):.4f}**"])
        print(rows[-1], flush=True)
    return table(["head", "train rows", "epochs run", "train s", "test accuracy (10k)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dense-bench"))
    ap.add_argument("--fm-store", type=Path,
                    help="70k Fashion-MNIST store (train- and test- files)")
    ap.add_argument("--skip-small", action="store_true", help="skip the sample and photo set CV")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    old_dense = main_dense_head(a.work)
    cv_title = "Dense head defaults: default dense vs default logreg, 5-fold stratified CV accuracy"
    if not a.skip_small:
        sample = labelled(extracted(REPO / "data" / "fashion-mnist-sample", a.work / "sample.h5"))
        photos = labelled(extracted(write_photo_set(a.work / "photos"), a.work / "photos.h5"))
        report(cv_title, cv_section({"photo set (crops of 6 photos)": photos,
                                     "bundled sample": sample,
                                     "bundled sample, 150-row subset": subset(sample, 150),
                                     "bundled sample, 50-row subset": subset(sample, 50)},
                                    old_dense))
    if a.fm_store:  # one section each, so a long run reports what it has measured so far
        report("Dense head defaults: Fashion-MNIST, 60k train / 10k test",
               fm60k_section(a.fm_store, old_dense))
        train = labelled(a.fm_store, "train-")
        report(cv_title + " (Fashion-MNIST train subsets)", cv_section(
            {f"Fashion-MNIST train, {n}-row subset": subset(train, n) for n in (1000, 10000)},
            old_dense))


if __name__ == "__main__":
    main()
