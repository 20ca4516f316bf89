"""Know your data: duplicates, train/validation leaks, likely label errors and
outliers, from the cached embeddings in one pass (no image is read again).

- Duplicates: rows with the same content hash (exact), and pairs of rows
  whose cosine is at least `threshold`, or that are each other's nearest
  neighbour with cosine at least `mutual_threshold` and a lead of `gap` over
  either one's next neighbour (a re-encoded small graphic can sit at cosine
  0.88, no higher than two distinct images reach, yet still be its
  original's nearest neighbour by a margin). Pairs are joined into groups;
  groups that cross classes or the train/validation split come first.
- Label errors: out-of-fold probabilities of the given label from a
  logistic regression fitted on the cache (cleanlab's self-confidence);
  folds keep duplicate groups together so a copy cannot vouch for itself.
- Outliers: rows whose nearest neighbours in their own class are far, in
  median absolute deviations of that class's typical distance.

Big stores search a PCA projection of the vectors (SEARCH_DIMS) for
candidates, then re-score them on the full vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np

from embedstore.similarity import normalise, top_k
from embedstore.splits import validation_mask
from embedstore.store import open_store

THRESHOLD = 0.97  # cosine at which two rows are near duplicates whatever their neighbours
MUTUAL_THRESHOLD = 0.90  # ... or when each is the other's nearest with a clear lead
GAP = 0.03
EXACT_SEARCH_ROWS = 20_000  # above this, candidates come from a PCA projection
SEARCH_DIMS = 256
QUERY_BLOCK = 1024  # with POOL_BLOCK: 64 MB of similarities at a time
POOL_BLOCK = 16384
CANDIDATES = 6  # neighbours kept per row (itself included) for re-scoring


class AuditError(ValueError):
    """The store cannot be audited as asked, with what to do about it."""


# --- the report (audit's return value, `audit --json`) ------------------------------------

class GroupMember(TypedDict):
    row: int  # in the store
    path: str
    split: str  # "train", "validation" or "unlabelled"
    label: str | None


class DuplicateGroup(TypedDict):
    exact: bool  # every member has the same content hash
    across_classes: bool
    across_split: bool  # members in both training and validation: a leak
    min_cosine: float
    classes: list[str]  # "(unlabelled)" for unlabelled members
    members: list[GroupMember]
    reason: str


class _LabelErrorRow(TypedDict):
    row: int
    given: str
    suggested: str
    p_given: float  # out-of-fold probability of the given label
    p_suggested: float
    reason: str


class LabelError(_LabelErrorRow):
    path: str
    split: str


class _OutlierRow(TypedDict):
    row: int
    label: str
    score: float  # median absolute deviations below the class's median closeness
    mean_cosine: float  # to its nearest images of its class
    reason: str


class Outlier(_OutlierRow):
    path: str
    split: str


class AuditSummary(TypedDict):
    duplicate_groups: int
    exact_duplicate_groups: int
    groups_across_classes: int
    groups_across_split: int
    rows_in_groups: int
    likely_label_errors: int
    outliers: int
    oof_accuracy: float  # NaN when no out-of-fold probabilities could be had


class AuditThresholds(TypedDict):
    threshold: float
    mutual_threshold: float
    gap: float


class AuditSplit(TypedDict):
    val_fraction: float
    seed: int


class _AuditInputs(TypedDict):
    store: str
    rows: int  # images audited (view 0)
    classes: list[str]
    thresholds: AuditThresholds
    split: AuditSplit


class AuditReport(_AuditInputs):
    """What `audit` returns: the summary counts everything, the lists are cut to `top`.
    Rows are the store's; every item has a one-line reason."""

    summary: AuditSummary
    duplicates: list[DuplicateGroup]
    label_errors: list[LabelError]
    outliers: list[Outlier]


# --- neighbours -------------------------------------------------------------------------

