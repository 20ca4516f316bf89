"""Which backbone made a set of embeddings: one typed record, one compatibility check.

Stores, head directories and exports all record the backbone as a
`BackboneRef` (name, fingerprint, dim, config). Loading the backbone a file
names goes through `resolve` (which one, without loading: the user's
--backbone, else a directory recorded relative to the file, else the name as
recorded) and `load_resolved` (load, check the fingerprint); the trust rule
lives there.
A name read from a file (a head's manifest, a store's attributes) is loaded
on the file's word only when loading it runs no code from disk: the built-in
mobilenet_v2, a `keras:` application (this package's and Keras's code, with
weights as HDF5 arrays) and an embedstore backbone directory (a `.keras`
file, loaded in Keras safe mode, which refuses Lambda layers and unknown
classes). A `hub:` SavedModel is a TensorFlow graph that can read and write
files when called, so it is loaded only when the user names it as well
(`--backbone` on the command line); a backbone the user names is accepted
whatever its name when its fingerprint is the recorded one. Needs no
TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedstore.backbones import SAVED_BACKBONE_FILE, Backbone, BackboneError


def runs_code_from_disk(name: str) -> bool:
    """Whether loading backbone `name` would execute something stored on disk: a
    SavedModel graph. (Saved embedstore directories load in Keras safe mode.)"""
    return name.startswith("hub:")


@dataclass(frozen=True)
class BackboneRef:
    """The identity of a backbone as files record it."""

    name: str  # what load_backbone() takes
    fingerprint: str  # sha256 over weights and config
    dim: int
    config: dict = field(default_factory=dict)  # input size, crop fraction, preprocessing

    @classmethod
    def of(cls, backbone: Backbone) -> BackboneRef:
        return cls(backbone.name, backbone.fingerprint, int(backbone.dim), backbone.config())

    @classmethod
    def from_dict(cls, d: dict, where: str | Path) -> BackboneRef:
        """From a manifest's or a store's record; `where` names the file in errors."""
        try:
            ref = cls(str(d["name"]), str(d["fingerprint"]), int(d["dim"]),
                      dict(d.get("config") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackboneError(f"{where}: the backbone record is incomplete or malformed "
                                f"({type(exc).__name__}: {exc}); the file is damaged or was not "
                                "written by embedstore") from None
        if len(ref.fingerprint) != 64:
            raise BackboneError(f"{where}: the backbone fingerprint {ref.fingerprint!r} is not a "
                                "sha256; the file is damaged or was not written by embedstore")
        return ref

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def input_size(self) -> int:
        return int(self.config.get("input_size", 224))

    @property
    def crop_fraction(self) -> float:
        return float(self.config.get("crop_fraction", 1.0))

    def short(self) -> str:
        return f"{self.name} ({self.fingerprint[:12]})"


def check_same_backbone(expected: BackboneRef, actual: BackboneRef, expected_from: str,
                        actual_from: str, advice: str = "extract the images again with the "
                                                        "same backbone, or retrain the head"
                        ) -> None:
    """The one compatibility check (stores, heads, predict): embeddings from two
    backbones never mix."""
    if expected.fingerprint != actual.fingerprint:
        raise BackboneError(
            f"{actual_from} uses backbone {actual.short()}, but {expected_from} uses "
            f"{expected.short()}; embeddings of different backbones cannot be mixed: {advice}")


def canonical_name(name: str) -> str:
    """A backbone name as `Backbone.name` spells it, to compare a user's name with a file's."""
    if name.startswith("hub:") and os.path.exists(name[4:]):
        return "hub:" + str(Path(name[4:]).resolve())
    if name.startswith("keras:") and "@" in name:
        app, _, weights = name.partition("@")
        return f"{app}@{Path(weights).resolve()}"
    if not name.startswith(("hub:", "keras:")) and os.path.exists(name):
        return str(Path(name).resolve())
    return name


def check_trusted(ref: BackboneRef, named_by_user: str | None, where: str | Path) -> None:
    """The trust rule, without loading anything: a backbone whose loading runs code from
    disk is loaded only when the user names one (`named_by_user`, checked by fingerprint
    once loaded)."""
    if runs_code_from_disk(ref.name) and named_by_user is None:
        raise BackboneError(f"{where} names backbone {ref.name}; a SavedModel runs its graph "
                            "when loaded and called, so embedstore loads it only when you name "
                            f"it yourself: add --backbone {ref.name}")


class BackboneNotFound(BackboneError):
    """The backbone directory a file records is neither beside it nor where recorded."""


@dataclass(frozen=True)
class Resolved:
    """Which backbone to load for a record, and why that one (for messages)."""

    name: str  # what load_backbone() takes
    ref: BackboneRef  # what it must turn out to be
    how: str  # "--backbone X", "X beside the head", "X as recorded"
    where: str  # the file that recorded ref


def resolve(ref: BackboneRef, named_by_user: str | None, where: str | Path,
            beside: str | Path | None = None) -> Resolved:
    """The backbone to load for `ref` (read from `where`), without loading it.

    Tried in order: the user's name (any name: it is accepted when its fingerprint
    matches, checked by load_resolved); `beside`, the backbone directory as recorded
    relative to the file that names it (so a head and its backbone move together); the
    name as recorded, under the trust rule. `beside` is used only when it holds an
    embedstore backbone directory, which loads in Keras safe mode or as OpenVINO IR.
    """
    if named_by_user is not None:
        return Resolved(named_by_user, ref, f"--backbone {named_by_user}", str(where))
    tried = []
    if beside is not None and not runs_code_from_disk(ref.name):
        if (Path(beside) / SAVED_BACKBONE_FILE).is_file():
            resolved = Resolved(str(Path(beside).resolve()), ref, f"{beside} (recorded "
                                "relative to the head)", str(where))
            _precheck_saved_directory(resolved)
            return resolved
        tried.append(f"{beside} (relative to the head)")
    check_trusted(ref, named_by_user, where)
    if _is_directory_name(ref.name) and not Path(ref.name).exists():
        tried.append(f"{ref.name} (as recorded)")
        raise BackboneNotFound(f"{where}: its backbone directory is not found (tried "
                            f"{' and '.join(tried)}); pass --backbone PATH with the backbone "
                            "directory where it is now")
    resolved = Resolved(ref.name, ref, f"{ref.name} as recorded", str(where))
    _precheck_saved_directory(resolved)
    return resolved


def load_resolved(resolved: Resolved, runtime: str = "keras") -> Backbone:
    """Load what `resolve` chose on `runtime` and check it is the recorded backbone."""
    from embedstore.backbones.runtimes import load_for_inference

    backbone = load_for_inference(resolved.name, runtime)
    if backbone.fingerprint != resolved.ref.fingerprint:
        raise BackboneError(
            f"backbone {resolved.how} has fingerprint {backbone.fingerprint[:12]}, but "
            f"{resolved.where} records {resolved.ref.name} with fingerprint "
            f"{resolved.ref.fingerprint[:12]}; embeddings of different backbones cannot be "
            "mixed: pass the backbone the head was trained on, or retrain the head")
    return backbone


def load_keras_safely(path: Path, advice: str):
    """A .keras file loaded in Keras safe mode; a refusal or a damaged file is one line
    naming the file (Keras's own message carries the whole model config)."""
    import keras

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "Lambda" in text:
            why = ("it holds a layer that runs Python code (a Lambda layer or a function), "
                   "which Keras safe mode refuses to load")
        else:
            first = text.split(" Full object config")[0].split(" Config:")[0]
            why = f"it is not a readable Keras model ({type(exc).__name__}: {first[:160]})"
        raise BackboneError(f"{path}: {why}; {advice}") from None


def _is_directory_name(name: str) -> bool:
    """A name that can only be a saved backbone directory (not a registry name)."""
    return not name.startswith(("hub:", "keras:")) and ("/" in name or os.sep in name)


def _precheck_saved_directory(resolved: Resolved) -> None:
    ref, where = resolved.ref, resolved.where
    meta_file = Path(resolved.name) / SAVED_BACKBONE_FILE
    if resolved.name.startswith(("hub:", "keras:")) or not meta_file.is_file():
        return
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{meta_file}: unreadable backbone description ({exc})") from None
    if not isinstance(meta, dict):
        raise BackboneError(f"{meta_file} does not hold a JSON object; it is not an embedstore "
                            "backbone directory")
    recorded = {k: meta.get(k) for k in ("input_size", "crop_fraction", "dim")}
    expected = {k: ref.config.get(k, ref.dim if k == "dim" else None) for k in recorded}
    if recorded != expected:
        raise BackboneError(f"backbone directory {resolved.name} describes {recorded}, but "
                            f"{where} recorded {expected}; it is not the backbone the head was "
                            "trained on: pass --backbone PATH with that one")
