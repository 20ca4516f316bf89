"""The head directory: the one place that writes and reads what `train` leaves behind.

  manifest.json   what the head is and what made it (HeadManifest)
  metrics.json    validation metrics of the training run
  state.npz       the head's learned arrays (numpy, loaded with allow_pickle=False)
  state.json      its learned scalars, lists and dicts
  model.keras     the dense head's network (loaded with Keras safe_mode)

Nothing here unpickles: loading a head directory cannot run code planted in
it. (Directories of embedstore <= 0.1 held a pickle, model.joblib; they are
refused with a message to retrain.)
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from embedstore.atomic import replacing_dir
from embedstore.backbones import Backbone, BackboneError
from embedstore.backbones.reference import BackboneRef, load_referenced
from embedstore.heads import HEADS, EmbeddingHead, head_kind

MANIFEST = "manifest.json"
METRICS = "metrics.json"
STATE_ARRAYS = "state.npz"
STATE_VALUES = "state.json"
FORMAT_VERSION = 2


class HeadDirError(ValueError):
    """A head directory that cannot be read or written as asked, with what to do."""


@dataclass(frozen=True)
class HeadManifest:
    """manifest.json, typed."""

    head: str  # registry name: logreg, dense, knn
    params: dict  # the effective hyper-parameters
    classes: list[str]  # output order of predict_proba
    backbone: BackboneRef
    store: str  # the training store, resolved
    split: dict  # seed, val_fraction, method
    rows_sha256: str = ""  # hash of the rows used: same store content, same hash
    n_train: int = 0
    n_val: int = 0
    duplicates_across_classes: list = field(default_factory=list)
    calibration: dict = field(default_factory=dict)  # method, temperature (calibration.py)
    files: list[str] = field(default_factory=list)
    created: str = ""
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def val_fraction(self) -> float:
        return float(self.split.get("val_fraction", 0.0))

    @property
    def seed(self) -> int:
        return int(self.split.get("seed", 0))

    def to_json(self) -> dict:
        return {**asdict(self), "params": encode_params(self.params),
                "backbone": self.backbone.as_dict()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("embedstore", "tensorflow", "keras", "scikit-learn", "numpy", "h5py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# --- writing -------------------------------------------------------------------------

def write_head_dir(out_dir: str | Path, head: EmbeddingHead, manifest: HeadManifest,
                   metrics: dict, overwrite: bool = False) -> Path:
    """Write a fitted head, its manifest and metrics into OUT_DIR.

    The directory is written beside OUT_DIR and renamed into place, so a crash
    never leaves half a head; an existing head directory is replaced only with
    `overwrite` (and anything else is never replaced).
    """
    out = Path(out_dir)
    if out.exists():
        if not (out.is_dir() and (out / MANIFEST).is_file() or _is_empty_dir(out)):
            raise HeadDirError(f"{out} exists and is not a head directory; give a new "
                               "directory for the head")
        if (out / MANIFEST).is_file() and not overwrite:
            raise HeadDirError(f"{out} already holds a trained head; pass --overwrite to "
                               "replace it, or give another directory")
    with replacing_dir(out) as tmp:
        files = _write_state(tmp, head.fitted_state())
        manifest = replace(manifest, files=files, head=head_kind(head))
        _write_json(tmp / MANIFEST, manifest.to_json())
        _write_json(tmp / METRICS, metrics)
    return out


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_scalar))


def _json_scalar(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _write_state(directory: Path, state: dict) -> list[str]:
    arrays, values, files = {}, {}, []
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise HeadDirError(f"state {name} is an object array and cannot be saved safely")
            arrays[name] = value
        elif hasattr(value, "save") and hasattr(value, "predict"):  # a Keras model
            value.save(directory / f"{name.rstrip('_')}.keras")
            files.append(f"{name.rstrip('_')}.keras")
            values[name] = {"keras_file": f"{name.rstrip('_')}.keras"}
        else:
            values[name] = encode_params({"v": value})["v"]
    np.savez(directory / STATE_ARRAYS, **arrays)
    _write_json(directory / STATE_VALUES, values)
    return [STATE_ARRAYS, STATE_VALUES, *files]


# --- JSON for hyper-parameters: tuples and non-string dict keys survive the round trip

def encode_params(params: dict) -> dict:
    def enc(v):
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x) for x in v]}
        if isinstance(v, dict):
            if all(isinstance(k, str) for k in v):
                return {k: enc(x) for k, x in v.items()}
            return {"__pairs__": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return {k: enc(v) for k, v in params.items()}


def decode_params(params: dict) -> dict:
    def dec(v):
        if isinstance(v, dict):
            if set(v) == {"__tuple__"}:
                return tuple(dec(x) for x in v["__tuple__"])
            if set(v) == {"__pairs__"}:
                return {dec(k): dec(x) for k, x in v["__pairs__"]}
            return {k: dec(x) for k, x in v.items()}
        if isinstance(v, list):
            return [dec(x) for x in v]
        return v

    return {k: dec(v) for k, v in params.items()}


# --- reading -------------------------------------------------------------------------

def read_manifest(head_dir: str | Path) -> HeadManifest:
    """The head directory's manifest, checked; errors name the file."""
    path = Path(head_dir) / MANIFEST
    if not path.is_file():
        raise HeadDirError(f"{head_dir} has no {MANIFEST}; give a directory written by "
                           "`embedstore train`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HeadDirError(f"{path} is not readable JSON ({exc}); retrain the head with "
                           "`embedstore train`") from None
    if not isinstance(raw, dict):
        raise HeadDirError(f"{path} does not hold a JSON object; retrain the head")
    missing = [k for k in ("head", "params", "classes", "backbone", "store", "split")
               if k not in raw]
    if missing:
        raise HeadDirError(f"{path} lacks {', '.join(missing)}; the file is damaged or was not "
                           "written by `embedstore train`: retrain the head")
    if raw["head"] not in HEADS:
        raise HeadDirError(f"{path}: unknown head {raw['head']!r} (known: {', '.join(HEADS)})")
    classes = raw["classes"]
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, str) for c in classes)):
        raise HeadDirError(f"{path}: 'classes' must list at least two class names")
    if not isinstance(raw["params"], dict) or not isinstance(raw["split"], dict):
        raise HeadDirError(f"{path}: 'params' and 'split' must be JSON objects; retrain the head")
    try:
        backbone = BackboneRef.from_dict(raw["backbone"], path)
    except BackboneError as exc:
        raise HeadDirError(str(exc)) from None
    known = {f for f in HeadManifest.__dataclass_fields__}
    fields = {k: v for k, v in raw.items() if k in known}
    return HeadManifest(**{**fields, "params": decode_params(raw["params"]),
                           "backbone": backbone, "classes": list(classes)})