def search_space(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """What neighbours are searched in: X itself, or for big stores a unit-length PCA
    projection (5x fewer multiply-adds at 256 of 1280 dims), candidates only."""
    if len(X) <= EXACT_SEARCH_ROWS or X.shape[1] <= SEARCH_DIMS:
        return X
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    sample = X[np.sort(rng.choice(len(X), EXACT_SEARCH_ROWS, replace=False))]
    pca = PCA(SEARCH_DIMS, svd_solver="randomized", random_state=seed).fit(sample)
    out = np.empty((len(X), SEARCH_DIMS), np.float32)
    for a in range(0, len(X), 8192):
        out[a:a + 8192] = pca.transform(X[a:a + 8192])
    return normalise(out)


def neighbours(X: np.ndarray, query_rows: np.ndarray, k: int, space: np.ndarray | None = None,
               pool_rows: np.ndarray | None = None, content: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (cosine on the unit rows of X, row) of each query row, best first.

    Candidates are searched in `space` (X, or a projection of it) among
    `pool_rows` (default: every row, read in place, never copied), then
    re-scored on X. A row is not its own neighbour, nor is a row with the
    same `content` id (an identical file). Missing neighbours have row -1.
    """
    space = X if space is None else space
    pool = space if pool_rows is None else space[pool_rows]
    pool_rows = np.arange(len(space)) if pool_rows is None else pool_rows
    fetch = min(k + 1 + (CANDIDATES if space is not X or content is not None else 0), len(pool))
    sims = np.full((len(query_rows), k), -np.inf, np.float32)
    rows = np.full((len(query_rows), k), -1, np.int64)
    for a in range(0, len(query_rows), QUERY_BLOCK):
        q = query_rows[a:a + QUERY_BLOCK]
        blocks = ((b, pool[b:b + POOL_BLOCK]) for b in range(0, len(pool), POOL_BLOCK))
        _, idx = top_k(space[q], blocks, fetch, unit_blocks=True)
        cand = pool_rows[idx]
        s = np.einsum("qd,qkd->qk", X[q], X[cand])
        own = content[cand] == content[q][:, None] if content is not None else cand == q[:, None]
        s[own] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims[a:a + QUERY_BLOCK, :order.shape[1]] = np.take_along_axis(s, order, axis=1)
        rows[a:a + QUERY_BLOCK, :order.shape[1]] = np.take_along_axis(cand, order, axis=1)
    rows[~np.isfinite(sims)] = -1
    return sims, rows


class _Groups:
    """Union-find over row indices."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


def near_duplicate_pairs(sims: np.ndarray, rows: np.ndarray, threshold: float = THRESHOLD,
                         mutual_threshold: float = MUTUAL_THRESHOLD, gap: float = GAP,
                         content: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """(i, j, cosine) pairs, i < j, from each row's neighbours best first (row i of
    `sims`/`rows` belongs to row i; rows of one `content` count as one)."""
    content = np.arange(len(rows)) if content is None else content
    pairs: dict[tuple[int, int], float] = {}
    for i in range(len(rows)):
        for s, j in zip(sims[i], rows[i]):
            if j >= 0 and s >= threshold:
                pairs[(min(i, int(j)), max(i, int(j)))] = float(s)
    lead = sims[:, 0] - (sims[:, 1] if sims.shape[1] > 1 else -np.inf)
    for i in np.flatnonzero(sims[:, 0] >= mutual_threshold).tolist():
        j = int(rows[i, 0])
        if content[rows[j, 0]] == content[i] and min(lead[i], lead[j]) >= gap:
            pairs.setdefault((min(i, j), max(i, j)), float(sims[i, 0]))
    return [(i, j, s) for (i, j), s in sorted(pairs.items())]


def duplicate_group_ids(X: np.ndarray, sha: np.ndarray, space: np.ndarray | None = None,
                        threshold: float = THRESHOLD, mutual_threshold: float = MUTUAL_THRESHOLD,
                        gap: float = GAP) -> np.ndarray:
    """One id per row of the unit vectors X; rows of one content hash or joined by a
    near-duplicate pair share it."""
    content = np.unique(sha, return_inverse=True)[1]  # identical files share a vector
    sims, nbrs = neighbours(X, np.arange(len(X)), 3, space, content=content)
    groups = _Groups(len(X))
    first_of: dict = {}
    for r, c in enumerate(content):
        groups.union(r, first_of.setdefault(c, r))
    for i, j, _ in near_duplicate_pairs(sims, nbrs, threshold, mutual_threshold, gap, content):
        groups.union(i, j)
    return groups.labels()


def split_leaks(store: str | Path, val_fraction: float = 0.2, seed: int = 0, **thresholds
                ) -> dict:
    """How many validation images of STORE's train/validation split have an exact or near
    duplicate among the training images (each inflates the validation figures)."""
    with open_store(store) as reader:
        rows = np.flatnonzero((reader.views == 0) & (reader.labels >= 0))
        sha, labels = reader.sha256[rows], reader.labels[rows]
        X = normalise(reader.embeddings(rows))
    split = _split_names(sha, labels, val_fraction, seed)
    group_of = duplicate_group_ids(X, sha, search_space(X, seed), **thresholds)
    in_train = np.zeros(len(X), bool)
    in_train[group_of[split == "train"]] = True
    leaking = (split == "validation") & in_train[group_of]
    return {"validation_images": int(np.sum(split == "validation")),
            "with_duplicate_in_training": int(leaking.sum())}


# --- the audit -------------------------------------------------------------------------

def audit(store: str | Path, threshold: float = THRESHOLD,
          mutual_threshold: float = MUTUAL_THRESHOLD, gap: float = GAP,
          val_fraction: float = 0.2, seed: int = 0, folds: int = 5, top: int | None = 100,
          outlier_k: int = 5) -> AuditReport:
    """Duplicate groups, likely label errors and outliers in STORE, each ranked with a
    one-line reason. `val_fraction` and `seed` name the split `train` would use;
    `top` cuts each list (None: everything)."""
    with open_store(store) as reader:
        views = reader.views
        rows = np.flatnonzero(views == 0)  # augmented views would pair with their image
        if len(rows) < 2:
            raise AuditError(f"{store} has {len(rows)} image; an audit needs at least two")
        paths, sha = reader.paths[rows], reader.sha256[rows]
        labels, classes = reader.labels[rows], reader.classes
        X = normalise(reader.embeddings(rows))  # the one copy of the vectors
    split = _split_names(sha, labels, val_fraction, seed)
    space = search_space(X, seed)
    group_of = duplicate_group_ids(X, sha, space, threshold, mutual_threshold, gap)
    info: _AuditInputs = {"store": str(store), "rows": int(len(rows)), "classes": classes,
            "thresholds": {"threshold": threshold, "mutual_threshold": mutual_threshold,
                           "gap": gap},
            "split": {"val_fraction": val_fraction, "seed": seed}}
    dups = _duplicate_groups(group_of, paths, sha, labels, classes, split, X)
    found, oof = _label_errors(X, labels, classes, group_of, folds, seed)
    # rows so far are positions among the audited rows; the report gives the store's
    errors: list[LabelError] = [{**e, "row": int(rows[e["row"]]), "path": paths[e["row"]],
                                 "split": split[e["row"]]} for e in found]
    outliers: list[Outlier] = [{**o, "row": int(rows[o["row"]]), "path": paths[o["row"]],
                                "split": split[o["row"]]}
                               for o in _outliers(X, space, labels, classes, outlier_k)]
    cut = (lambda xs: xs) if top is None else (lambda xs: xs[:top])
    for g in dups:
        for m in g["members"]:
            m["row"] = int(rows[m["row"]])
    summary: AuditSummary = {"duplicate_groups": len(dups),
               "exact_duplicate_groups": sum(g["exact"] for g in dups),
               "groups_across_classes": sum(g["across_classes"] for g in dups),
               "groups_across_split": sum(g["across_split"] for g in dups),
               "rows_in_groups": sum(len(g["members"]) for g in dups),
               "likely_label_errors": len(errors), "outliers": len(outliers),
               "oof_accuracy": oof}
    return {**info, "summary": summary, "duplicates": cut(dups),
            "label_errors": cut(errors), "outliers": cut(outliers)}


def _split_names(sha, labels, val_fraction: float, seed: int) -> np.ndarray:
    """train / validation per row as `embedstore train` splits; unlabelled rows are neither."""
    out = np.full(len(sha), "unlabelled", dtype=object)
    labelled = labels >= 0
    if labelled.any():
        is_val = validation_mask(sha[labelled], labels[labelled], val_fraction, seed)
        out[np.flatnonzero(labelled)] = np.where(is_val, "validation", "train")
    return out


def _duplicate_groups(group_of, paths, sha, labels, classes, split, X
                      ) -> list[DuplicateGroup]:
    """Groups of two or more rows, leaks and label conflicts first, each with a reason."""
    order = np.argsort(group_of, kind="stable")
    bounds = np.flatnonzero(np.diff(group_of[order])) + 1
    out: list[DuplicateGroup] = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        names = sorted({classes[y] if y >= 0 else "(unlabelled)" for y in labels[members]})
        splits = {split[m] for m in members} - {"unlabelled"}
        exact = len(set(sha[members])) == 1
        V = X[members]
        min_cos = float(np.min(V @ V.T))
        g: DuplicateGroup = {
            "exact": exact, "across_classes": len(names) > 1,
            "across_split": splits == {"train", "validation"}, "min_cosine": round(min_cos, 4),
            "classes": names,
            "members": [{"row": int(m), "path": paths[m], "split": split[m],
                         "label": classes[labels[m]] if labels[m] >= 0 else None}
                        for m in members],
            "reason": ""}  # said below, from the rest
        g["reason"] = _duplicate_reason(g)
        out.append(g)
    out.sort(key=lambda g: (not g["across_split"], not g["across_classes"], not g["exact"],
                            -g["min_cosine"]))
    return out


def _duplicate_reason(g: DuplicateGroup) -> str:
    what = "identical files" if g["exact"] else f"near duplicates (cosine >= {g['min_cosine']:.3f})"
    parts = [f"{len(g['members'])} {what}"]
    if g["across_split"]:
        n_val = sum(m["split"] == "validation" for m in g["members"])
        parts.append(f"leak: {n_val} in validation, {len(g['members']) - n_val} in training")
    if g["across_classes"]:
        parts.append("labelled " + " vs ".join(g["classes"]))
    return "; ".join(parts)


def out_of_fold_proba(X: np.ndarray, labels: np.ndarray, n_classes: int,
                      groups: np.ndarray | None = None, folds: int = 5, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, proba): out-of-fold probabilities (len(rows), n_classes) of the default
    logreg head for the labelled rows of classes with two or more images. Rows of one
    `groups` id (duplicates) stay in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    from embedstore.heads import make_head

    rows = np.flatnonzero(labels >= 0)
    counts = np.bincount(labels[rows], minlength=n_classes)
    rows = rows[counts[labels[rows]] >= 2]  # a class of one image cannot be held out
    y = labels[rows]
    proba = np.zeros((len(rows), n_classes))
    present = np.unique(y)
    if len(present) < 2:
        return rows, proba
    n_splits = int(max(2, min(folds, counts[present].min())))
    cv = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    groups = np.arange(len(labels)) if groups is None else groups
    # small fits on a busy machine: OpenBLAS threads spin against each other (300 rows:
    # 7.8 s per fit with 2 threads under load, 0.19 s with one)
    with threadpool_limits(1 if len(rows) < EXACT_SEARCH_ROWS else None):
        Xr = X if len(rows) == len(X) else X[rows]  # no second copy when all are labelled
        proba[:, present] = cross_val_predict(make_head("logreg"), Xr, y, cv=cv,
                                              groups=groups[rows], method="predict_proba")
    return rows, proba


def _label_errors(X, labels, classes, group_of, folds: int, seed: int
                  ) -> tuple[list[_LabelErrorRow], float]:
    """Rows whose given label gets a low out-of-fold probability, lowest first, and the
    out-of-fold accuracy."""
    rows, proba = out_of_fold_proba(X, labels, len(classes), group_of, folds, seed)
    if not len(rows) or not proba.any():
        return [], float("nan")
    y = labels[rows]
    given = proba[np.arange(len(rows)), y]
    suggested = np.argmax(proba, axis=1)
    out: list[_LabelErrorRow] = []
    for i in np.argsort(given, kind="stable"):
        if suggested[i] == y[i]:
            continue
        out.append({"row": int(rows[i]), "given": classes[y[i]],
                    "suggested": classes[suggested[i]],
                    "p_given": round(float(given[i]), 4),
                    "p_suggested": round(float(proba[i, suggested[i]]), 4),
                    "reason": f"labelled {classes[y[i]]} (p {given[i]:.3f} out of fold) but "
                              f"looks like {classes[suggested[i]]} "
                              f"(p {proba[i, suggested[i]]:.3f})"})
    return out, round(float(np.mean(suggested == y)), 4)


def _outliers(X, space, labels, classes, k: int, min_mads: float = 3.0
              ) -> list[_OutlierRow]:
    """Rows far from their own class's nearest members, most isolated first."""
    out: list[_OutlierRow] = []
    for c, name in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if len(members) <= k + 1:
            continue
        sims, _ = neighbours(X, members, k, space, pool_rows=members)
        closeness = sims.mean(axis=1)
        median = float(np.median(closeness))
        mad = float(np.median(np.abs(closeness - median))) or 1e-6
        score = (median - closeness) / mad
        for i in np.flatnonzero(score >= min_mads):
            out.append({"row": int(members[i]), "label": name, "score": round(float(score[i]), 2),
                        "mean_cosine": round(float(closeness[i]), 4),
                        "reason": f"mean cosine to its {k} nearest {name} images "
                                  f"{closeness[i]:.3f}, {score[i]:.1f} MADs below the "
                                  f"class's median {median:.3f}"})
    out.sort(key=lambda o: -o["score"])
    return out
