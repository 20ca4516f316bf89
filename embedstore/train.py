"""Compositions over the cache: train a head, sweep many, evaluate one.

store -> split -> head -> metrics, written to a head directory:
  model.joblib (+ model.keras for dense)   the fitted head
  manifest.json                             what it is and what made it
  metrics.json                              validation metrics
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from embedstore.evaluate import classification_metrics, plot_confusion_matrix, plot_training_curves
from embedstore.heads import DenseHead, head_kind, load_head, make_head, save_head
from embedstore.splits import conflicting_duplicates, validation_mask
from embedstore.store import open_store

MANIFEST = "manifest.json"
METRICS = "metrics.json"
TRAIN_SCORE_ROWS = 10_000


class TrainingError(ValueError):
    """The store cannot train a head as asked, with what to do about it."""


@dataclass
class Split:
    """A store's labelled rows, split by content hash."""

    store: str
    classes: list[str]
    backbone: dict
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    val_paths: np.ndarray
    rows_sha256: str
    duplicates: list[dict]
    seed: int
    val_fraction: float


def load_split(store: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Labelled rows of STORE: every view of a training image, the originals of validation."""
    with open_store(store) as s:
        labels, classes = s.labels, s.classes
        labelled = np.flatnonzero(labels >= 0)
        if len(labelled) == 0:
            raise TrainingError(f"{store} has no labelled rows; extract a folder with one "
                                "subfolder per class to train a head")
        if len(classes) < 2:
            raise TrainingError(f"{store} has {len(classes)} class ({', '.join(classes)}); "
                                "a classifier needs at least two class folders")
        all_paths = s.paths  # decoded once: it is read for the split and for the report
        sha, views, paths = s.sha256[labelled], s.views[labelled], all_paths[labelled]
        y = labels[labelled]
        is_val = validation_mask(sha, y, val_fraction, seed)
        train_rows = labelled[~is_val]
        val_rows = labelled[is_val & (views == 0)]
        for c, name in enumerate(classes):
            if not np.any(labels[train_rows] == c):
                raise TrainingError(
                    f"class {name!r} in {store} has no training rows "
                    f"({int(np.sum(y == c))} images); add images or lower --val-fraction")
        X = s.embeddings(np.concatenate([train_rows, val_rows]))
        rows_hash = hashlib.sha256()
        for part in (sha, y.astype(np.int32), views.astype(np.int16)):
            rows_hash.update(("\n".join(map(str, part))).encode())
        return Split(str(Path(store).resolve()), classes, s.backbone,
                     X[:len(train_rows)], labels[train_rows], X[len(train_rows):],
                     labels[val_rows], all_paths[val_rows], rows_hash.hexdigest(),
                     conflicting_duplicates(sha, y, paths, classes), seed, val_fraction)


def fit_and_score(split: Split, head: str, params: dict) -> tuple[object, dict]:
    """Fit one head on the split's training rows; metrics on its validation rows."""
    model = make_head(head, **params)
    start = time.perf_counter()
    # The validation rows only score: a dense head early-stops on a hold-out of its
    # own training rows, so reported validation metrics are not tuned on.
    model.fit(split.X_train, split.y_train)
    seconds = time.perf_counter() - start
    metrics = {"head": head, "params": params, "train_seconds": round(seconds, 3),
               "n_train": int(len(split.y_train)), "n_val": int(len(split.y_val))}
    # a fit diagnostic, scored on at most TRAIN_SCORE_ROWS evenly spaced rows: on all
    # 60k rows knn's brute-force search alone took longer than any head's training
    sample = slice(None, None, -(-len(split.y_train) // TRAIN_SCORE_ROWS))
    train_pred = model.predict(split.X_train[sample])
    metrics["train_accuracy"] = float(np.mean(train_pred == split.y_train[sample]))
    if len(split.y_val):
        m = classification_metrics(split.y_val, _full_proba(model, split.X_val, split.classes),
                                   split.classes)
        metrics.update({"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                        **{f"val_{k}": v for k, v in m.items() if k.startswith("top")}})
    if getattr(model, "C_", None) is not None:
        metrics["chosen_C"] = model.C_
        metrics["converged"] = model.converged_
    if isinstance(model, DenseHead):
        metrics["epochs_run"] = model.n_epochs_
    return model, metrics


def _full_proba(model, X, classes: list[str]) -> np.ndarray:
    """Probabilities over every store class (a head may have seen a subset)."""
    proba = np.zeros((len(X), len(classes)))
    proba[:, model.classes_] = model.predict_proba(X)
    return proba


def train(store: str | Path, out_dir: str | Path, head: str = "logreg",
          val_fraction: float = 0.2, seed: int = 0, **params) -> dict:
    """Train one head on STORE and write OUT_DIR; returns the metrics."""
    split = load_split(store, val_fraction, seed)
    model, metrics = fit_and_score(split, head, params)
    out = Path(out_dir)
    files = save_head(model, out)
    manifest = {
        "head": head_kind(model),
        "params": json.loads(json.dumps(model.get_params(), default=str)),
        "classes": [split.classes[c] for c in model.classes_],
        "backbone": {k: split.backbone[k] for k in ("name", "fingerprint", "dim", "config")},
        "store": split.store,
        "rows_sha256": split.rows_sha256,
        "split": {"seed": seed, "val_fraction": val_fraction, "method": "sha256(seed:content)"},
        "n_train": metrics["n_train"], "n_val": metrics["n_val"],
        "duplicates_across_classes": split.duplicates,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / METRICS).write_text(json.dumps(metrics, indent=2))
    return {**metrics, "duplicates_across_classes": len(split.duplicates)}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("embedstore", "tensorflow", "keras", "scikit-learn", "numpy", "h5py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def grid(head: str, options: dict[str, list]) -> list[tuple[str, dict]]:
    """Every combination of the given hyper-parameter values for one head."""
    keys = [k for k, v in options.items() if v]
    return [(head, dict(zip(keys, combo)))
            for combo in itertools.product(*(options[k] for k in keys))]


def sweep(store: str | Path, candidates: list[tuple[str, dict]], val_fraction: float = 0.2,
          seed: int = 0, on_result=None) -> list[dict]:
    """Fit every (head, params) on one split of STORE; best validation accuracy first."""
    split = load_split(store, val_fraction, seed)
    results = []
    for head, params in candidates:
        _, metrics = fit_and_score(split, head, params)
        results.append(metrics)
        if on_result:
            on_result(metrics)
    return sorted(results, key=lambda m: (-m.get("val_accuracy", 0), m["train_seconds"]))


def read_manifest(head_dir: str | Path) -> dict:
    path = Path(head_dir) / MANIFEST
    if not path.is_file():
        raise TrainingError(f"{head_dir} has no {MANIFEST}; give a directory written by "
                            "`embedstore train`")
    return json.loads(path.read_text())


def evaluate_head(head_dir: str | Path, store: str | Path | None = None,
                  plots: bool = True) -> dict:
    """Metrics of a trained head on its validation split, or on every labelled row of STORE."""
    manifest = read_manifest(head_dir)
    model = load_head(head_dir)
    classes = manifest["classes"]
    if store is None:
        split = load_split(manifest["store"], manifest["split"]["val_fraction"],
                           manifest["split"]["seed"])
        check_backbone(manifest, split.backbone, manifest["store"])
        X, y_names = split.X_val, [split.classes[c] for c in split.y_val]
        source = f"validation split of {manifest['store']}"
    else:
        with open_store(store) as s:
            check_backbone(manifest, s.backbone, store)
            rows = np.flatnonzero(s.labels >= 0)
            if len(rows) == 0:
                raise TrainingError(f"{store} has no labelled rows to evaluate on")
            X = s.embeddings(rows)
            y_names = [s.classes[c] for c in s.labels[rows]]
        unknown = sorted(set(y_names) - set(classes))
        if unknown:
            raise TrainingError(f"{store} has classes the head never saw: {', '.join(unknown)}; "
                                "evaluate on a store with the head's classes")
        source = f"every labelled row of {store}"
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in y_names])
    result = {"source": source, **classification_metrics(y, model.predict_proba(X), classes)}
    if plots:
        out = Path(head_dir)
        files = [plot_confusion_matrix(result["confusion_matrix"], classes,
                                       out / "confusion_matrix.png")]
        if isinstance(model, DenseHead):
            files += plot_training_curves(model.history_, out)
        result["plots"] = [str(p) for p in files]
    return result


def check_backbone(manifest: dict, store_backbone: dict, store) -> None:
    if store_backbone["fingerprint"] != manifest["backbone"]["fingerprint"]:
        raise TrainingError(
            f"{store} was made by backbone {store_backbone['name']} "
            f"({store_backbone['fingerprint'][:12]}) but the head was trained on "
            f"{manifest['backbone']['name']} ({manifest['backbone']['fingerprint'][:12]}); "
            "extract the images again with the head's backbone")
