"""Prediction: image files -> the head's labels and probabilities.

Inputs are what `extract` takes (files, folders walked recursively, text
files of image paths), read by embedstore.sources. Files stream through the
same pipeline as extraction, with the backbone named in the head's manifest
(its fingerprint must match). With a store, images whose content is already
embedded there reuse the cached vector and the backbone is not even loaded
(or looked for) when nothing else needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import numpy as np

from embedstore.backbones import Backbone
from embedstore.backbones.reference import (
    BackboneNotFound,
    BackboneRef,
    check_same_backbone,
    load_resolved,
)
from embedstore.backbones.runtimes import DEFAULT_RUNTIME
from embedstore.calibration import apply_temperature
from embedstore.headdir import (
    MANIFEST,
    HeadManifest,
    load_head,
    read_manifest,
    resolve_head_backbone,
    temperature_of,
)
from embedstore.pipeline import Resizer, stream
from embedstore.sources import SourceError, is_image_name, scan
from embedstore.store import Reader, open_store


class PredictError(ValueError):
    """Nothing can be predicted as asked, with what to do about it."""


class ClassProbability(TypedDict):
    label: str
    probability: float


class _PredictionPath(TypedDict):
    path: str  # as given, or as found in a folder or file list


class Prediction(_PredictionPath, total=False):
    """One file's answer from `predict`: path, and either label, probability, top_k and
    cached (plus unknown with unknown_below), or error."""

    label: str | None  # None when unknown
    probability: float  # of the top class, calibrated when the head has a temperature
    top_k: list[ClassProbability]  # best first
    cached: bool  # the vector came from the store, the backbone did not run
    unknown: bool  # only with unknown_below: the top probability is below it
    error: str  # the file could not be read, or a folder left it out


def expand_paths(paths: list[str]) -> tuple[list[str], list[Prediction]]:
    """The image files `paths` name, as `extract` reads them (embedstore.sources.scan):
    images, folders (recursive), text files of image paths. Returns the files in
    order and {path, error} for what a folder left out (links leading out of it,
    unreadable folders). A missing path or a file that is neither is kept as a
    file, so that it is reported as failed."""
    files: list[str] = []
    skipped: list[Prediction] = []
    for p in paths:
        if not os.path.exists(p) or (os.path.isfile(p) and is_image_name(os.path.basename(p))):
            files.append(p)
            continue
        try:
            source = scan(p, utf8_names=False)  # no store: any name can be predicted
        except SourceError as exc:
            if os.path.isdir(p):  # no images in it, or it cannot be listed
                skipped.append({"path": p, "error": str(exc)})
            else:
                files.append(p)  # not a file list: predicted, and fails as not an image
            continue
        files += [ref.path for ref in source.images]
        skipped += [{"path": os.path.join(p, s.relpath), "error": s.reason}
                    for s in source.skipped]
    return files, skipped


def _cached_vectors(store, manifest: HeadManifest, head_dir) -> tuple[dict, Reader]:
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
            runtime: str = DEFAULT_RUNTIME, unknown_below: float | None = None
            ) -> list[Prediction]:
    """One Prediction per file, in input order: path, label, probability, top_k, cached; or path,
    error. `paths` are what `extract` takes: images, folders, text files of image
    paths. What folders left out (links leading out of them) follows, as errors.

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
    files, skipped = expand_paths([str(p) for p in paths])
    if not files:
        why = f" ({skipped[0]['error']})" if skipped else ""
        raise PredictError(f"no image files found in {', '.join(map(str, paths))}{why}")
    named = backbone if isinstance(backbone, str) else None
    built = None if isinstance(backbone, str) else backbone
    # which backbone, and whether it may be loaded, is settled before reading any file;
    # one that cannot be found matters only if an image is not in the store
    resolved = missing = None
    try:
        resolved = None if built else resolve_head_backbone(head_dir, named, manifest)
    except BackboneNotFound as exc:
        missing = exc
    cached_rows: dict = {}
    reader: Reader | None = None
    if store is not None:
        cached_rows, reader = _cached_vectors(store, manifest, head_dir)
    resizer = Resizer(manifest.backbone.input_size, manifest.backbone.crop_fraction)
    results: list[Prediction] = [{"path": f} for f in files]  # each replaced below
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
            results[i]["label"] = classes[best[0]]
            results[i]["probability"] = float(p[best[0]])
            results[i]["top_k"] = [{"label": classes[j], "probability": float(p[j])}
                                   for j in best]
            if unknown_below is not None:
                results[i]["unknown"] = bool(p[best[0]] < unknown_below)
                if results[i]["unknown"]:
                    results[i]["label"] = None

    def embed_pending() -> None:
        nonlocal built
        if built is None and missing is not None:
            raise missing
        if built is None:  # loaded only when needed
            assert resolved is not None  # resolved unless built or missing
            built = load_resolved(resolved, runtime)
        emb = built.embed([it.image for it in pending])
        vectors.update({it.index: e for it, e in zip(pending, emb)})
        pending.clear()
        score()

    try:
        for item in stream(files, resizer, skip=lambda sha: sha in cached_rows):
            path = files[item.index]
            if item.error is not None:
                results[item.index] = {"path": path, "error": item.error}
            elif item.image is None:  # known content: only a store makes that
                assert reader is not None
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
    return results + skipped

