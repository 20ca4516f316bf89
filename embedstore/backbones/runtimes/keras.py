"""The keras runtime: the Keras model itself on TensorFlow (a GPU if it sees one)."""

from __future__ import annotations

from embedstore.backbones import Backbone, load_backbone
from embedstore.backbones.runtimes import Runtime, Say


def load(name: str, say: Say, threads: int | None = None) -> Backbone:
    say(f"loading {name} (keras)...")
    return load_backbone(name)


RUNTIME = Runtime("keras", "the Keras model on TensorFlow (uses a GPU when TensorFlow sees "
                           "one)", load)
