"""Backbone directories embedstore wrote: `Backbone.save` (a fine-tuned one) or int8."""

from __future__ import annotations

import json
from pathlib import Path

from embedstore.backbones.base import SAVED_BACKBONE_FILE, Backbone, BackboneError


def load(directory: Path) -> Backbone:
    from embedstore.backbones import int8

    if int8.is_int8_dir(directory):
        return int8.load(directory)
    from embedstore.backbones import layers  # noqa: F401  registers Preprocess
    from embedstore.backbones.reference import load_keras_safely

    try:
        meta = json.loads((directory / SAVED_BACKBONE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{directory} is not a readable embedstore backbone "
                            f"({type(exc).__name__}); save one with Backbone.save") from None
    # safe mode: refuses Lambda layers and classes not registered by this package
    model = load_keras_safely(directory / "backbone.keras", "it is not a readable embedstore "
                              "backbone: save one with Backbone.save")
    return Backbone(str(directory.resolve()), model, meta["input_size"], meta["dim"],
                    meta["preprocessing"], crop_fraction=meta["crop_fraction"],
                    weights_source=str(directory))