def temperature_of(manifest: HeadManifest, where: str | Path) -> float:
    """The temperature `train` fitted on the validation split, 1.0 when none was."""
    t = manifest.calibration.get("temperature", 1.0) if isinstance(manifest.calibration,
                                                                   dict) else 1.0
    try:
        t = float(t)
    except (TypeError, ValueError):
        t = float("nan")
    if not np.isfinite(t) or t <= 0:
        raise HeadDirError(f"{where}: calibration temperature {t} is not a "
                           "positive number; the file is damaged: retrain the head")
    return t


def read_metrics(head_dir: str | Path) -> dict:
    path = Path(head_dir) / METRICS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_head(head_dir: str | Path) -> EmbeddingHead:
    """The fitted head in HEAD_DIR, rebuilt from arrays and JSON (no pickle)."""
    head_dir = Path(head_dir)
    manifest = read_manifest(head_dir)
    if not (head_dir / STATE_ARRAYS).is_file():
        if (head_dir / "model.joblib").is_file():
            raise HeadDirError(f"{head_dir} was written by an older embedstore as a pickle "
                               "(model.joblib), which can run code when loaded, so it is not "
                               "loaded; retrain the head with `embedstore train`")
        raise HeadDirError(f"{head_dir} has no {STATE_ARRAYS}; retrain the head")
    try:
        with np.load(head_dir / STATE_ARRAYS, allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
        values = json.loads((head_dir / STATE_VALUES).read_text())
        for name, value in values.items():
            if isinstance(value, dict) and set(value) == {"keras_file"}:
                state[name] = _load_keras(head_dir / Path(value["keras_file"]).name)
            else:
                state[name] = decode_params({"v": value})["v"]
        cls = HEADS[manifest.head]
        return cls.from_fitted_state(manifest.params, state)
    except HeadDirError:
        raise
    except Exception as exc:  # damaged files: say which directory, never a traceback
        raise HeadDirError(f"{head_dir}: the head's files are damaged or incomplete "
                           f"({type(exc).__name__}: {exc}); retrain the head") from None


def load_head_backbone(head_dir: str | Path, named_by_user: str | None = None) -> Backbone:
    """The backbone the head in HEAD_DIR was trained on, as a Keras model. A hub:
    SavedModel is loaded only when the user names it too (see backbones.reference)."""
    manifest = read_manifest(head_dir)
    return load_referenced(manifest.backbone, named_by_user, Path(head_dir) / MANIFEST)


def _load_keras(path: Path):
    import keras

    # safe_mode refuses Lambda layers and other deserialisation that runs code
    return keras.models.load_model(path, compile=False, safe_mode=True)
