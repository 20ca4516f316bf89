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

from embedstore.backbones import Backbone
from embedstore.backbones.reference import (BackboneRef, check_same_backbone, check_trusted,
                                            load_referenced)
from embedstore.backbones.runtimes import DEFAULT_RUNTIME
from embedstore.calibration import apply_temperature
from embedstore.headdir import MANIFEST, HeadManifest, load_head, read_manifest, temperature_of
from embedstore.pipeline import Resizer, stream
from embedstore.sources import walk_images
from embedstore.store import open_store


class PredictError(ValueError):
    """Nothing can be predicted as asked, with what to do about it."""


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, folders walked recursively for images; missing paths kept (they fail)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += walk_images(p)
        else:
            out.append(p)
    return out


def _cached_vectors(store, manifest: HeadManifest, head_dir) -> tuple[dict, object]:
    """sha256 -> embedding row, for the originals (view 0) in STORE."""
    reader = open_store(store)
    try:
        check_same_backbone(manifest.backbone, BackboneRef.from_dict(reader.backbone, store),
                            str(Path(head_dir) / MANIFEST), str(store))
    except BaseException:
        reader.close()
        raise
    rows = {s: i for i, (s, v) in enumerate(zip(reader.sha256, reader.views)) if v == 0}
    return rows, reader


def predict(head_dir: str | Path, paths: list[str], top_k: int = 3,
            store: str | Path | None = None, batch_size: int = 32,
            backbone: Backbone | str | None = None,
            runtime: str = DEFAULT_RUNTIME, unknown_below: float | None = None) -> list[dict]:
    """One dict per file, in input order: path, label, probability, top_k, cached; or path, error.

    Probabilities are calibrated with the temperature `train` fitted, if any.
    unknown_below: a top probability below this answers "none of these":
    label None and "unknown": True (every result then says "unknown").

    backbone: a built Backbone, or the name the user gave (required for a head
    trained on a hub: SavedModel, see backbones.reference). runtime: where a backbone
    loaded here runs (backbones.runtimes).
    """
    manifest = read_manifest(head_dir)
    head = load_head(head_dir)
    temperature = temperature_of(manifest, Path(head_dir) / MANIFEST)
    classes = manifest.classes
    files = expand_paths(paths)
    if not files:
        raise PredictError(f"no image files found in {', '.join(map(str, paths))}")
    named = backbone if isinstance(backbone, str) else None
    built = None if isinstance(backbone, str) else backbone
    if built is None:  # refuse an untrusted backbone before reading any file
        check_trusted(manifest.backbone, named, Path(head_dir) / MANIFEST)
    cached_rows, reader = (({}, None) if store is None
                           else _cached_vectors(store, manifest, head_dir))
    resizer = Resizer(manifest.backbone.input_size, manifest.backbone.crop_fraction)
    results: list[dict] = [{} for _ in files]
    vectors: dict[int, np.ndarray] = {}
    pending: list = []

    k = max(1, min(top_k, len(classes)))

    def score() -> None:
        """Run the head on the vectors gathered so far, fill in their results."""
        if not vectors:
            return
        order = sorted(vectors)
        proba = apply_temperature(head.predict_proba(np.stack([vectors.pop(i) for i in order])),
                                  temperature)
        for i, p in zip(order, proba):
            best = np.argsort(-p)[:k]
            results[i].update(label=classes[best[0]], probability=float(p[best[0]]),
                              top_k=[{"label": classes[j], "probability": float(p[j])}
                                     for j in best])
            if unknown_below is not None:
                results[i]["unknown"] = bool(p[best[0]] < unknown_below)
                if results[i]["unknown"]:
                    results[i]["label"] = None

    def embed_pending() -> None:
        nonlocal built
        built = built or load_referenced(manifest.backbone, named,  # loaded only when needed
                                         Path(head_dir) / MANIFEST, runtime)
        emb = built.embed([it.image for it in pending])
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

