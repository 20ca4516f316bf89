"""Artifacts you can copy, move, share and trust: head directories that move with their
backbone and store, export folders that stand alone, and one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.backbones import BackboneError, load_backbone
from embedstore.evaluate import evaluate_head
from embedstore.exporting import ExportError, export
from embedstore.extraction import extract
from embedstore.headdir import HeadDirError
from embedstore.pipeline import Resizer, decode_image
from embedstore.prediction import predict
from embedstore.training import train
from embedstore_cli.app import cli
from tests.conftest import REPO, SAMPLE

FILES = sorted(SAMPLE.glob("*/*.png"))[::50]  # 6 images across classes


# --- heads and backbone directories move with their folders --------------------------

@pytest.fixture(scope="module")
def finetune_like(backbone, tmp_path_factory) -> Path:
    """The layout `finetune` leaves: OUT/backbone (a saved backbone directory),
    OUT/store.h5 extracted with it, OUT/head trained on that store."""
    out = tmp_path_factory.mktemp("ft") / "OUT"
    backbone.save(out / "backbone")
    images = out.parent / "images"
    for cls in ["Bag", "Sneaker", "Trouser"]:
        (images / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[:5]:
            shutil.copy(p, images / cls / p.name)
    extract(images, out / "store.h5", load_backbone(str(out / "backbone")))
    train(out / "store.h5", out / "head")
    return out


def test_a_moved_head_finds_its_backbone_and_store_beside_it(finetune_like, tmp_path):
    manifest = json.loads((finetune_like / "head" / "manifest.json").read_text())
    assert manifest["backbone_path"] == "../backbone" and manifest["store_path"] == "../store.h5"
    image = str(FILES[0])
    before = predict(finetune_like / "head", [image], runtime="keras")
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(finetune_like, moved)  # copied and renamed: the old paths stay valid...
    old = Path(manifest["backbone"]["name"])
    hidden = old.with_name("hidden")
    old.rename(hidden)  # ...until the recorded backbone is gone, as after a move
    try:
        after = predict(moved / "head", [image], runtime="keras")
        assert after[0]["label"] == before[0]["label"]
        assert after[0]["probability"] == pytest.approx(before[0]["probability"], abs=1e-5)
        result = evaluate_head(moved / "head", plots=False)
        assert str(moved / "store.h5") in result["source"]
        # neither beside the head nor as recorded: the message says what was tried
        (moved / "backbone").rename(tmp_path / "renamed")
        with pytest.raises(BackboneError) as info:
            predict(moved / "head", [image], runtime="keras")
        message = str(info.value)
        assert "../backbone" in message and str(old) in message and "--backbone PATH" in message
        # ...which matters only for images the store does not hold
        in_store = str(sorted((SAMPLE / "Bag").glob("*.png"))[0])
        cached = predict(moved / "head", [in_store], store=moved / "store.h5")
        assert cached[0]["cached"] and cached[0]["label"] in ("Bag", "Sneaker", "Trouser")
        # any name is accepted when its fingerprint is the manifest's
        given = predict(moved / "head", [image], backbone=str(tmp_path / "renamed"),
                        runtime="keras")
        assert given[0]["probability"] == pytest.approx(before[0]["probability"], abs=1e-5)
    finally:
        hidden.rename(old)


def test_a_backbone_with_another_fingerprint_is_refused_naming_both(finetune_like, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(finetune_like / "head", head)
    manifest = json.loads((head / "manifest.json").read_text())
    manifest["backbone"]["fingerprint"] = "f" * 64
    (head / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["predict", str(head), str(FILES[0]), "--runtime", "keras",
                                      "--backbone", str(finetune_like / "backbone")])
    message = str(result.exception)
    assert result.exit_code == 1 and "\n" not in message
    assert "f" * 12 in message and load_backbone("mobilenet_v2").fingerprint[:12] in message


def test_a_manifest_path_that_is_not_relative_is_refused(heads, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(heads / "logreg", head)
    manifest = json.loads((head / "manifest.json").read_text())
    (head / "manifest.json").write_text(json.dumps({**manifest, "backbone_path": "/etc"}))
    with pytest.raises(HeadDirError, match="manifest.json: 'backbone_path' must be a path "
                                           "relative to the head directory"):
        predict(head, [str(FILES[0])])


# --- exports stand alone -------------------------------------------------------------

PLAIN_KERAS = """
import importlib.abc, json, sys
sys.path = [p for p in sys.path if p not in ("", ".", {repo!r})]
class NoEmbedstore(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("embedstore", "embedstore_cli", "tests"):
            raise ImportError("embedstore is not installed here")
sys.meta_path.insert(0, NoEmbedstore())
import keras, numpy as np
pixels = np.load(sys.argv[1])
out = {{path: keras.saving.load_model(path).predict(pixels, verbose=0).tolist()
       for path in sys.argv[2:]}}
assert not [m for m in sys.modules if m.startswith("embedstore")]
print(json.dumps(out))
"""


def test_keras_exports_load_in_a_python_that_never_imports_embedstore(heads, tmp_path):
    pixels = Resizer(224, 0.875).batch([decode_image(f.read_bytes()) for f in FILES])
    np.save(tmp_path / "pixels.npy", pixels)
    models, want = [], {}
    for kind in ("logreg", "dense"):
        out = export(heads / kind, tmp_path / kind, "keras")
        models.append(str(out / "model.keras"))
        classes = (out / "labels.txt").read_text().split()
        want[models[-1]] = [[{t["label"]: t["probability"] for t in r["top_k"]}[c]
                             for c in classes]
                            for r in predict(heads / kind, [str(f) for f in FILES], top_k=10)]
    proc = subprocess.run([sys.executable, "-c", PLAIN_KERAS.format(repo=str(REPO)),
                           str(tmp_path / "pixels.npy"), *models],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in models:
        np.testing.assert_allclose(got[path], want[path], atol=1e-4)


def test_a_knn_head_is_not_exported_as_keras(heads, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(heads / "knn"), str(tmp_path / "k"),
                                      "--format", "keras"])
    message = str(result.exception)
    assert result.exit_code == 1 and "\n" not in message and "savedmodel or tflite" in message
    assert not (tmp_path / "k").exists()


def test_export_refuses_a_non_empty_folder_and_replaces_an_export_whole(heads, tmp_path,
                                                                      monkeypatch):
    import embedstore.exporting as export_module

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for args in ([], ["--overwrite"]):  # not an earlier export: never replaced
        result = CliRunner().invoke(cli, ["export", str(heads / "logreg"), str(out),
                                          "--format", "tflite", *args])
        assert result.exit_code == 1 and "give a new folder" in str(result.exception)
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    export(heads / "logreg", out, "tflite")  # an empty folder is fine
    first = (out / "model.tflite").read_bytes()
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export(heads / "logreg", out, "tflite")

    def broken(model):
        raise RuntimeError("converter failed")

    monkeypatch.setattr(export_module, "_tflite_bytes", broken)
    with pytest.raises(RuntimeError):
        export(heads / "logreg", out, "tflite", overwrite=True)
    assert (out / "model.tflite").read_bytes() == first  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left
    monkeypatch.undo()
    export(heads / "dense", out, "tflite", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "labels.txt",
                                                     "model.tflite"]
    assert json.loads((out / "export.json").read_text())["head"] == "dense"


# --- predict takes what extract takes ------------------------------------------------

def test_predict_reads_file_lists_and_prints_any_file_name(heads, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9 \xff.png")  # not UTF-8: a name is bytes
    shutil.copy(FILES[0], folder / odd)
    (tmp_path / "list.txt").write_text(f"# images\n{FILES[1]}\nimgs/xxx.png\n")
    shutil.copy(FILES[2], folder / "xxx.png")
    outputs = {}
    for fmt in ("--json", "--csv", None):
        proc = subprocess.run([sys.executable, "-m", "embedstore", "predict",
                               str(heads / "logreg"), str(tmp_path / "list.txt"), str(folder),
                               *([fmt] if fmt else [])],
                              capture_output=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
        outputs[fmt] = proc.stdout.decode("utf-8")  # valid UTF-8 whatever the names
    rows = json.loads(outputs["--json"])
    assert [r["path"] for r in rows] == [str(FILES[1]), str(tmp_path / "imgs" / "xxx.png"),
                                         str(folder / "caf\\xe9 \\xff.png"),
                                         str(folder / "xxx.png")]
    assert all("label" in r for r in rows)
    assert rows[0]["label"] == FILES[1].parent.name and rows[2]["label"] == FILES[0].parent.name
    assert "caf\\xe9 \\xff.png" in outputs["--csv"] and "caf\\xe9 \\xff.png" in outputs[None]


# --- messages ------------------------------------------------------------------------

def _plant_lambda(keras_file: Path) -> None:
    """Rewrite a .keras file's config so that its first layer is a Lambda layer."""
    import zipfile

    with zipfile.ZipFile(keras_file) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    layers = config["config"]["layers"]
    lam = next(i for i, layer in enumerate(layers) if layer["class_name"] != "InputLayer")
    layers[lam] = {**layers[lam], "module": "keras.layers", "class_name": "Lambda",
                   "registered_name": None,
                   "config": {"name": layers[lam]["config"]["name"], "function": {
                       "class_name": "__lambda__", "config": {
                           "code": "YOUR CODE HERE", "defaults": None, "closure": None}}}}
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(keras_file, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def test_keras_safe_mode_refusals_are_one_line_naming_the_file(heads, backbone, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(heads / "dense", head)
    _plant_lambda(head / "model.keras")
    result = CliRunner().invoke(cli, ["predict", str(head), str(FILES[0])])
    message = str(result.exception)
    assert result.exit_code == 1 and "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{head / 'model.keras'}: ") and "safe mode" in message

    saved = backbone.save(tmp_path / "bb")
    _plant_lambda(saved / "backbone.keras")
    with pytest.raises(BackboneError) as info:
        load_backbone(str(saved))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{saved / 'backbone.keras'}: ") and "safe mode" in message


def _tiny_tmpfs(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def test_train_on_a_full_disk_is_one_line_and_writes_nothing(sample_store, tmp_path):
    """On a real 64 KB tmpfs (needs root to mount; skipped otherwise: see the next test)."""
    disk = tmp_path / "disk"
    if not _tiny_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = CliRunner().invoke(cli, ["train", str(sample_store), str(disk / "head")])
        message = str(result.exception)
        assert result.exit_code == 1 and "\n" not in message
        assert message.startswith(f"no space left on {disk} writing {disk / 'head'}/")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_train_on_a_full_disk_simulated(sample_store, tmp_path, monkeypatch):
    """ENOSPC from the state file's write (monkeypatched), where no tmpfs can be mounted."""
    import errno

    from embedstore import headdir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(headdir.np, "savez", full)
    (tmp_path / "head").mkdir()
    with pytest.raises(HeadDirError) as info:
        train(sample_store, tmp_path / "head")
    assert str(info.value).startswith(f"no space left on {headdir.mount_point(tmp_path)} "
                                      f"writing {tmp_path / 'head'}/state.npz;")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]
