"""The `hub:<handle-or-SavedModel-dir>` family: a TF-Hub image feature-vector model."""

from __future__ import annotations

import os
from pathlib import Path

from embedstore.backbones.base import Backbone, BackboneError

PREFIX = "hub:"

_HUB_PREPROCESSING = {"scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                      "bgr": False}


class _HubFeatureModel:
    """A TF-Hub image feature vector model behind our pixel [0, 255] contract."""

    def __init__(self, handle: str):
        import tensorflow_hub as hub

        from embedstore.backbones.layers import Preprocess

        self.handle = handle
        self.module = hub.load(handle)
        self.preprocess = Preprocess(**_HUB_PREPROCESSING)  # type: ignore[arg-type]
        self.variables = list(getattr(self.module, "variables", []))

    def __call__(self, pixels, training=False):
        return self.module(self.preprocess(pixels))


def load_handle(handle: str, input_size: int = 224) -> Backbone:
    import tensorflow as tf

    is_path = os.path.exists(handle)
    if not is_path and "://" not in handle and not handle.startswith(("https", "gs")):
        raise BackboneError(f"hub:{handle} is neither a SavedModel directory nor a URL")
    try:
        model = _HubFeatureModel(handle)
    except Exception as exc:
        cause = " ".join(str(exc).split())[:160] or type(exc).__name__
        advice = ("give a directory written by tf.saved_model.save" if is_path else
                  "without internet, download it elsewhere and give its local directory")
        raise BackboneError(f"hub:{handle} could not be loaded as a SavedModel ({cause}); "
                            f"{advice}") from None
    try:
        probe = model(tf.zeros([1, input_size, input_size, 3]))
    except Exception as exc:
        signatures = sorted(getattr(model.module, "signatures", {}) or {})
        cause = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise BackboneError(
            f"hub:{handle} loaded, but calling it on a [1, {input_size}, {input_size}, 3] "
            f"float image batch in [0, 1] failed ({cause}); signatures: "
            f"{', '.join(signatures) or 'none'}. embedstore needs an image feature-vector "
            "model: images in, one vector per image out") from None
    if not hasattr(probe, "shape") or len(probe.shape) != 2:
        what = (f"a dict of {', '.join(sorted(probe))}" if isinstance(probe, dict)
                else f"shape {getattr(probe, 'shape', type(probe).__name__)}")
        raise BackboneError(f"hub:{handle} returns {what}; embedstore needs an image "
                            "feature-vector model returning (batch, dim)")
    name = f"hub:{Path(handle).resolve()}" if is_path else f"hub:{handle}"
    return Backbone(name, model, input_size, int(probe.shape[-1]),
                    _HUB_PREPROCESSING, crop_fraction=1.0,
                    weights_source=handle if is_path else f"TF-Hub {handle}")


def load(name: str) -> Backbone:
    return load_handle(name[len(PREFIX):])
