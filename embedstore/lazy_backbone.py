"""The backbone a store recorded, loaded only when an image needs it.

An unchanged re-run of `extract` decodes nothing new and needs no model; loading
one (TensorFlow, TFLite conversion cache) is most of such a run's time. The store
records the backbone's name, fingerprint and config, which is all the writer and
the resizer need; the model is loaded at the first new image and its fingerprint
checked against the record then.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedstore.backbones import Backbone, BackboneError
from embedstore.backbones.reference import canonical_name
from embedstore.backbones.runtimes import load_for_inference
from embedstore.store import stored_backbone

NOT_LOADED = "not loaded"  # ExtractResult.runtime when no image needed the model


class LazyBackbone:
    """Quacks like the Backbone the store recorded; embed() loads the real one once."""

    def __init__(self, name: str, runtime: str, record: dict, store: str,
                 say: Callable[[str], None] | None):
        self.name, self.fingerprint, self.dim = record["name"], record["fingerprint"], record["dim"]
        self._config = record["config"]
        self.input_size = self._config["input_size"]
        self.crop_fraction = self._config["crop_fraction"]
        self.runtime = NOT_LOADED
        self.device = ""
        self._load = (name, runtime, say)
        self._store = store
        self._real: Backbone | None = None

    def config(self) -> dict:
        return self._config

    def embed(self, pixels) -> np.ndarray:
        if self._real is None:
            name, runtime, say = self._load
            real = load_for_inference(name, runtime, say=say)
            if real.fingerprint != self.fingerprint:
                raise BackboneError(
                    f"backbone {name} is not the one {self._store} was made with (fingerprint "
                    f"{real.fingerprint[:12]}, the store's {self.fingerprint[:12]}): its weights "
                    "changed; extract into a new store")
            self._real, self.runtime, self.device = real, real.runtime, real.device
            return real.embed(pixels)
        return self._real.embed(pixels)


def recorded_lazily(store: str | Path, name: str, runtime: str,
                    say: Callable[[str], None] | None) -> LazyBackbone | None:
    """A LazyBackbone when STORE exists and records backbone `name`, else None."""
    record = stored_backbone(store)
    if record is None:
        return None
    if not record.get("name") or record["name"] not in (name, canonical_name(name)):
        return None
    if not {"input_size", "crop_fraction"} <= set(record.get("config") or {}):
        return None  # an old record: load the model as before
    return LazyBackbone(name, runtime, record, str(store), say)
