"""Prediction: image files -> the head's labels and probabilities.

Files stream through the same pipeline as extraction, with the backbone
named in the head's manifest (its fingerprint must match). With a store,
images whose content is already embedded there reuse the cached vector and
the backbone is not even loaded when nothing else needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from embedstore.backbones import Backbone, BackboneError
from embedstore.backbones.runtimes import DEFAULT_RUNTIME, load_for_inference
from embedstore.heads import load_head
from embedstore.pipeline import Resizer, stream
from embedstore.sources import walk_images
from embedstore.store import open_store
from embedstore.train import TrainingError, check_backbone, read_manifest


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, folders walked recursively for images; missing paths kept (they fail)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += walk_images(p)
        else:
            out.append(p)
    return out


def head_backbone(manifest: dict, runtime: str = "keras") -> Backbone:
    """The backbone the head was trained on, refusing one whose weights differ.

    Keras by default: export needs the Keras model; predict asks for its runtime.
    """
    expected = manifest["backbone"]
    backbone = load_for_inference(expected["name"], runtime)
    if backbone.fingerprint != expected["fingerprint"]:
        raise BackboneError(
            f"backbone {expected['name']} here has fingerprint {backbone.fingerprint[:12]}, "
            f"but the head was trained on {expected['fingerprint'][:12]}; install the same "
            "weights or retrain the head")
    return backbone


def _cached_vectors(store, manifest: dict) -> tuple[dict, object]:
    """sha256 -> embedding row, for the originals (view 0) in STORE."""
    reader = open_store(store)
    check_backbone(manifest, reader.backbone, store)
    rows = {s: i for i, (s, v) in enumerate(zip(reader.sha256, reader.views)) if v == 0}
    return rows, reader


def predict(head_dir: str | Path, paths: list[str], top_k: int = 3,
            store: str | Path | None = None, batch_size: int = 32,
            backbone: Backbone | None = None, runtime: str = DEFAULT_RUNTIME) -> list[dict]:
    """One dict per file, in input order: path, label, probability, top_k, cached; or path, error."""
    manifest = read_manifest(head_dir)
    head = load_head(head_dir)
    classes = manifest["classes"]
    files = expand_paths(paths)
    if not files:
        raise TrainingError("no image files found in the given paths")
    cached_rows, reader = ({}, None) if store is None else _cached_vectors(store, manifest)
    size, crop = (manifest["backbone"]["config"]["input_size"],
                  manifest["backbone"]["config"]["crop_fraction"])
    resizer = Resizer(size, crop)
    results: list[dict] = [{} for _ in files]
    vectors: dict[int, np.ndarray] = {}
    pending: list = []

    k = max(1, min(top_k, len(classes)))

    def score() -> None:
        """Run the head on the vectors gathered so far, fill in their results."""
        if not vectors:
            return
        order = sorted(vectors)
        proba = head.predict_proba(np.stack([vectors.pop(i) for i in order]))
        for i, p in zip(order, proba):
            best = np.argsort(-p)[:k]
            results[i].update(label=classes[best[0]], probability=float(p[best[0]]),
                              top_k=[{"label": classes[j], "probability": float(p[j])}
                                     for j in best])

    def embed_pending() -> None:
        nonlocal backbone
        backbone = backbone or head_backbone(manifest, runtime)  # loaded only when needed
        emb = backbone.embed(resizer.batch([it.image for it in pending]))
        vectors.update({it.index: e for it, e in zip(pending, emb)})
        pending.clear()
        score()

    try:
        for item in stream(files, resizer, skip=lambda sha: sha in cached_rows):
            path = files[item.index]
            if item.error is not None:
                results[item.index] = {"path": path, "error": item.error}
            elif item.image is None:
                vectors[item.index] = reader.embeddings([cached_rows[item.sha256]])[0]
                results[item.index] = {"path": path, "cached": True}
                if len(vectors) >= 4096:
                    score()
            else:
                results[item.index] = {"path": path, "cached": False}
                pending.append(item)
                if len(pending) == batch_size:
                    embed_pending()
        if pending:
            embed_pending()
    finally:
        if reader is not None:
            reader.close()
    score()
    return results

