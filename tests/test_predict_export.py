"""Prediction from the command line and export of one deployable model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import embedstore.prediction as predict_module
from embedstore.exporting import ExportError, export
from embedstore.pipeline import Resizer, decode_image
from embedstore_cli.app import cli
from tests.conftest import SAMPLE, photo

FILES = sorted(SAMPLE.glob("*/*.png"))[::50]  # 6 images across classes


def _cli_predict(*args) -> tuple[int, list]:
    result = CliRunner().invoke(cli, ["predict", *map(str, args), "--json"])
    return result.exit_code, (json.loads(result.output) if result.output.startswith("[") else [])


def test_predict_json_reports_bad_files_and_predicts_the_rest(heads, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    code, out = _cli_predict(heads / "logreg", FILES[0], bad, FILES[1], "--top-k", "3")
    assert code == 0 and [r["path"] for r in out] == [str(FILES[0]), str(bad), str(FILES[1])]
    good = out[0]
    assert set(good) >= {"path", "label", "probability", "top_k"}
    assert good["top_k"][0] == {"label": good["label"], "probability": good["probability"]}
    assert len(good["top_k"]) == 3 and good["label"] == FILES[0].parent.name
    assert out[1]["path"] == str(bad) and "not an image" in out[1]["error"]
    keys = set(predict_module.Prediction.__annotations__)  # what predict can return
    assert set(good) == keys - {"unknown", "error"} and set(out[1]) == {"path", "error"}
    code, only_bad = _cli_predict(heads / "logreg", bad)
    assert code == 1 and "error" in only_bad[0]


def test_predict_walks_folders_and_writes_csv(heads):
    result = CliRunner().invoke(cli, ["predict", str(heads / "knn"), str(SAMPLE / "Bag"), "--csv"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 0 and lines[0] == "path,label,probability,top_k,error"
    assert len(lines) == 31 and sum(",Bag," in line for line in lines) >= 25


def test_predict_with_store_reuses_cached_vectors(heads, sample_store, tmp_path, monkeypatch):
    expected = predict_module.predict(heads / "logreg", [str(f) for f in FILES])

    def no_backbone(*_args):
        raise AssertionError("the backbone should not be needed")

    monkeypatch.setattr(predict_module, "load_resolved", no_backbone)
    cached = predict_module.predict(heads / "logreg", [str(f) for f in FILES], store=sample_store)
    assert all(r["cached"] for r in cached)
    for a, b in zip(expected, cached):
        assert a["label"] == b["label"]
        assert b["probability"] == pytest.approx(a["probability"], abs=1e-4)
    monkeypatch.undo()
    new = tmp_path / "new.png"
    photo(3).save(new)
    mixed = predict_module.predict(heads / "logreg", [str(FILES[0]), str(new)], store=sample_store)
    assert [r["cached"] for r in mixed] == [True, False]


def test_predict_refuses_a_backbone_with_other_weights(heads, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(heads / "logreg", head)
    manifest = json.loads((head / "manifest.json").read_text())
    manifest["backbone"]["fingerprint"] = "0" * 64
    (head / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["predict", str(head), str(FILES[0])])
    assert result.exit_code != 0 and "retrain the head" in str(result.exception)


def _full(result: dict, classes: list[str]) -> np.ndarray:
    """predict's top_k (all classes) as one probability vector in `classes` order."""
    out = np.full(len(classes), np.nan)
    for t in result["top_k"]:
        out[classes.index(t["label"])] = t["probability"]
    assert not np.isnan(out).any()
    return out


@pytest.mark.parametrize("kind", ["logreg", "dense", "knn"])
def test_savedmodel_matches_predict(kind, heads, tmp_path):
    import tensorflow as tf

    expected = predict_module.predict(heads / kind, [str(f) for f in FILES], top_k=10)
    result = CliRunner().invoke(cli, ["export", str(heads / kind), str(tmp_path / "sm")])
    assert result.exit_code == 0, result.output
    classes = (tmp_path / "sm" / "labels.txt").read_text().split()
    loaded = tf.saved_model.load(str(tmp_path / "sm"))  # plain TensorFlow, no embedstore
    by_bytes = loaded.signatures["serving_default"](
        images=tf.constant([f.read_bytes() for f in FILES]))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in FILES])
    by_pixels = loaded.signatures["predict_images"](images=tf.constant(pixels))
    want = np.stack([_full(r, classes) for r in expected])
    for out in (by_bytes, by_pixels):
        np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-4)
        assert [x.decode() for x in out["label"].numpy()] == [r["label"] for r in expected]


