"""Export: backbone + head -> one deployable model, image in, probabilities out.

OUT is always a folder, built beside it and renamed into place, holding the
model, labels.txt (one class per line, output order) and export.json (what
the inputs and outputs are). Its backbone's preprocessing (embedstore's
Preprocess layer) becomes a frozen standard Dense(3) on the channel axis, so
the .keras file loads in a Python that never imports embedstore.

The head becomes Keras layers on top of the backbone: each head gives its own
(`EmbeddingHead.export_layer`): logreg one Dense softmax with the
standardisation folded in, dense the trained Keras head itself, knn a layer
computing the same cosine top-k vote. A head whose layer is not standard Keras
(knn) exports as savedmodel or tflite, not keras.

Formats (inside OUT/):
  savedmodel  OUT itself is the SavedModel (tf.saved_model.load(OUT)); signatures
              `serving_default` (encoded JPEG/PNG/GIF/BMP bytes, shape [N]
              string) and `predict_images` (uint8 [N, H, W, 3]);
              both resize exactly as embedstore does (resize_for_backbone).
              Outputs: probabilities [N, C], label [N] string, probability [N].
  keras       model.keras, on resized pixels [N, S, S, 3] in [0, 255]
  tflite      model.tflite, the same as a TensorFlow Lite flatbuffer with one
              signature, "serving_default": input "pixels", output "probabilities"
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from embedstore.atomic import replacing_dir
from embedstore.backbones.layers import Preprocess
from embedstore.export_formats import FORMATS, MODEL_FILES
from embedstore.headdir import (
    MANIFEST,
    HeadManifest,
    load_head,
    load_head_backbone,
    read_manifest,
    temperature_of,
)
from embedstore.heads import HEADS
from embedstore.heads.base import EmbeddingHead
from embedstore.pipeline import min_decode_side, resize_for_backbone
from embedstore.quiet import native_output_silenced

EXPORT_JSON = "export.json"
LABELS = "labels.txt"


class ExportError(ValueError):
    """The head cannot be exported as asked."""


def standard_preprocess(layer: Preprocess) -> keras.layers.Dense:
    """embedstore's Preprocess as a frozen Dense(3) on the channel axis: the same
    per-channel gain and offset (and BGR swap), in a layer plain Keras knows."""
    kernel = np.zeros((3, 3), np.float32)
    for c in range(3):  # output channel c reads input channel 2 - c in BGR order
        kernel[2 - c if layer.bgr else c, c] = layer.scale / layer.std[c]
    bias = np.array([-m / s for m, s in zip(layer.mean, layer.std)], np.float32)
    dense = keras.layers.Dense(3, trainable=False, name="preprocess")
    dense.build((None, None, None, 3))
    dense.set_weights([kernel, bias])
    return dense


def standard_backbone(model: keras.Model) -> keras.Model:
    """The backbone model with its Preprocess layer (right after the input, where every
    embedstore backbone has it) replaced by standard_preprocess; weights shared."""
    found = [layer for layer in model.layers if isinstance(layer, Preprocess)]
    if not found:
        return model
    if len(found) > 1 or found[0].input is not model.inputs[0]:
        raise ExportError(f"backbone model {model.name} has its preprocessing in an "
                          "unexpected place; export needs it right after the input")
    rest = keras.Model(found[0].output, model.outputs[0], name=model.name)
    pixels = keras.Input(model.inputs[0].shape[1:], name="pixels")
    return keras.Model(pixels, rest(standard_preprocess(found[0])(pixels)), name=model.name)


def build_model(head_dir: str | Path, backbone=None,
                backbone_name: str | None = None) -> tuple[keras.Model, HeadManifest]:
    """One Keras model: resized pixels in [0, 255] -> class probabilities."""
    manifest = read_manifest(head_dir)
    backbone = backbone or load_head_backbone(head_dir, backbone_name)
    if backbone.runtime == "int8":
        raise ExportError(
            f"backbone {backbone.name} is an int8 OpenVINO model, and export composes Keras "
            "layers; export a head trained on a fp32 store (extract without --runtime int8)")
    if not isinstance(backbone.model, keras.Model):
        raise ExportError(
            f"backbone {backbone.name} is a TF-Hub SavedModel, not a Keras model, and export "
            "composes Keras layers; Keras 3 cannot hold a SavedModel as a layer (hub.KerasLayer "
            "needs Keras 2). Export needs mobilenet_v2, keras:<Application> or a saved "
            "embedstore backbone directory")
    size = backbone.input_size
    pixels = keras.Input((size, size, 3), name="pixels")
    features = standard_backbone(backbone.model)(pixels)
    temperature = temperature_of(manifest, Path(head_dir) / MANIFEST)
    probabilities = load_head(head_dir).export_layer(backbone.dim, temperature)(features)
    return keras.Model(pixels, probabilities, name="embedstore_classifier"), manifest


def _decode_jpeg_like_pillow(data, min_side: int):
    """JPEG bytes -> uint8 RGB, pixel for pixel what pipeline.decode_image gives.

    Pillow decodes with libjpeg's accurate integer IDCT (TensorFlow's default
    is the fast one: up to 18 levels off) and at the DCT scale jpeg_scale picks.
    """
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(data)
    short = tf.minimum(shape[0], shape[1])
    # jpeg_scale in graph form: how many of the scales 2, 4, 8 keep short >= min_side
    index = tf.add_n([tf.cast((short + s - 1) // s >= min_side, tf.int32) for s in (2, 4, 8)])
    return tf.switch_case(index, [
        lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
        for r in (1, 2, 4, 8)])


def _exif_orientation(data):
    """The EXIF orientation tag (1..8) of JPEG bytes, 1 when absent or unreadable.

    APP1 "Exif" sits in the first kilobytes; after it a TIFF header gives
    the byte order and IFD0, whose 12-byte entries hold tag 0x0112.
    """
    import tensorflow as tf

    head = tf.strings.substr(data, 0, 65536)
    before = tf.strings.split(tf.reshape(head, [1]), sep="Exif\x00\x00", maxsplit=1)
    found = tf.equal(before.row_lengths()[0], 2)
    tiff = tf.strings.substr(data, tf.strings.length(before[0][0]) + 6, 65536)
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(tiff, 0, 65536), tf.uint8), tf.int32)
    little = tf.equal(tf.strings.substr(tiff, 0, 2), "II")

    def read(offset, width):  # unsigned integer in the TIFF's byte order
        # clipped indices: a corrupt offset reads garbage, never fails the graph
        b = tf.gather(raw, tf.clip_by_value(offset + tf.range(width), 0, tf.size(raw) - 1))
        b = tf.cond(little, lambda: tf.reverse(b, [0]), lambda: b)
        return tf.reduce_sum(b * tf.bitwise.left_shift(1, 8 * tf.range(width - 1, -1, -1)))

    def orientation():
        ifd = read(4, 4)
        count = tf.maximum(tf.minimum(read(ifd, 2), (tf.size(raw) - ifd - 2) // 12), 0)
        entries = tf.range(count) * 12 + ifd + 2
        tags = tf.map_fn(lambda o: read(o, 2), entries)
        hit = tf.where(tf.equal(tags, 0x0112))
        return tf.cond(tf.size(hit) > 0, lambda: read(entries[hit[0][0]] + 8, 2),
                       lambda: tf.constant(1))

    enough = tf.size(raw) >= 8
    value = tf.cond(found & enough, orientation, lambda: tf.constant(1))
    return tf.where((value >= 1) & (value <= 8), value, 1)


def _apply_orientation(image, orientation):
    """What PIL.ImageOps.exif_transpose does for each orientation value."""
    import tensorflow as tf

    transpose = lambda im: tf.transpose(im, [1, 0, 2])  # noqa: E731
    return tf.switch_case(orientation - 1, [
        lambda: image,                                          # 1
        lambda: tf.reverse(image, [1]),                         # 2 mirror
        lambda: tf.reverse(image, [0, 1]),                      # 3 rotate 180
        lambda: tf.reverse(image, [0]),                         # 4 flip
        lambda: transpose(image),                               # 5 transpose
        lambda: tf.image.rot90(image, 3),                       # 6 rotate 90 clockwise
        lambda: tf.reverse(transpose(image), [0, 1]),           # 7 transverse
        lambda: tf.image.rot90(image, 1),                       # 8 rotate 90 counter-clockwise
    ])


def decode_for_export(data, size: int, crop_fraction: float):
    """Encoded bytes -> resized float pixels, in TensorFlow (for the SavedModel)."""
    import tensorflow as tf

    min_side = min_decode_side(size, crop_fraction)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    rgb = tf.cond(is_jpeg,
                  lambda: _apply_orientation(_decode_jpeg_like_pillow(data, min_side),
                                             _exif_orientation(data)),
                  lambda: _decode_other(data))
    return resize_for_backbone(rgb, size, crop_fraction)


def _decode_other(data):
    """PNG, GIF, BMP -> uint8 RGB: gray expanded, transparency on white."""
    import tensorflow as tf

    image = tf.io.decode_image(data, expand_animations=False)  # native channels, uint8
    image = tf.cast(image, tf.float32)
    channels = tf.shape(image)[-1]
    color = tf.cond(channels >= 3, lambda: image[..., :3],
                    lambda: tf.tile(image[..., :1], [1, 1, 3]))
    alpha = tf.cond(tf.equal(channels % 2, 0), lambda: image[..., -1:] / 255.0,
                    lambda: tf.ones_like(image[..., :1]))
    return tf.cast(tf.round(color * alpha + 255.0 * (1.0 - alpha)), tf.uint8)  # on white


def export(head_dir: str | Path, out: str | Path, fmt: str = "savedmodel",
           backbone=None, backbone_name: str | None = None, overwrite: bool = False) -> Path:
    """Write the folder OUT: the deployable model, labels.txt and export.json.

    OUT is built beside and renamed into place, so it is whole or absent; an
    existing non-empty OUT is refused, and replaced whole with `overwrite` only
    when it is an earlier export.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, overwrite)
    kind = read_manifest(head_dir).head
    if HEADS[kind].export_layer is EmbeddingHead.export_layer:
        raise ExportError(f"{head_dir} is a {kind} head, which has no export layer "
                          "(EmbeddingHead.export_layer); use `embedstore predict` with it, or "
                          "give the head an export_layer")
    if fmt == "keras" and HEADS[kind].nonstandard_export:
        raise ExportError(f"{head_dir} is a {kind} head: {HEADS[kind].nonstandard_export}, so "
                          "its .keras file would need embedstore to load; export it with "
                          "--format savedmodel or tflite, which load without embedstore")
    model, manifest = build_model(head_dir, backbone, backbone_name)
    classes = manifest.classes
    size, crop = manifest.backbone.input_size, manifest.backbone.crop_fraction
    with replacing_dir(out) as tmp, native_output_silenced():  # Keras and the converter
        if fmt == "savedmodel":                                  # print hundreds of lines
            _save_savedmodel(model, classes, size, crop, tmp)
        elif fmt == "keras":
            model.save(tmp / MODEL_FILES[fmt])
        else:
            (tmp / MODEL_FILES[fmt]).write_bytes(_tflite_bytes(model))
        (tmp / LABELS).write_text("\n".join(classes) + "\n")
        (tmp / EXPORT_JSON).write_text(json.dumps({
            "format": fmt, "file": MODEL_FILES[fmt], "classes": classes, "input_size": size,
            "crop_fraction": crop, "head": manifest.head,
            "backbone": manifest.backbone.as_dict(), "calibration": manifest.calibration,
            **_interface(fmt, size, len(classes))}, indent=2))
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty folder (with --overwrite: one that
    is not an earlier export, so that nothing else is ever deleted)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out} exists and is not a folder; give a new folder to export to")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} is not empty; pass --overwrite to replace an earlier export, "
                          "or give a new folder")
    if not (out / EXPORT_JSON).is_file():
        raise ExportError(f"{out} is not empty and holds no {EXPORT_JSON}, so it is not an "
                          "earlier export and --overwrite does not replace it; give a new folder")


