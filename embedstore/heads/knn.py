"""knn: cosine k nearest neighbours over the training embeddings."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from embedstore.heads import options as opt
from embedstore.heads.base import (
    CLASS_WEIGHT_CONSTRAINT,
    EmbeddingHead,
    Interval,
    StrOptions,
    class_weights,
    fit_context,
)


class KNNHead(EmbeddingHead):
    """k nearest neighbours by cosine similarity (brute force on L2-normalised rows).

    Probabilities are the (class-weighted) share of the k votes; with
    weights="distance" each vote counts by its cosine similarity.

    Parameters
    ----------
    k : int, default=10
        Neighbours that vote (fewer when fit saw fewer rows).
    weights : {"uniform", "distance"}, default="uniform"
        Equal votes, or votes weighted by similarity.
    class_weight : dict, "balanced" or None, default=None
        Multiplies each neighbour's vote by its class's weight.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in fit.
    n_features_in_ : int
        Embedding dimension seen in fit.
    X_ : ndarray of shape (n_train, n_features)
        The L2-normalised training embeddings.
    index_ : sklearn.neighbors.NearestNeighbors
        Brute-force search over `X_`.
    y_index_ : ndarray of shape (n_train,)
        Index into `classes_` of each training row.
    class_weight_ : ndarray of shape (n_classes,)
        Vote weight per class.
    k_ : int
        Neighbours actually used: min(k, n_train).
    """

    summary = "cosine nearest neighbours"
    options = (
        opt.HeadOption("--k", "k", "INTEGER", "neighbours", int),
        opt.HeadOption("--weights", "weights", "uniform|distance", "neighbour votes"),
        opt.CLASS_WEIGHT,
    )
    # the vote is a top-k over the training vectors, which no standard Keras layer computes
    nonstandard_export = "its top-k vote has no standard Keras layer"

    _parameter_constraints = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "weights": [StrOptions({"uniform", "distance"})],
        "class_weight": CLASS_WEIGHT_CONSTRAINT,
    }

    def __init__(self, k: int = 10, weights: str = "uniform", class_weight=None):
        self.k = k
        self.weights = weights
        self.class_weight = class_weight

    @staticmethod
    def _normalise(X: np.ndarray) -> np.ndarray:
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fit on embeddings X (n, d) and labels y (n,); returns self."""
        X, y = self._validate_fit_data(X, y)
        self.X_ = self._normalise(X)
        self.y_index_ = np.searchsorted(self.classes_, y)
        self.class_weight_ = class_weights(self.class_weight, y, self.classes_)
        self.k_ = int(min(self.k, len(y)))
        self.index_ = self._build_index(self.X_, self.k_)
        return self

    @staticmethod
    def _build_index(X: np.ndarray, k: int) -> NearestNeighbors:
        # brute force computes the search in bounded chunks (sklearn's working_memory)
        return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in `classes_` order."""
        X = self._normalise(self._validate_predict_data(X))
        dist, idx = self.index_.kneighbors(X)
        votes = np.ones_like(dist) if self.weights == "uniform" else 1.0 - dist ** 2 / 2
        votes = np.maximum(votes, 1e-6) * self.class_weight_[self.y_index_[idx]]
        out = np.zeros((len(idx), len(self.classes_)))
        np.add.at(out, (np.arange(len(idx))[:, None], self.y_index_[idx]), votes)
        return out / out.sum(axis=1, keepdims=True)

    def export_layer(self, dim: int, temperature: float = 1.0) -> Any:
        """A KNNVotes layer holding the normalised training vectors: the same cosine top-k
        vote, not an approximation."""
        from embedstore.heads.knn_layer import KNNVotes

        if temperature != 1.0:
            raise ValueError("a knn head's vote shares are not calibrated by a temperature")
        layer = KNNVotes(len(self.X_), dim, len(self.classes_), self.k_,
                         distance_weighted=self.weights == "distance", name="knn")
        layer.build((None, dim))
        onehot = np.eye(len(self.classes_), dtype=np.float32)[self.y_index_]
        layer.set_weights([self.X_, onehot * self.class_weight_[self.y_index_, None]])
        return layer

    def fitted_state(self) -> dict:
        state = super().fitted_state()
        del state["index_"]  # derived from X_: rebuilt on load, never saved
        return state

    @classmethod
    def from_fitted_state(cls, params: dict, state: dict) -> KNNHead:
        head = super().from_fitted_state(params, state)
        head.index_ = cls._build_index(head.X_, int(head.k_))
        return head


HEAD = KNNHead