def test_savedmodel_matches_predict_on_jpeg_photos(heads, tmp_path, china_path):
    """Photos as users have them: full size and DCT-scaled, color, gray, EXIF-rotated."""
    import tensorflow as tf

    photos = [Path(china_path)]
    for name, size, mode in [("big.jpg", (1280, 854), "RGB"), ("gray.jpg", (900, 600), "L")]:
        Image.open(china_path).convert(mode).resize(size).save(tmp_path / name, quality=90)
        photos.append(tmp_path / name)
    for orientation in (3, 6, 8):  # as phones write them: pixels stored sideways
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.open(china_path).save(tmp_path / f"exif{orientation}.jpg", exif=exif)
        photos.append(tmp_path / f"exif{orientation}.jpg")
    expected = predict_module.predict(heads / "logreg", [str(p) for p in photos], top_k=10)
    export(heads / "logreg", tmp_path / "sm")
    out = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"](
        images=tf.constant([p.read_bytes() for p in photos]))
    classes = (tmp_path / "sm" / "labels.txt").read_text().split()
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               np.stack([_full(r, classes) for r in expected]), atol=1e-4)
    assert [x.decode() for x in out["label"].numpy()] == [r["label"] for r in expected]


def _tflite_interpreter(path):
    """ai-edge-litert, the runtime that replaces tf.lite.Interpreter, when installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=str(path))


def test_keras_and_tflite_exports_match_predict(heads, tmp_path):
    import keras

    classes = json.loads((heads / "dense" / "manifest.json").read_text())["classes"]
    pixels = Resizer(224, 0.875).batch([decode_image(f.read_bytes()) for f in FILES])
    want = np.stack([_full(r, classes) for r in predict_module.predict(
        heads / "dense", [str(f) for f in FILES], top_k=10)])
    out = export(heads / "dense", tmp_path / "k", "keras")
    model = keras.models.load_model(out / "model.keras")
    np.testing.assert_allclose(model.predict(pixels, verbose=0), want, atol=1e-4)

    out = export(heads / "logreg", tmp_path / "m", "tflite")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "labels.txt", "model.tflite"]
    runner = _tflite_interpreter(out / "model.tflite").get_signature_runner("serving_default")
    got = runner(pixels=pixels)["probabilities"]  # named input and output
    want = np.stack([_full(r, classes) for r in predict_module.predict(
        heads / "logreg", [str(f) for f in FILES], top_k=10)])
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert (out / "labels.txt").read_text().split() == classes
    spec = json.loads((out / "export.json").read_text())
    assert spec["signatures"]["serving_default"]["inputs"].keys() == {"pixels"}
    assert spec["file"] == "model.tflite"


def test_export_prints_only_its_own_line(heads, tmp_path, monkeypatch):
    """Keras and the TFLite converter print hundreds of lines from native code; and OUT/
    (the README's trailing slash) is a folder, with nothing written beside it."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "embedstore", "export", str(heads / "logreg"),
                           "out/", "--format", "tflite"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == ["exported tflite to out/"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    spec = json.loads((tmp_path / "out" / "export.json").read_text())
    assert spec["format"] == "tflite"


def test_savedmodel_export_json_describes_its_signatures(heads, tmp_path):
    export(heads / "knn", tmp_path / "sm")
    spec = json.loads((tmp_path / "sm" / "export.json").read_text())
    assert set(spec["signatures"]) == {"serving_default", "predict_images"}
    assert "encoded" in spec["signatures"]["serving_default"]["inputs"]["images"]


def test_export_refuses_unknown_formats(heads, tmp_path):
    with pytest.raises(ExportError, match="choose one of"):
        export(heads / "logreg", tmp_path / "x", "onnx")