def _interface(fmt: str, size: int, n_classes: int) -> dict:
    """What export.json says about the model's inputs and outputs, per format."""
    outputs = {"probabilities": f"float32 [N, {n_classes}], in labels.txt order"}
    if fmt == "savedmodel":
        return {"signatures": {
            "serving_default": {
                "inputs": {"images": "string [N]: encoded JPEG/PNG/GIF/BMP bytes, decoded and "
                                     "resized inside the model as embedstore does"},
                "outputs": {**outputs, "label": "string [N]", "probability": "float32 [N]"}},
            "predict_images": {
                "inputs": {"images": "uint8 [N, H, W, 3] RGB, any size, resized inside"},
                "outputs": {**outputs, "label": "string [N]", "probability": "float32 [N]"}}}}
    pixels = (f"float32 [N, {size}, {size}, 3] RGB in [0, 255], already resized as "
              "embedstore.pipeline.resize_for_backbone does")
    if fmt == "tflite":
        return {"signatures": {"serving_default": {"inputs": {"pixels": pixels},
                                                   "outputs": outputs}}}
    return {"inputs": {"pixels": pixels}, "outputs": outputs}


def _tflite_bytes(model: keras.Model) -> bytes:
    """The model as a TFLite flatbuffer whose signature names its input and output.

    from_keras_model freezes the weights (converting a concrete function or a
    SavedModel of it kept them as variables nothing initialises: NaN out); a
    dict output names the signature's output "probabilities" instead of
    "output_0" (its input is already named "pixels").
    """
    import tensorflow as tf

    named = keras.Model(model.inputs, {"probabilities": model.outputs[0]})
    return tf.lite.TFLiteConverter.from_keras_model(named).convert()


def _save_savedmodel(model, classes, size: int, crop: float, out: Path) -> None:
    import tensorflow as tf

    class Exported(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.model_variables = model.variables
            self.classes = tf.constant(classes)

        def _outputs(self, pixels):
            probabilities = self.model(pixels, training=False)
            best = tf.argmax(probabilities, axis=-1)
            return {"probabilities": probabilities,
                    "label": tf.gather(self.classes, best),
                    "probability": tf.reduce_max(probabilities, axis=-1)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve_bytes(self, images):
            pixels = tf.map_fn(lambda b: decode_for_export(b, size, crop), images,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return self._outputs(pixels)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                     name="images")])
        def serve_pixels(self, images):
            return self._outputs(resize_for_backbone(images, size, crop))

    module = Exported()
    tf.saved_model.save(module, str(out), signatures={
        "serving_default": module.serve_bytes, "predict_images": module.serve_pixels})
