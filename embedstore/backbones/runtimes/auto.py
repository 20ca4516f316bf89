"""The auto runtime, the default: a GPU batch job uses the GPU, a CPU uses TFLite.

Where TensorFlow sees a GPU, the Keras model runs there, in mixed precision
(float16 compute, float32 weights) when that keeps every probe embedding
within cosine MIXED_MIN_COSINE of float32 (then its vectors are the
backbone's, same fingerprint), else in float32. Elsewhere it is the tflite
runtime. Finding out must not cost a CPU machine TensorFlow's import
(seconds): cheap checks come first (an NVIDIA driver, CUDA_VISIBLE_DEVICES),
and TensorFlow is asked only where a GPU could be.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from embedstore.backbones import Backbone, load_backbone
from embedstore.backbones.runtimes import Runtime, Say, tflite

MIXED_MIN_COSINE = 0.9999


def gpu_possible() -> bool:
    """Whether this machine could have a GPU TensorFlow can use (no TensorFlow import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False  # GPUs hidden on purpose
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def visible_gpus() -> list[str]:
    """The GPUs TensorFlow sees; [] without importing it when none could be there."""
    if not gpu_possible():
        return []
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def load(name: str, say: Say, threads: int | None = None) -> Backbone:
    gpus = visible_gpus()
    if not gpus:
        return tflite.load(name, say, threads)
    return on_gpu(name, say, gpus)


def on_gpu(name: str, say: Say, gpus: list[str]) -> Backbone:
    """The Keras model on the GPU: mixed precision where it keeps the vectors."""
    say(f"loading {name} (keras on {gpus[0]})...")
    fp32 = load_backbone(name)
    mixed = _mixed_precision(name)
    if mixed is not None:
        cosine = probe_cosine(fp32, mixed)
        if cosine >= MIXED_MIN_COSINE and mixed.fingerprint == fp32.fingerprint:
            say(f"{name}: mixed precision on {gpus[0]} (min cosine {cosine:.5f} to float32)")
            mixed.device = gpus[0]
            return mixed
        say(f"{name}: float32 on {gpus[0]} (mixed precision moved vectors to cosine "
            f"{cosine:.5f}, under {MIXED_MIN_COSINE})")
    fp32.device = gpus[0]
    return fp32


def _mixed_precision(name: str) -> Backbone | None:
    """The backbone rebuilt under Keras's mixed_float16 policy; None where it cannot be
    (a TF-Hub SavedModel keeps the dtypes it was saved with)."""
    if name.startswith("hub:"):
        return None
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return load_backbone(name)
    except Exception:
        return None
    finally:
        keras.mixed_precision.set_global_policy(previous)


def probe_cosine(reference: Backbone, candidate: Backbone) -> float:
    """The smallest cosine between the two backbones' embeddings of probe images (the
    sample photos scikit-learn ships, whole and in crops, and noise)."""
    import sklearn.datasets

    from embedstore.pipeline import Resizer, decode_image

    photos = sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    resizer = Resizer(reference.input_size, reference.crop_fraction)
    images = [decode_image(p.read_bytes()) for p in photos]
    crops = [im[: im.shape[0] // 2, : im.shape[1] // 2] for im in images]
    noise = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    pixels = resizer.batch(images + crops + list(noise))
    a, b = reference.embed(pixels), candidate.embed(pixels).astype(np.float32)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                      1e-12)
    return float(cos.min())


RUNTIME = Runtime("auto", "the default: keras on a GPU TensorFlow sees (mixed precision when "
                          "it keeps the vectors), else tflite", load)
