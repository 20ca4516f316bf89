"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, as PNG class folders.

    python -m bench.fashion_mnist OUT_DIR [--split train|test] [--per-class N] [--offset K]

IDX files are read with NumPy (gzip + a 16/8-byte header). Zalando's
Fashion-MNIST is MIT licensed.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def load(split: str = "train", root: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images_gz = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_gz = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_gz.exists():
        raise SystemExit(f"{images_gz} not found; install it with: "
                         "apt-get install dataset-fashion-mnist")
    with gzip.open(images_gz) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_gz) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write_pngs(out: Path, split: str = "train", per_class: int | None = None,
               offset: int = 0) -> int:
    """Write class folders; returns the number of images written."""
    images, labels = load(split)
    written = 0
    for c, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == c)[offset:]
        if per_class is not None:
            idx = idx[:per_class]
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(images[i]).save(out / name / f"{split}-{i:05d}.png")
        written += len(idx)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--per-class", type=int)
    ap.add_argument("--offset", type=int, default=0)
    a = ap.parse_args()
    print(write_pngs(a.out, a.split, a.per_class, a.offset), "images written to", a.out)
