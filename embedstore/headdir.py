"""The head directory: the one place that writes and reads what `train` leaves behind.

  manifest.json   what the head is and what made it (HeadManifest)
  metrics.json    validation metrics of the training run
  state.npz       the head's learned arrays (numpy, loaded with allow_pickle=False)
  state.json      its learned scalars, lists and dicts
  model.keras     the dense head's network (loaded with Keras safe_mode)

The manifest records a backbone directory (a fine-tuned OUT/backbone, an
int8 STORE/int8) and the store also relative to the head directory, so a
head moved or copied together with them still finds them.

Nothing here unpickles: loading a head directory cannot run code planted in
it. (Directories of embedstore <= 0.1 held a pickle, model.joblib; they are
refused with a message to retrain.)
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from embedstore.atomic import replacing_dir
from embedstore.backbones import SAVED_BACKBONE_FILE, Backbone, BackboneError
from embedstore.backbones.reference import (
    BackboneRef,
    Resolved,
    load_keras_safely,
    load_resolved,
    resolve,
)
from embedstore.heads import HEADS, head_kind
from embedstore.heads.base import EmbeddingHead

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
    # relative to the head directory ("" when not recorded: older heads, named backbones)
    backbone_path: str = ""
    store_path: str = ""

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
    writing = [out]  # the file being written, named as it will be in OUT
    try:
        with replacing_dir(out) as tmp:
            files = _write_state(tmp, head.fitted_state(), lambda n: writing.append(out / n))
            manifest = replace(manifest, files=files, head=head_kind(head),
                               **_relative_paths(manifest, out))
            for name, obj in ((MANIFEST, manifest.to_json()), (METRICS, metrics)):
                writing.append(out / name)
                _write_json(tmp / name, obj)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise HeadDirError(f"no space left on {mount_point(out)} writing {writing[-1]}; "
                           f"{out} was left as it was: free some space and train again") from None
    return out


def mount_point(path: Path) -> str:
    """The mount point of the file system `path` (or its nearest existing parent) is on."""
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def _relative_paths(manifest: HeadManifest, out: Path) -> dict:
    """The backbone directory and the store as seen from the head directory OUT."""
    paths = {}
    backbone = manifest.backbone.name
    if (not backbone.startswith(("hub:", "keras:"))
            and (Path(backbone) / SAVED_BACKBONE_FILE).is_file()):
        paths["backbone_path"] = _relative(backbone, out)
    if manifest.store and os.path.exists(manifest.store):
        paths["store_path"] = _relative(manifest.store, out)
    return paths


def _relative(target: str, out: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(out))).as_posix()


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


def _write_state(directory: Path, state: dict, writing=lambda name: None) -> list[str]:
    arrays, values, files = {}, {}, []
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise HeadDirError(f"state {name} is an object array and cannot be saved safely")
            arrays[name] = value
        elif hasattr(value, "save") and hasattr(value, "predict"):  # a Keras model
            writing(f"{name.rstrip('_')}.keras")
            value.save(directory / f"{name.rstrip('_')}.keras")
            files.append(f"{name.rstrip('_')}.keras")
            values[name] = {"keras_file": f"{name.rstrip('_')}.keras"}
        else:
            values[name] = _encode(value, name, arrays)
    writing(STATE_ARRAYS)
    np.savez(directory / STATE_ARRAYS, **arrays)  # type: ignore[arg-type]
    writing(STATE_VALUES)
    _write_json(directory / STATE_VALUES, values)
    return [STATE_ARRAYS, STATE_VALUES, *files]


# --- JSON for hyper-parameters and learned state: tuples, non-string dict keys, arrays
# and fitted scikit-learn estimators survive the round trip, with no pickle

def encode_params(params: dict) -> dict:
    return {k: _encode(v, k, None) for k, v in params.items()}


def decode_params(params: dict) -> dict:
    return {k: _decode(v, None) for k, v in params.items()}


def _encode(v, key: str, arrays: dict | None):
    """v as JSON; with `arrays`, its arrays go there under dotted keys (into state.npz)."""
    if isinstance(v, np.ndarray):
        if arrays is None:
            return v.tolist()
        if v.dtype == object:
            raise HeadDirError(f"state {key} is an object array and cannot be saved safely")
        arrays[key] = v
        return {"__array__": key}
    if _is_sklearn_estimator(v):
        params = v.get_params(deep=False)
        return {"__sklearn__": f"{type(v).__module__}:{type(v).__qualname__}",
                "params": {k: _encode(x, f"{key}.{k}", arrays) for k, x in params.items()},
                "state": {k: _encode(x, f"{key}.{k}", arrays) for k, x in vars(v).items()
                          if k not in params}}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x, f"{key}.{i}", arrays) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_encode(x, f"{key}.{i}", arrays) for i, x in enumerate(v)]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v):
            return {k: _encode(x, f"{key}.{k}", arrays) for k, x in v.items()}
        return {"__pairs__": [[_encode(k, key, arrays), _encode(x, f"{key}.{k}", arrays)]
                              for k, x in v.items()]}
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise HeadDirError(f"the head's {key} is a {type(v).__name__}, which a head directory "
                       "cannot hold without pickle (it holds arrays, plain values, Keras "
                       "models and scikit-learn estimators made of those); give the head "
                       "fitted_state() and from_fitted_state() methods that reduce it to those")


def _decode(v, arrays):
    if isinstance(v, dict):
        if set(v) == {"__array__"} and arrays is not None:
            return arrays[v["__array__"]]
        if set(v) == {"__sklearn__", "params", "state"}:
            return _sklearn_estimator(v["__sklearn__"], _decode(v["params"], arrays),
                                      _decode(v["state"], arrays))
        if set(v) == {"__tuple__"}:
            return tuple(_decode(x, arrays) for x in v["__tuple__"])
        if set(v) == {"__pairs__"}:
            return {_decode(k, arrays): _decode(x, arrays) for k, x in v["__pairs__"]}
        return {k: _decode(x, arrays) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x, arrays) for x in v]
    return v


def _is_sklearn_estimator(v) -> bool:
    module = type(v).__module__
    return (module == "sklearn" or module.startswith("sklearn.")) and hasattr(v, "get_params")


def _sklearn_estimator(name: str, params: dict, state: dict):
    """A scikit-learn estimator rebuilt from its class name, parameters and learned
    attributes. The name comes from a file, so only a class of scikit-learn's own modules
    that is an estimator is accepted: nothing else is imported."""
    import importlib

    from sklearn.base import BaseEstimator

    module, _, qualname = str(name).partition(":")
    if not re.fullmatch(r"sklearn(\.\w+)*", module) or not qualname.isidentifier():
        raise ValueError(f"{name!r} is not a scikit-learn estimator class")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator)):
        raise ValueError(f"{name!r} is not a scikit-learn estimator class")
    estimator = cls(**params)
    estimator.__dict__.update(state)
    return estimator


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
    for key in ("backbone_path", "store_path"):
        value = raw.get(key, "")
        if not isinstance(value, str) or os.path.isabs(value) or "\0" in value:
            raise HeadDirError(f"{path}: {key!r} must be a path relative to the head "
                               "directory; the file is damaged or was not written by "
                               "`embedstore train`: retrain the head")
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
            arrays = {k: npz[k] for k in npz.files}
        # the learned attributes' own arrays; the dotted keys are arrays inside a value
        state = {k: a for k, a in arrays.items() if "." not in k}
        values = json.loads((head_dir / STATE_VALUES).read_text())
        for name, value in values.items():
            if isinstance(value, dict) and set(value) == {"keras_file"}:
                state[name] = _load_keras(head_dir / Path(value["keras_file"]).name)
            else:
                state[name] = _decode(value, arrays)
        cls = HEADS[manifest.head]
        return cls.from_fitted_state(manifest.params, state)
    except HeadDirError:
        raise
    except Exception as exc:  # damaged files: say which directory, never a traceback
        raise HeadDirError(f"{head_dir}: the head's files are damaged or incomplete "
                           f"({type(exc).__name__}: {exc}); retrain the head") from None


def resolve_head_backbone(head_dir: str | Path, named_by_user: str | None = None,
                          manifest: HeadManifest | None = None) -> Resolved:
    """Which backbone the head in HEAD_DIR needs, without loading it: the user's
    --backbone (accepted when its fingerprint matches), else the backbone directory
    recorded relative to the head, else the name as recorded (backbones.reference)."""
    manifest = manifest or read_manifest(head_dir)
    beside = Path(head_dir) / manifest.backbone_path if manifest.backbone_path else None
    return resolve(manifest.backbone, named_by_user, Path(head_dir) / MANIFEST, beside)


def load_head_backbone(head_dir: str | Path, named_by_user: str | None = None,
                       runtime: str = "keras") -> Backbone:
    """The backbone the head in HEAD_DIR was trained on (see resolve_head_backbone),
    its fingerprint checked; a Keras model unless `runtime` says otherwise."""
    return load_resolved(resolve_head_backbone(head_dir, named_by_user), runtime)


def head_store(head_dir: str | Path, manifest: HeadManifest | None = None) -> str:
    """The head's training store: beside the head as recorded relative to it, else
    the path as recorded (a moved head and store still find each other)."""
    manifest = manifest or read_manifest(head_dir)
    if manifest.store_path:
        beside = Path(head_dir) / manifest.store_path
        if beside.exists():
            return str(beside.resolve())
    return manifest.store


def _load_keras(path: Path):
    # safe_mode refuses Lambda layers and other deserialisation that runs code
    try:
        return load_keras_safely(path, "retrain the head with `embedstore train`")
    except BackboneError as exc:
        raise HeadDirError(str(exc)) from None
