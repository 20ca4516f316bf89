"""The knn head as a Keras layer, for export (imports Keras: loaded by KNNHead.export_layer)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="embedstore")
class KNNVotes(keras.layers.Layer):
    """Cosine k-nearest-neighbour class probabilities, as KNNHead computes them."""

    def __init__(self, n_train: int, dim: int, n_classes: int, k: int,
                 distance_weighted: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.n_train, self.dim, self.n_classes, self.k = n_train, dim, n_classes, k
        self.distance_weighted = distance_weighted
        self.vectors = self.add_weight(shape=(n_train, dim), initializer="zeros",
                                       trainable=False, name="vectors")
        # one-hot class of each training vector, times its class weight
        self.votes = self.add_weight(shape=(n_train, n_classes), initializer="zeros",
                                     trainable=False, name="votes")

    def call(self, x):
        x = x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)
        similarity = ops.matmul(x, ops.transpose(self.vectors))
        top, idx = ops.top_k(similarity, self.k)
        weight = ops.maximum(top if self.distance_weighted else ops.ones_like(top), 1e-6)
        votes = ops.sum(ops.take(self.votes, idx, axis=0) * weight[..., None], axis=1)
        return votes / ops.sum(votes, axis=-1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "n_train": self.n_train, "dim": self.dim,
                "n_classes": self.n_classes, "k": self.k,
                "distance_weighted": self.distance_weighted}
