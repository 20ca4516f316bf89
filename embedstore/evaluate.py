"""Metrics, reports and plots for a classifier's probabilities (arrays in), and
`evaluate_head`, which scores a head directory on its validation split or a test store."""

from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    top_k_accuracy_score,
)

TOP_K = 5  # top5_accuracy: reported only with more classes, where it is not trivially 1


class ClassMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class ClassificationMetrics(TypedDict):
    """What classification_metrics returns (and evaluate prints as JSON)."""

    n: int
    accuracy: float
    top5_accuracy: NotRequired[float]  # more than TOP_K classes only
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    classes: list[str]


class Evaluation(ClassificationMetrics):
    """What evaluate_head returns."""

    source: str  # what was scored: a head's validation split, or a test store
    near_duplicate_leaks: NotRequired[int]  # validation images with a copy in training
    plots: NotRequired[list[str]]


def classification_metrics(y_true, proba, classes: list[str]) -> ClassificationMetrics:
    """Accuracy, top-5 (more than 5 classes), macro F1, per-class precision/recall/F1/support,
    confusion matrix.

    y_true: indices into `classes`; proba: (n, len(classes)) probabilities.
    """
    y_true = np.asarray(y_true)
    labels = np.arange(len(classes))
    y_pred = np.argmax(proba, axis=1)
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes,
                                   output_dict=True, zero_division=0)
    out = ClassificationMetrics(
        n=int(len(y_true)),
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                zero_division=0)),
        per_class={c: ClassMetrics(precision=report[c]["precision"],
                                   recall=report[c]["recall"], f1=report[c]["f1-score"],
                                   support=int(report[c]["support"])) for c in classes},
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        classes=list(classes))
    if len(classes) > TOP_K:
        out["top5_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=TOP_K,
                                                          labels=labels))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix, classes: list[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=classes).plot(
        ax=ax, xticks_rotation=45, colorbar=False, values_format="d")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_training_curves(history: dict, out_dir: str | Path) -> list[Path]:
    """loss.png and accuracy.png per epoch: the training rows, and the early-stopping hold-out.

    A dense head's "val_*" history is the hold-out it carves from its own
    training rows to stop early on, not the validation split that
    metrics.json scores; the legend and title say so.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    written = []
    for metric in ("loss", "accuracy"):
        if metric not in history:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], label=f"training rows {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"],
                    label=f"early-stopping hold-out {metric}")
            ax.set_title("hold-out: rows taken from the training split, "
                         "not the validation split in metrics.json", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class EvaluationError(ValueError):
    """A head cannot be evaluated as asked, with what to do about it."""


def evaluate_head(head_dir: str | Path, store: str | Path | None = None,
                  plots: bool = True) -> Evaluation:
    """Metrics of a trained head on its validation split, or on every labelled row of STORE."""
    from embedstore.auditing import split_leaks
    from embedstore.backbones.reference import BackboneRef, check_same_backbone
    from embedstore.headdir import MANIFEST, head_store, load_head, read_manifest
    from embedstore.splits import load_split
    from embedstore.store import open_store

    manifest = read_manifest(head_dir)
    manifest_file = f"{Path(head_dir) / MANIFEST}"
    model = load_head(head_dir)
    classes = manifest.classes
    if store is None:
        if manifest.val_fraction <= 0:
            raise EvaluationError(f"{head_dir} was trained with --val-fraction 0, so it has no "
                                  "validation split; give a labelled test STORE to evaluate on")
        trained_on = head_store(head_dir, manifest)  # found beside a moved head too
        if not Path(trained_on).exists():
            raise EvaluationError(f"{head_dir} was trained on {manifest.store}, which no longer "
                                  "exists; give a labelled test STORE to evaluate on")
        split = load_split(trained_on, manifest.val_fraction, manifest.seed,
                           training_rows=False)
        check_same_backbone(manifest.backbone, split.backbone, manifest_file, trained_on)
        X, y_names = split.X_val, [split.classes[c] for c in split.y_val]
        source = f"validation split of {trained_on}"
        # validation images with a copy in training inflate every figure: count them
        leaks = split_leaks(trained_on, manifest.val_fraction, manifest.seed)
    else:
        with open_store(store) as s:
            check_same_backbone(manifest.backbone, BackboneRef.from_dict(s.backbone, store),
                                manifest_file, str(store))
            rows = np.flatnonzero(s.labels >= 0)
            if len(rows) == 0:
                raise EvaluationError(f"{store} has no labelled rows to evaluate on")
            X = s.embeddings(rows)
            y_names = [s.classes[c] for c in s.labels[rows]]
        unknown = sorted(set(y_names) - set(classes))
        if unknown:
            raise EvaluationError(f"{store} has classes the head never saw: "
                                  f"{', '.join(unknown)}; evaluate on a store with the head's "
                                  "classes")
        source = f"every labelled row of {store}"
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in y_names])
    result = Evaluation(source=source, **classification_metrics(y, model.predict_proba(X),
                                                                classes))
    if store is None:
        result["near_duplicate_leaks"] = leaks["with_duplicate_in_training"]
    if plots:
        out = Path(head_dir)
        files = [plot_confusion_matrix(result["confusion_matrix"], classes,
                                       out / "confusion_matrix.png")]
        history = model.training_history()
        if history:
            files += plot_training_curves(history, out)
        result["plots"] = [str(p) for p in files]
    return result
