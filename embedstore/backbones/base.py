"""What every backbone is: the built `Backbone`, its spec, its fingerprint, its errors.

Nothing here knows a family of models: those live one module each
(mobilenet_v2, keras_apps, hub, saved, int8) behind the registry in
`embedstore.backbones`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SAVED_BACKBONE_FILE = "backbone.json"


class BackboneError(ValueError):
    """A backbone name or file that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a name stands for, known without building anything."""

    name: str
    input_size: int
    dim: int | None
    weights_source: str
    is_available: Callable[[], bool]
    loader: Callable[[], Backbone] = field(repr=False)


@dataclass
class Backbone:
    """A built backbone: model (pixels in [0, 255] -> vectors) plus its config."""

    name: str  # what load_backbone() takes to build it again
    model: Any  # a keras.Model, or a callable for TF-Hub models
    input_size: int
    dim: int
    preprocessing: dict
    crop_fraction: float
    weights_source: str
    classifier: Any = None  # pixels -> ImageNet probabilities, when the weights have it
    fingerprint: str = ""
    runtime: str = "keras"  # where it runs, as messages name it (backbones.runtimes)
    device: str = "CPU"  # where it runs: "CPU", or the GPU the auto runtime chose
    # model is a NumPy callable (a runtime's interpreter: TFLite, OpenVINO) that takes a
    # batch or a list of images; otherwise a TensorFlow model, traced once here
    numpy_model: bool = False

    def __post_init__(self):
        self._embed = self.model
        if not self.numpy_model:
            import tensorflow as tf

            size = self.input_size
            self._embed = tf.function(
                lambda x: self.model(x, training=False),
                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.model, self.config())

    def config(self) -> dict:
        """What decides the embeddings besides the weights (stored beside every vector)."""
        return {"input_size": self.input_size, "crop_fraction": self.crop_fraction,
                "preprocessing": self.preprocessing, "dim": self.dim}

    def embed(self, pixels: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(B, S, S, 3) float pixels in [0, 255] -> (B, dim) float32 embeddings.

        A list of B (S, S, 3) float32 images is taken too: the TFLite and int8
        runtimes copy each into their input directly, where stacking them first
        cost extraction of small images ~14% of its time.
        """
        if not self.numpy_model or not isinstance(pixels, list):
            pixels = np.asarray(pixels, dtype=np.float32)  # stacks a list
        return np.asarray(self._embed(pixels))

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        if self.classifier is None:
            raise BackboneError(f"backbone {self.name} has no ImageNet classifier")
        return self.classifier(np.asarray(pixels, dtype=np.float32), training=False).numpy()

    def save(self, directory: str | Path) -> Path:
        """Save as a directory that `load_backbone(directory)` reads back."""
        import keras

        if not isinstance(self.model, keras.Model):
            raise BackboneError(f"backbone {self.name} is not a Keras model and cannot be saved")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(directory / "backbone.keras")
        meta = {"based_on": self.name, "weights_source": self.weights_source, **self.config()}
        (directory / SAVED_BACKBONE_FILE).write_text(json.dumps(meta, indent=2))
        return directory


def fingerprint(model: Any, config: dict) -> str:
    """sha256 over every weight and the config: which backbone made an embedding."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for w in _weights_of(model):
        a = np.ascontiguousarray(np.asarray(w))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _weights_of(model: Any) -> list:
    if hasattr(model, "get_weights"):
        return model.get_weights()
    return [v.numpy() for v in getattr(model, "variables", [])]


def imagenet_class_names() -> list[str]:
    text = resources.files("embedstore").joinpath("data/imagenet_classes.txt").read_text()
    return text.splitlines()
