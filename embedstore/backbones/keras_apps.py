"""The `keras:<Application>[@weights.h5]` family: every keras.applications model, with
its own input size and preprocessing, as an embedder plus its ImageNet classifier."""

from __future__ import annotations

import os
from pathlib import Path

from embedstore.backbones.base import Backbone, BackboneError

PREFIX = "keras:"

# Every application keras.applications ships, with its own input size and
# preprocessing (in Preprocess terms; a test checks the table against Keras).
_TF_MODE = {"scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0], "std": [1.0, 1.0, 1.0], "bgr": False}
_CAFFE_MODE = {"scale": 1.0, "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0],
               "bgr": True}
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


def load_application(app: str, weights: str | None) -> Backbone:
    import keras

    from embedstore.backbones.layers import Preprocess

    if app not in KERAS_APPLICATIONS:
        raise BackboneError(f"unknown Keras application {app!r}; known: "
                            + ", ".join(sorted(KERAS_APPLICATIONS)))
    size, prep = KERAS_APPLICATIONS[app]
    constructor = getattr(keras.applications, app)
    local = weights is not None
    if weights is not None and not Path(weights).is_file():
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
    name = f"keras:{app}@{Path(weights).resolve()}" if weights is not None else f"keras:{app}"
    return Backbone(name, embedder, size, int(features.shape[-1]), prep,
                    crop_fraction=1.0,
                    weights_source=weights or "keras.applications (downloads imagenet weights)",
                    classifier=classifier)


def weights_cached(app: str) -> bool:
    cache = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"
    return cache.is_dir() and any(app.lower() in p.name.lower() for p in cache.iterdir())


def load(name: str) -> Backbone:
    """`keras:App` or `keras:App@/path/to/App.weights.h5`."""
    app, _, weights = name[len(PREFIX):].partition("@")
    return load_application(app, weights or None)
