"""int8 backbones: post-training quantization with OpenVINO + NNCF, calibrated on your images.

Plain int8 in TFLite or ONNX Runtime bends MobileNetV2's vectors badly here
(min cosine to fp32 ~0.57, DESIGN.md); NNCF's quantization of the OpenVINO
model, calibrated on a few hundred images and with full bias correction,
keeps the vectors close to fp32 and embeds faster than TFLite fp32 on a CPU
with int8 instructions (BENCHMARKS.md). The calibration images are the user's own (the images an
`extract --runtime int8` is about to embed), never a fixed set, so each
quantized model is its own backbone: a directory like a fine-tuned one,

    model.xml, model.bin   the OpenVINO IR, int8 weights and quantize ops
    backbone.json          format "openvino-int8", the fp32 base it came from,
                           the config, how it was calibrated, its fidelity

whose fingerprint covers the IR bytes and the config. A store made with it
records the directory and that fingerprint, so int8 vectors never mix with
fp32 ones (or with another calibration's). Loading needs only `openvino`
(no TensorFlow); quantizing needs `nncf` too: `pip install 'embedstore[int8]'`.
The IR is a graph of standard operations; loading it runs no code from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedstore.atomic import replacing_dir
from embedstore.backbones import SAVED_BACKBONE_FILE, Backbone, BackboneError
from embedstore.quiet import native_output_silenced

FORMAT = "openvino-int8"
CALIBRATION_IMAGES = 300  # NNCF's default subset size
INSTALL = "pip install 'embedstore[int8]'"
# OpenVINO runs the layers it leaves unquantized in bf16 where the CPU has it,
# unless told otherwise; f32 keeps them as exact as the fp32 runtimes
COMPILE_CONFIG = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}


def is_int8_dir(name: str | Path) -> bool:
    """Whether `name` is a backbone directory holding a quantized model."""
    try:
        return json.loads((Path(name) / SAVED_BACKBONE_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def describe(directory: str | Path) -> dict:
    """The directory's backbone.json: base, calibration, fidelity."""
    return json.loads((Path(directory) / SAVED_BACKBONE_FILE).read_text())


class OpenVINORunner:
    """An OpenVINO model: (B, S, S, 3) float32 pixels -> (B, dim) float32.

    One image per request, requests in flight on every stream at once (the
    THROUGHPUT hint: one stream per core here), like TFLiteRunner's one
    interpreter per core. One call at a time: the request queue is shared.
    """

    def __init__(self, xml: str | Path):
        ov = _openvino()
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", COMPILE_CONFIG)
        self.dim = int(compiled.outputs[0].get_partial_shape()[-1].get_length())
        self._queue = ov.AsyncInferQueue(compiled)
        self._lock = threading.Lock()

    def __call__(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Pixels as one (B, S, S, 3) array or as B (S, S, 3) float32 images."""
        out = np.empty((len(pixels), self.dim), np.float32)

        def done(request, i: int) -> None:
            out[i] = request.get_output_tensor(0).data[0]

        with self._lock:
            self._queue.set_callback(done)
            for i in range(len(pixels)):
                self._queue.start_async({0: np.ascontiguousarray(pixels[i], np.float32)[None]}, i)
            self._queue.wait_all()
        return out


def load(directory: str | Path) -> Backbone:
    """The quantized backbone saved in `directory`."""
    directory = Path(directory)
    try:
        meta = describe(directory)
        xml = directory / "model.xml"
        runner = OpenVINORunner(xml)
        config = {k: meta[k] for k in ("input_size", "crop_fraction", "preprocessing", "dim")}
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(f"{directory} is not a readable int8 backbone ({type(exc).__name__}: "
                            f"{str(exc)[:120]}); make one with extract --runtime int8") from None
    return Backbone(str(directory.resolve()), runner, config["input_size"], config["dim"],
                    config["preprocessing"], crop_fraction=config["crop_fraction"],
                    weights_source=f"int8 of {meta['based_on']}, calibrated on "
                                   f"{meta['calibration']['images']} images",
                    fingerprint=_fingerprint(directory, config), runtime="int8",
                    numpy_model=True)


def quantize(base: Backbone, tflite_path: Path, pixels: np.ndarray, directory: str | Path,
             source: str) -> Backbone:
    """Quantize `base` (its fp32 .tflite at `tflite_path`) calibrated on `pixels`, the resized
    (N, S, S, 3) images of `source`; save it as `directory` (temp + rename) and load it."""
    nncf = _nncf()
    ov = _openvino()
    model = ov.Core().read_model(str(tflite_path))
    model.reshape([1, base.input_size, base.input_size, 3])
    calibration = nncf.Dataset([pixels[i:i + 1] for i in range(len(pixels))])
    # full bias correction: min cosine to fp32 0.967 against 0.941 with the fast one,
    # at twice the calibration time (BENCHMARKS.md)
    with native_output_silenced():  # NNCF's progress bars and notices
        quantized = nncf.quantize(model, calibration, subset_size=len(pixels),
                                  fast_bias_correction=False)
    with replacing_dir(directory) as tmp:
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)
        int8_vectors = OpenVINORunner(tmp / "model.xml")(pixels)
        meta = {"format": FORMAT, "based_on": base.name, "base_fingerprint": base.fingerprint,
                **base.config(),
                "calibration": {"images": len(pixels), "source": source,
                                "openvino": ov.__version__, "nncf": nncf.__version__},
                "fidelity": _fidelity(int8_vectors, base.embed(pixels))}
        (tmp / SAVED_BACKBONE_FILE).write_text(json.dumps(meta, indent=2))
    return load(directory)


def _fidelity(int8_vectors: np.ndarray, fp32_vectors: np.ndarray) -> dict:
    """Cosine similarity of each int8 vector to its fp32 vector: min and median."""
    cos = (int8_vectors * fp32_vectors).sum(1) / np.maximum(
        np.linalg.norm(int8_vectors, axis=1) * np.linalg.norm(fp32_vectors, axis=1), 1e-12)
    return {"min_cosine": round(float(cos.min()), 4),
            "median_cosine": round(float(np.median(cos)), 4),
            "on": "the calibration images"}


def _fingerprint(directory: Path, config: dict) -> str:
    h = hashlib.sha256(json.dumps({**config, "format": FORMAT}, sort_keys=True).encode())
    for name in ("model.xml", "model.bin"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BackboneError(f"int8 backbones run on OpenVINO, which is not installed; "
                            f"install it with: {INSTALL}") from None
    return openvino


def _nncf():
    # NNCF sends usage telemetry unless told it runs in CI (its own switch): embedstore
    # sends nothing anywhere, and without internet each attempt would only cost time
    os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf
    except ImportError:
        raise BackboneError(f"--runtime int8 quantizes with NNCF, which is not installed; "
                            f"install it with: {INSTALL}") from None
    return nncf
