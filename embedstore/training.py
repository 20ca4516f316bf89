"""Compositions over the cache: fit one head, sweep many.

store -> split (embedstore.splits) -> head -> metrics, written as a head
directory by embedstore.headdir.
"""

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NotRequired

import numpy as np

from embedstore.calibration import calibrate
from embedstore.evaluate import classification_metrics
from embedstore.headdir import HeadManifest, versions, write_head_dir
from embedstore.heads import make_head
from embedstore.heads.base import EmbeddingHead, FitSummary
from embedstore.splits import Split, load_split

TRAIN_SCORE_ROWS = 10_000


class HeadMetrics(FitSummary):
    """One head fitted and scored on a split: a sweep's row, and metrics.json's core."""

    head: str
    params: dict[str, Any]  # every hyper-parameter, defaults included
    given_params: dict[str, Any]  # the ones asked for
    train_seconds: float
    n_train: int
    n_val: int
    train_accuracy: float  # on at most TRAIN_SCORE_ROWS training rows: a fit diagnostic
    val_accuracy: NotRequired[float]  # the rest need a validation split
    val_macro_f1: NotRequired[float]
    val_top5_accuracy: NotRequired[float]  # more than five classes only


class TrainResult(HeadMetrics):
    """What train returns: metrics.json, plus the count of images under two classes."""

    calibration: NotRequired[dict[str, Any]]  # temperature and ECE before / after
    duplicates_across_classes: int


def fit_and_score(split: Split, head: str, params: dict) -> tuple[EmbeddingHead, HeadMetrics]:
    """Fit one head on the split's training rows; metrics on its validation rows."""
    model = make_head(head, **params)
    start = time.perf_counter()
    # The validation rows only score: a dense head early-stops on a hold-out of its
    # own training rows, so reported validation metrics are not tuned on.
    model.fit(split.X_train, split.y_train)
    seconds = time.perf_counter() - start
    # a fit diagnostic, scored on at most TRAIN_SCORE_ROWS evenly spaced rows: on all
    # 60k rows knn's brute-force search alone took longer than any head's training
    sample = slice(None, None, -(-len(split.y_train) // TRAIN_SCORE_ROWS))
    train_pred = model.predict(split.X_train[sample])
    metrics = HeadMetrics(
        head=head, params=_plain(model.get_params()), given_params=_plain(params),
        train_seconds=round(seconds, 3), n_train=int(len(split.y_train)),
        n_val=int(len(split.y_val)),
        train_accuracy=float(np.mean(train_pred == split.y_train[sample])))
    if len(split.y_val):
        m = classification_metrics(split.y_val, full_proba(model, split.X_val, split.classes),
                                   split.classes)
        metrics["val_accuracy"], metrics["val_macro_f1"] = m["accuracy"], m["macro_f1"]
        if "top5_accuracy" in m:
            metrics["val_top5_accuracy"] = m["top5_accuracy"]
    metrics.update(model.fit_summary())
    return model, metrics


def _plain(params: dict) -> dict:
    """Hyper-parameters as JSON shows them (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def full_proba(model, X, classes: list[str]) -> np.ndarray:
    """Probabilities over every store class (a head may have seen a subset)."""
    proba = np.zeros((len(X), len(classes)))
    proba[:, model.classes_] = model.predict_proba(X)
    return proba


def train(store: str | Path, out_dir: str | Path, head: str = "logreg",
          val_fraction: float = 0.2, seed: int = 0, overwrite: bool = False,
          **params: Any) -> TrainResult:
    """Train one head on STORE and write the head directory OUT_DIR; returns the metrics."""
    split = load_split(store, val_fraction, seed)
    model, scored = fit_and_score(split, head, params)
    metrics = TrainResult(**scored, duplicates_across_classes=len(split.duplicates))
    calibration = _calibrate(model, split)
    if calibration:
        metrics["calibration"] = calibration
    manifest = HeadManifest(
        head=head, params=model.get_params(),
        classes=[split.classes[c] for c in model.classes_], backbone=split.backbone,
        store=split.store, rows_sha256=split.rows_sha256,
        split={"seed": seed, "val_fraction": val_fraction, "method": "sha256(seed:content)"},
        n_train=metrics["n_train"], n_val=metrics["n_val"],
        duplicates_across_classes=split.duplicates,
        calibration={k: calibration[k] for k in ("method", "temperature")} if calibration else {},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions())
    write_head_dir(out_dir, model, manifest, _metrics_json(metrics), overwrite=overwrite)
    return metrics


def _metrics_json(metrics: TrainResult) -> dict:
    """metrics.json: the result without the duplicate count (the manifest lists them)."""
    return {k: v for k, v in metrics.items() if k != "duplicates_across_classes"}


def _calibrate(model: EmbeddingHead, split: Split) -> dict:
    """Temperature scaling on the validation split, for a head whose probabilities are a
    softmax (`calibrated`), with the expected calibration error before and after; {} when
    the head is not one or there is nothing to fit on."""
    if not model.calibrated or len(split.y_val) < 4:
        return {}
    y = np.searchsorted(model.classes_, split.y_val)
    return calibrate(model.predict_proba(split.X_val), y, seed=split.seed)


def grid(head: str, options: dict[str, list]) -> list[tuple[str, dict]]:
    """Every combination of the given hyper-parameter values for one head."""
    keys = [k for k, v in options.items() if v]
    return [(head, dict(zip(keys, combo)))
            for combo in itertools.product(*(options[k] for k in keys))]


def sweep(store: str | Path, candidates: list[tuple[str, dict]], val_fraction: float = 0.2,
          seed: int = 0, on_result: Callable[[HeadMetrics], None] | None = None
          ) -> list[HeadMetrics]:
    """Fit every (head, params) on one split of STORE; best validation accuracy first."""
    split = load_split(store, val_fraction, seed)
    results = []
    for head, params in candidates:
        _, metrics = fit_and_score(split, head, params)
        results.append(metrics)
        if on_result:
            on_result(metrics)
    return sorted(results, key=lambda m: (-m.get("val_accuracy", 0.0), m["train_seconds"]))
