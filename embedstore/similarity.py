"""Nearest neighbours by cosine, straight from a store's cache.

Exact search, one block of rows at a time (`StoreReader.iter_embeddings`),
keeping a running top-k per query: memory is one block plus k per query,
whatever the store's size. A query is a path already in the store (its
cached vector, no backbone) or an image file (hashed first: content the
store holds reuses its vector; anything else is embedded with the store's
own backbone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np

from embedstore.backbones.reference import BackboneRef, load_resolved, resolve
from embedstore.backbones.runtimes import DEFAULT_RUNTIME
from embedstore.pipeline import Resizer, stream
from embedstore.store import open_store

CHUNK_ROWS = 4096  # 20 MB blocks: 3x faster than 160 MB ones (no fresh pages per block)


class SimilarError(ValueError):
    """A query that cannot be answered, with what to do about it."""


class Neighbour(TypedDict):
    row: int  # in the store
    path: str
    similarity: float  # cosine, rounded to 6 places
    label: str | None  # None: unlabelled


class SimilarResult(TypedDict):
    """One query's answer from `similar`."""

    query: str
    # "store": a path in the store; "cached": a file whose content the store holds;
    # "embedded": a file embedded with the store's backbone
    source: Literal["store", "cached", "embedded"]
    neighbours: list[Neighbour]  # best first, the query's own row left out


def normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in place when X is float32."""
    X = np.asarray(X, dtype=np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def top_k(queries: np.ndarray, blocks, k: int, unit_blocks: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, row), each (n_queries, k) best first, over (first_row, block) pairs.

    `queries` must be unit rows; each block is normalised here unless
    `unit_blocks` says it already is. A running top-k
    (np.argpartition per block, then a merge) keeps memory at one block.
    """
    n = len(queries)
    best_s = np.full((n, 0), -np.inf, np.float32)
    best_r = np.zeros((n, 0), np.int64)
    for start, block in blocks:
        s = queries @ block.T
        if not unit_blocks:  # divide the products, not the block: one pass less over it
            s /= np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), 1e-12)
        kk = min(k, s.shape[1])
        idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.hstack([best_s, np.take_along_axis(s, idx, axis=1)])
        best_r = np.hstack([best_r, idx + start])
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_r = np.take_along_axis(best_r, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_r, order, axis=1)


def similar(store: str | Path, queries: list[str], k: int = 10, chunk_rows: int = CHUNK_ROWS,
            runtime: str = DEFAULT_RUNTIME, backbone=None) -> list[SimilarResult]:
    """The k rows of STORE most similar (cosine) to each query, best first.

    A query is a path as the store records it (its own row is left out of the
    answer) or an image file. Returns one SimilarResult per query: query,
    source ("store", "cached" or "embedded"), neighbours [{row, path,
    similarity, label}]. `backbone`: an already loaded Backbone for image queries.
    """
    if k < 1:
        raise SimilarError(f"k must be at least 1, not {k}")
    with open_store(store) as reader:
        paths, labels, classes = reader.paths, reader.labels, reader.classes
        vectors, sources, own_rows = _query_vectors(reader, store, queries, paths, runtime,
                                                    backbone)
        # views into the store's memory map, never copies: one pass over the page cache
        sims, rows = top_k(normalise(vectors), reader.iter_embeddings(chunk_rows, copy=False),
                           k + 1)
    out: list[SimilarResult] = []
    for q, src, own, s_row, r_row in zip(queries, sources, own_rows, sims, rows):
        keep = [(s, r) for s, r in zip(s_row, r_row) if r != own][:k]
        out.append({"query": q, "source": src, "neighbours": [
            {"row": int(r), "path": paths[r], "similarity": round(float(s), 6),
             "label": classes[labels[r]] if labels[r] >= 0 else None} for s, r in keep]})
    return out


def _query_vectors(reader, store, queries, paths, runtime, backbone):
    """Each query's vector, where it came from, and its own row (-1 when not in the store)."""
    # one scan for just the queried paths: a dict of a million paths costs seconds
    wanted = set(queries)
    row_of_path = {p: i for i, p in enumerate(paths) if p in wanted}
    vectors: list = [None] * len(queries)
    sources, own = [""] * len(queries), [-1] * len(queries)
    files = []
    for i, q in enumerate(queries):
        if q in row_of_path:
            own[i], sources[i] = row_of_path[q], "store"
        elif os.path.isfile(q):
            files.append(i)
        else:
            raise SimilarError(f"{q} is neither an image file nor a path in {store}; give an "
                               f"image, or a path as `embedstore info {store}` lists them")
    if files:
        row_of_sha = {s: i for i, (s, v) in enumerate(zip(reader.sha256, reader.views)) if v == 0}
        ref = BackboneRef.from_dict(reader.backbone, store)
        resizer = Resizer(ref.input_size, ref.crop_fraction)
        pending = []
        for item in stream([queries[i] for i in files], resizer,
                           skip=lambda s: s in row_of_sha):
            i = files[item.index]
            if item.error is not None:
                raise SimilarError(f"{queries[i]}: {item.error}; give a readable image")
            if item.image is None:
                own[i], sources[i] = row_of_sha[item.sha256], "cached"
            else:
                sources[i] = "embedded"
                pending.append((i, item.image))
        if pending:
            backbone = backbone or load_resolved(resolve(ref, None, store), runtime)
            for (i, _), e in zip(pending, backbone.embed([im for _, im in pending])):
                vectors[i] = e
    known = [i for i in range(len(queries)) if vectors[i] is None]
    if known:
        for i, v in zip(known, reader.embeddings([own[i] for i in known])):
            vectors[i] = v
    return np.stack(vectors).astype(np.float32), sources, own
