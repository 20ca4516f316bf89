"""Train/validation splits that follow the content, not the row order.

An image's split is decided by a hash of its content hash and the seed:
validation if it falls below the fraction. So the split is deterministic,
an image keeps its split when others are added, every augmented view of an
image lands where the image does (views share its sha256), and each class is
split in the same proportion in expectation. Small classes are nudged so
that each keeps at least one training image and, with two or more images,
one validation image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedstore.backbones.reference import BackboneRef
from embedstore.store import open_store


def hash_unit(sha: str, seed: int) -> float:
    """A uniform number in [0, 1) from a content hash and a seed."""
    digest = hashlib.sha256(f"{seed}:{sha}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def validation_mask(sha256, labels, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask over rows: True for validation rows."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), not {val_fraction}")
    sha256, labels = np.asarray(sha256, dtype=object), np.asarray(labels)
    unique_sha, inverse = np.unique(sha256, return_inverse=True)
    u = np.array([hash_unit(s, seed) for s in unique_sha])
    is_val = u < val_fraction
    if val_fraction > 0:
        for c in np.unique(labels):
            images = np.unique(inverse[labels == c])
            if len(images) >= 2 and not is_val[images].any():
                is_val[images[np.argmin(u[images])]] = True
            if is_val[images].all():
                is_val[images[np.argmax(u[images])]] = False
    return is_val[inverse]


def conflicting_duplicates(sha256, labels, paths, classes) -> list[dict]:
    """The same content stored under two or more labels (a labelling problem to report)."""
    seen: dict[str, set] = {}
    where: dict[str, list] = {}
    for s, y, p in zip(sha256, labels, paths):
        seen.setdefault(s, set()).add(int(y))
        where.setdefault(s, []).append(p)
    return [{"sha256": s, "classes": sorted(classes[y] for y in ys), "paths": sorted(set(where[s]))}
            for s, ys in seen.items() if len(ys) > 1]


@dataclass
class Split:
    """A store's labelled rows, split by content hash."""

    store: str
    classes: list[str]
    backbone: BackboneRef
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    val_paths: np.ndarray
    rows_sha256: str
    duplicates: list[dict]
    seed: int
    val_fraction: float


class SplitError(ValueError):
    """The store cannot be split for training as asked, with what to do about it."""


def load_split(store: str | Path, val_fraction: float = 0.2, seed: int = 0,
               training_rows: bool = True) -> Split:
    """Labelled rows of STORE: every view of a training image, the originals of validation.

    With training_rows=False only the validation rows are read (evaluate).
    """
    with open_store(store) as s:
        labels, classes = s.labels, s.classes
        labelled = np.flatnonzero(labels >= 0)
        if len(labelled) == 0:
            raise SplitError(f"{store} has no labelled rows; extract a folder with one "
                             "subfolder per class to train a head")
        if len(classes) < 2:
            raise SplitError(f"{store} has {len(classes)} class ({', '.join(classes)}); "
                             "a classifier needs at least two class folders")
        all_paths = s.paths  # decoded once: it is read for the split and for the report
        sha, views, paths = s.sha256[labelled], s.views[labelled], all_paths[labelled]
        y = labels[labelled]
        is_val = validation_mask(sha, y, val_fraction, seed)
        train_rows = labelled[~is_val]
        val_rows = labelled[is_val & (views == 0)]
        for c, name in enumerate(classes):
            if not np.any(labels[train_rows] == c):
                raise SplitError(
                    f"class {name!r} in {store} has no training rows "
                    f"({int(np.sum(y == c))} images); add images or lower --val-fraction")
        read = np.concatenate([train_rows, val_rows]) if training_rows else val_rows
        X = s.embeddings(read)
        broken = np.flatnonzero(~np.isfinite(X).all(axis=1))
        if len(broken):  # the writer never stores these: a shard file changed on disk
            row = int(read[broken[0]])
            raise SplitError(f"{s.shard_file_of(row)} of {store} holds {len(broken)} vectors "
                             f"with NaN or inf (first: {all_paths[row]}); the file was damaged "
                             f"after it was written: run `embedstore compact {store}` to move "
                             "it aside, then extract again to re-embed its images")
        n_train = len(train_rows) if training_rows else 0
        rows_hash = hashlib.sha256()
        for part in (sha, y.astype(np.int32), views.astype(np.int16)):
            rows_hash.update(("\n".join(map(str, part))).encode())
        backbone = BackboneRef.from_dict(s.backbone, store)
        return Split(str(Path(store).resolve()), classes, backbone,
                     X[:n_train], labels[train_rows], X[n_train:],
                     labels[val_rows], all_paths[val_rows], rows_hash.hexdigest(),
                     conflicting_duplicates(sha, y, paths, classes), seed, val_fraction)
