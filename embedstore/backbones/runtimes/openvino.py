"""The int8 runtime: OpenVINO int8, calibrated with NNCF on the images being embedded.

Loading runs an int8 backbone directory (made by `prepare`, see
embedstore.backbones.int8); preparing one for a store reuses the model the store
records, or quantizes the fp32 backbone on up to 300 of the images about to be
embedded (spread over the sorted tree, so every class folder) and saves it
where `extract` says (inside the store).
"""

from __future__ import annotations

import numpy as np

from embedstore.backbones import Backbone, BackboneError, int8
from embedstore.backbones.reference import canonical_name
from embedstore.backbones.runtimes import Preparation, Runtime, Say, load_for_inference


def load(name: str, say: Say, threads: int | None = None) -> Backbone:
    if not int8.is_int8_dir(name):
        raise BackboneError(f"{name} is not an int8 backbone; `extract --runtime int8` makes "
                            "one calibrated on the images it embeds, then give its directory "
                            "(STORE/int8) as --backbone")
    say(f"loading {name} (openvino int8 on CPU)...")
    return int8.load(name)


def prepare(name: str, job: Preparation, say: Say) -> Backbone:
    """The quantized model the store was made with, else one calibrated on its images."""
    from embedstore.pipeline import Resizer, stream

    recorded = job.recorded
    if recorded and int8.is_int8_dir(recorded) and \
            int8.describe(recorded)["based_on"] == canonical_name(name):
        return load(recorded, say)
    if recorded:
        raise BackboneError(f"{job.store} holds vectors of backbone {recorded}; int8 vectors of "
                            f"{name} cannot be mixed with them: extract into a new store, or drop "
                            "--runtime int8")
    base = load_for_inference(name, "tflite", say=say)
    tflite_path = getattr(base.model, "path", None)
    if base.runtime != "tflite" or tflite_path is None:
        raise BackboneError(f"{name} cannot be converted to TFLite, so it cannot be quantized "
                            "to int8; use --runtime tflite or keras")
    images = list(job.images)
    picks = np.unique(np.linspace(0, len(images) - 1, min(int8.CALIBRATION_IMAGES, len(images)))
                      .round().astype(int))  # spread over the sorted tree: every class
    resizer = Resizer(base.input_size, base.crop_fraction)
    pixels = [item.image for item in stream([images[i] for i in picks], resizer,
                                            max_pixels=job.max_pixels) if item.image is not None]
    if not pixels:
        raise BackboneError(f"none of the images under {job.source} could be decoded to "
                            "calibrate the int8 model")
    say(f"calibrating int8 {name} on {len(pixels)} of your images (once per store)...")
    quantized = int8.quantize(base, tflite_path, resizer.batch(pixels), job.save_to, job.source)
    fidelity = int8.describe(quantized.name)["fidelity"]
    say(f"int8 model saved in {quantized.name}: cosine to fp32 min {fidelity['min_cosine']:.3f}, "
        f"median {fidelity['median_cosine']:.3f} on its calibration images")
    return quantized


RUNTIME = Runtime("int8", "OpenVINO int8 (model-only 1.2-1.9x tflite, end to end 0.85-1.5x; "
                          "cosine to fp32 min 0.95-0.96, median 0.98: docs/runtimes.md, "
                          "BENCHMARKS.md), calibrated once on up to 300 of the images and kept "
                          "as STORE/int8; its vectors never mix with fp32 ones (needs pip "
                          "install 'embedstore[int8]')", load, prepare)
