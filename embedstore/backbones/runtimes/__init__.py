"""Where a frozen backbone runs for extract and predict: a registry of runtimes.

  auto    the default: keras on a visible GPU, else tflite (runtimes.auto)
  tflite  TFLite fp32 on XNNPACK, converted once and cached (runtimes.tflite)
  keras   the Keras model on TensorFlow, CPU or GPU (runtimes.keras)
  int8    OpenVINO int8 calibrated on the images being embedded (runtimes.openvino)

A runtime is a module holding `RUNTIME = Runtime(...)`: how it loads a named
backbone and, where it needs the images first (int8 calibrates on them), how
it prepares one for a store. Adding one is its module and one line in
_MODULES. The fingerprint of a backbone is of its weights and config, not of
the runtime, so vectors of tflite, keras and auto mix freely; int8 (and any
runtime that changes the vectors) makes a backbone of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedstore.backbones import Backbone, BackboneError, int8

Say = Callable[[str], None]

# name -> module holding RUNTIME; the order is the order --help lists them in
_MODULES = {
    "auto": "embedstore.backbones.runtimes.auto",
    "tflite": "embedstore.backbones.runtimes.tflite",
    "keras": "embedstore.backbones.runtimes.keras",
    "int8": "embedstore.backbones.runtimes.openvino",
}
DEFAULT_RUNTIME = "auto"


@dataclass(frozen=True)
class Runtime:
    """One place a backbone can run."""

    name: str
    summary: str  # one line for --help
    load: Callable[[str, Say, int | None], Backbone]  # (name, say, threads) -> Backbone
    # (name, preparation, say) -> Backbone, for a runtime that must see the images before
    # it can embed them (int8 calibrates on them); None: `load` is all it needs
    prepare: Callable[[str, Preparation, Say], Backbone] | None = None

    @property
    def extract_only(self) -> bool:
        """Only `extract` can start it: it needs a store's images."""
        return self.prepare is not None


@dataclass(frozen=True)
class Preparation:
    """What `extract` tells a runtime that prepares a model from the images of a store."""

    store: str  # the store, as messages name it
    recorded: str | None  # the backbone the store records (None: a new store)
    save_to: Path  # where a prepared model is kept: inside the store, so it moves with it
    images: Sequence[str]  # the image files about to be embedded, sorted
    source: str  # where they come from (recorded with the model)
    max_pixels: int


def get_runtime(name: str) -> Runtime:
    if name not in _MODULES:
        raise BackboneError(f"unknown runtime {name!r}; use one of: {', '.join(_MODULES)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # a runtime whose library is not installed here
        raise BackboneError(f"runtime {name!r} needs {exc.name or exc}, which is not "
                            "installed; install it, or choose another --runtime") from None
    runtime = getattr(module, "RUNTIME", None)
    if not isinstance(runtime, Runtime):
        raise TypeError(f"runtime {name!r}: module {_MODULES[name]} needs "
                        "RUNTIME = Runtime(...)")
    return runtime


def load_for_inference(name: str = "mobilenet_v2", runtime: str = DEFAULT_RUNTIME,
                       say: Say | None = None, threads: int | None = None) -> Backbone:
    """The backbone `name` on `runtime`, for embedding only (no ImageNet classifier).

    `say` gets one line about what is happening while the model loads (which runtime
    and device, converting once, falling back to keras). An int8 backbone directory
    runs on OpenVINO whatever the runtime asked.
    """
    say = say or (lambda message: None)
    chosen = get_runtime(runtime)
    if int8.is_int8_dir(name):
        return get_runtime("int8").load(name, say, threads)
    return chosen.load(name, say, threads)


def load_for_store(name: str, runtime: str, preparation: Preparation,
                   say: Say | None = None) -> Backbone:
    """The backbone `extract` embeds a store's images with: what the runtime prepares from
    them (int8), or what it loads."""
    say = say or (lambda message: None)
    chosen = get_runtime(runtime)
    if chosen.prepare is not None and not int8.is_int8_dir(name):
        return chosen.prepare(name, preparation, say)
    return load_for_inference(name, runtime, say)


def runtime_choices(extract: bool = False) -> list[str]:
    """The --runtime choices: every registered runtime (`predict` leaves out the ones only
    `extract` can start)."""
    return [n for n in _MODULES if extract or not _described(n)[1]]


def runtime_help(extract: bool = False) -> str:
    """What --runtime says: each choice's summary, from the registry."""
    return "; ".join(f"{n}: {_described(n)[0]}" for n in runtime_choices(extract)) + "."


def _described(name: str) -> tuple[str, bool]:
    """(summary, extract_only) of a runtime, for help: one whose library is missing is
    still listed (choosing it says what to install)."""
    try:
        runtime = get_runtime(name)
    except BackboneError as exc:
        return f"unavailable here ({exc})", False
    return runtime.summary, runtime.extract_only
