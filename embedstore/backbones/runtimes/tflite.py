"""The tflite runtime: TFLite fp32 on XNNPACK, the default on a CPU.

TensorFlow uses a CPU poorly on MobileNetV2's small convolutions; the same
graph on TFLite's XNNPACK kernels is several times faster with the same
embeddings (BENCHMARKS.md). So the Keras model is converted once with TF's own converter
(`from_keras_model`: converting a concrete function leaves variables
uninitialised, which gives NaN), checked against the Keras model on a probe
batch, and cached as a .tflite file with a JSON sidecar holding the Keras
model's fingerprint. The fingerprint is of weights + config, not of the
runtime, so stores made by either runtime are interchangeable; and the
sidecar lets a later run load the default backbone with no TensorFlow at all.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from embedstore.backbones import Backbone, load_backbone
from embedstore.backbones.runtimes import Runtime
from embedstore.quiet import native_output_silenced

TFLITE_FORMAT = 2  # bump when the conversion changes, to invalidate cached .tflite files
MAX_ABS_DIFF = 1e-4  # a conversion further than this from the Keras model is not used


def load(name: str, say: Callable[[str], None], threads: int | None = None) -> Backbone:
    """The backbone `name` converted to TFLite (once, then cached), or on keras (said) when
    it cannot be converted faithfully."""
    if name == "mobilenet_v2":  # its cache key is known without building the model
        path = _mobilenet_v2_tflite_path()
        cached = _cached_backbone(path, None, threads)
        if cached is not None:
            say(f"loading {name} (tflite on CPU)...")
            return cached
    say(f"loading {name} (keras, to convert to tflite once)...")
    keras_backbone = load_backbone(name)
    if name != "mobilenet_v2":
        path = _cache_dir() / "tflite" / f"{keras_backbone.fingerprint[:24]}.tflite"
        cached = _cached_backbone(path, keras_backbone.fingerprint, threads)
        if cached is not None:
            return cached
    try:
        meta = convert_to_tflite(keras_backbone, path)
    except ConversionError as exc:
        say(f"{name} cannot run on tflite ({exc}); running it on keras")
        return keras_backbone
    return _tflite_backbone(path, meta, threads)


RUNTIME = Runtime("tflite", "TFLite fp32 on XNNPACK, the fast way on a CPU (converted once and "
                            "cached; the same embeddings within 1e-4)", load)


class ConversionError(Exception):
    """A backbone TFLite cannot run faithfully; the caller falls back to Keras."""


def convert_to_tflite(backbone: Backbone, path: Path) -> dict:
    """Convert a Keras backbone to `path` (+ sidecar), verified on a probe batch."""
    import keras
    import tensorflow as tf

    if not isinstance(backbone.model, keras.Model):
        raise ConversionError("not a Keras model")
    try:
        with native_output_silenced():  # the converter prints a SavedModel listing and absl lines
            flatbuffer = tf.lite.TFLiteConverter.from_keras_model(backbone.model).convert()
    except Exception as exc:
        raise ConversionError(f"{type(exc).__name__}: {str(exc)[:100]}") from None
    size = backbone.input_size
    probe = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    diff = float(np.max(np.abs(TFLiteRunner(flatbuffer)(probe) - backbone.embed(probe))))
    if not diff <= MAX_ABS_DIFF:  # also catches NaN
        raise ConversionError(f"converted model differs by {diff:.2g} from the Keras one")
    meta = {"format": TFLITE_FORMAT, "name": backbone.name, "fingerprint": backbone.fingerprint,
            "dim": backbone.dim, "input_size": size, "crop_fraction": backbone.crop_fraction,
            "preprocessing": backbone.preprocessing, "weights_source": backbone.weights_source,
            "max_abs_diff_vs_keras": diff, "tensorflow": tf.__version__}
    _atomic_write(path, flatbuffer)
    _atomic_write(_sidecar(path), json.dumps(meta, indent=2).encode())  # last: marks it complete
    return meta


class TFLiteRunner:
    """A .tflite embedding model: (B, S, S, 3) float32 pixels -> (B, dim) float32.

    One single-threaded interpreter per core, each fed one image per invoke
    and taking the next image of the batch as it finishes one: XNNPACK's
    threads wait for each other on every layer, so one 1-thread interpreter
    per core beats one interpreter with a thread per core, and batches above
    1 are slower still (bench/bench_tflite_layout.py, BENCHMARKS.md).
    `invoke` releases the GIL, so plain threads run the interpreters in
    parallel; each interpreter is only ever used by one call at a time.
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        self.path = None if isinstance(model, bytes) else Path(model)  # what int8 quantizes
        self._interpreters = [_Interpreter(model) for _ in range(threads or os.cpu_count() or 1)]
        self.dim = self._interpreters[0].dim
        self._pool = ThreadPoolExecutor(len(self._interpreters), thread_name_prefix="tflite")
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for interpreter in self._interpreters:
            self._free.put(interpreter)

    def __call__(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Pixels as one (B, S, S, 3) array or as B (S, S, 3) images: each is copied
        straight into an interpreter's input, so a list is never stacked."""
        out = np.empty((len(pixels), self.dim), np.float32)
        if len(pixels) == 1:  # no hand-off for a single image
            self._run(pixels, out, itertools.count())
            return out
        # every interpreter takes the next image until none is left: no half of a batch
        # waits for the other when a decode thread slows one interpreter down
        indices = itertools.count()  # next() on it is atomic under the GIL
        workers = [self._pool.submit(self._run, pixels, out, indices)
                   for _ in range(min(len(pixels), len(self._interpreters)))]
        for done in workers:
            done.result()
        return out

    def _run(self, pixels, out: np.ndarray, indices: Iterator[int]) -> None:
        interpreter = self._free.get()  # callers in several threads may share the runner
        try:
            while (i := next(indices)) < len(pixels):
                out[i] = interpreter(pixels[i])
        finally:
            self._free.put(interpreter)


class _Interpreter:
    """One single-threaded interpreter, batch 1 (never re-allocated for a short batch)."""

    def __init__(self, model: str | Path | bytes):
        interpreter = _interpreter_class()
        source = ({"model_content": model} if isinstance(model, bytes)
                  else {"model_path": str(model)})
        with native_output_silenced():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            self._interpreter = interpreter(**source, num_threads=1)
            inp = self._interpreter.get_input_details()[0]
            self._input = inp["index"]
            self._output = self._interpreter.get_output_details()[0]["index"]
            self._interpreter.resize_tensor_input(self._input, [1, *inp["shape"][1:]])
            self._interpreter.allocate_tensors()
        self.dim = int(self._interpreter.get_output_details()[0]["shape"][-1])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One (S, S, 3) image (any layout, e.g. a grey image's broadcast view) -> (dim,)."""
        self._interpreter.tensor(self._input)()[0] = image  # one copy, into the input itself
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[0]


def _tflite_backbone(path: Path, meta: dict, threads: int | None) -> Backbone:
    return Backbone(meta["name"], TFLiteRunner(path, threads), meta["input_size"], meta["dim"],
                    meta["preprocessing"], crop_fraction=meta["crop_fraction"],
                    weights_source=meta["weights_source"], fingerprint=meta["fingerprint"],
                    runtime="tflite", numpy_model=True)


def _interpreter_class():
    """ai-edge-litert's Interpreter (tf.lite's is deprecated), else tf.lite's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def _cache_dir() -> Path:
    from embedstore.backbones import mobilenet_v2

    return mobilenet_v2.cache_dir()


def _mobilenet_v2_tflite_path() -> Path:
    from embedstore.backbones import mobilenet_v2 as m

    return (_cache_dir() / f"mobilenet_v2-{m.CHECKPOINT_SHA256[:12]}-port{m.PORT_VERSION}"
                           f"-tflite{TFLITE_FORMAT}.tflite")


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _cached_backbone(path: Path, fingerprint: str | None, threads: int | None) -> Backbone | None:
    """The cached conversion at `path`, or None if missing or damaged (then it is rebuilt)."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        if meta.get("format") != TFLITE_FORMAT or fingerprint not in (None, meta["fingerprint"]):
            return None
        return _tflite_backbone(path, meta, threads)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
