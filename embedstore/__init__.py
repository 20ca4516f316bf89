"""embedstore: image transfer learning on a precomputed-embedding feature store.

The public face: everything the README's Python section uses is importable
from here (`from embedstore import extract, train, predict`). Names load on
first use, so `import embedstore` stays cheap (no TensorFlow, no
scikit-learn until a name that needs them is asked for).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_EXPORTS = {
    "extract": "embedstore.extraction",
    "ExtractResult": "embedstore.extraction",
    "open_store": "embedstore.store",
    "open_writer": "embedstore.store",
    "compact": "embedstore.store",
    "merge_stores": "embedstore.store",
    "verify": "embedstore.store",
    "StoreError": "embedstore.store",
    "load_split": "embedstore.splits",
    "Split": "embedstore.splits",
    "HEADS": "embedstore.heads",
    "make_head": "embedstore.heads",
    "EmbeddingHead": "embedstore.heads.base",
    "LogRegHead": "embedstore.heads.logreg",
    "DenseHead": "embedstore.heads.dense",
    "KNNHead": "embedstore.heads.knn",
    "train": "embedstore.training",
    "sweep": "embedstore.training",
    "TrainResult": "embedstore.training",
    "HeadMetrics": "embedstore.training",
    "load_head": "embedstore.headdir",
    "evaluate_head": "embedstore.evaluate",
    "Evaluation": "embedstore.evaluate",
    "predict": "embedstore.prediction",
    "Prediction": "embedstore.prediction",
    "export": "embedstore.exporting",
    "finetune": "embedstore.finetuning",
    "FinetuneReport": "embedstore.finetuning",
    "similar": "embedstore.similarity",
    "SimilarResult": "embedstore.similarity",
    "audit": "embedstore.auditing",
    "AuditReport": "embedstore.auditing",
    "load_backbone": "embedstore.backbones",
    "load_for_inference": "embedstore.backbones.runtimes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'embedstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once is enough
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
