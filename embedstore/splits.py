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

import numpy as np


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
