"""Metrics, reports and plots for a classifier's probabilities (arrays in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix,
                             f1_score, top_k_accuracy_score)


def classification_metrics(y_true, proba, classes: list[str], top_k: int = 5) -> dict:
    """Accuracy, top-k, macro F1, per-class precision/recall/F1/support, confusion matrix.

    y_true: indices into `classes`; proba: (n, len(classes)) probabilities.
    """
    y_true = np.asarray(y_true)
    labels = np.arange(len(classes))
    y_pred = np.argmax(proba, axis=1)
    k = min(top_k, len(classes) - 1) if len(classes) > 2 else 1
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes,
                                   output_dict=True, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        f"top{k}_accuracy": float(top_k_accuracy_score(y_true, proba, k=k, labels=labels))
        if len(classes) > 2 else float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "per_class": {c: {"precision": report[c]["precision"], "recall": report[c]["recall"],
                          "f1": report[c]["f1-score"], "support": int(report[c]["support"])}
                      for c in classes},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


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
    """loss.png and accuracy.png, train and validation per epoch."""
    plt = _pyplot()
    written = []
    for metric in ("loss", "accuracy"):
        if metric not in history:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], label=f"train {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], label=f"validation {metric}")
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
