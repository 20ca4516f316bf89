"""--runtime int8: OpenVINO + NNCF calibrated on the user's images, its own backbone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.backbones import BackboneError, int8
from embedstore.backbones.runtimes import load_for_inference
from embedstore.extraction import extract
from embedstore.store import open_store
from embedstore_cli.app import cli
from tests.conftest import SAMPLE

pytest.importorskip("nncf", reason="int8 needs pip install 'embedstore[int8]'")

CLASSES = ["Bag", "Sneaker", "Trouser", "Dress"]


def _tree(root: Path, images: slice) -> Path:
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[images]:
            shutil.copy(p, root / cls / p.name)
    return root


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """32 images extracted with --runtime int8 (calibrated on them), and what it said."""
    work = tmp_path_factory.mktemp("int8")
    images = _tree(work / "train", slice(0, 8))
    said: list[str] = []
    result = extract(images, work / "train.h5", runtime="int8", status=said.append)
    assert result.embedded == 32 and result.runtime == "int8"
    return work, images, said


def test_int8_is_calibrated_on_the_images_and_is_its_own_backbone(int8_store):
    work, images, said = int8_store
    directory = work / "train.h5" / "int8"  # inside the store: it moves with it
    meta = int8.describe(directory)
    assert meta["based_on"] == "mobilenet_v2"
    assert meta["calibration"]["images"] == 32 and meta["calibration"]["source"] == str(images)
    assert any(s.startswith("calibrating int8 mobilenet_v2 on 32 of your images") for s in said)
    fp32 = load_for_inference("mobilenet_v2", "tflite")
    with open_store(work / "train.h5") as s:
        assert s.backbone["name"] == str(directory.resolve())
        assert s.backbone["fingerprint"] not in ("", fp32.fingerprint)
        assert meta["base_fingerprint"] == fp32.fingerprint
        vectors, paths = s.embeddings(), s.paths
    from embedstore.pipeline import Resizer, decode_image

    pixels = Resizer(224, 0.875).batch([decode_image((images / p).read_bytes()) for p in paths])
    reference = fp32.embed(pixels)
    cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(
        reference, axis=1)
    assert cosine.min() > 0.9  # quantized, not exact: 0.96-0.97 min measured
    assert np.abs(vectors - reference).max() > 1e-3  # and really int8, not the fp32 model
    assert abs(meta["fidelity"]["min_cosine"] - cosine.min()) < 0.02


def test_a_rerun_reuses_the_stores_int8_model_also_after_a_move(int8_store, monkeypatch,
                                                                 tmp_path):
    work, images, _ = int8_store

    def no_calibration(*args, **kwargs):
        raise AssertionError("the store's int8 model should have been reused")

    monkeypatch.setattr(int8, "quantize", no_calibration)
    again = extract(images, work / "train.h5", runtime="int8")
    assert (again.embedded, again.unchanged) == (0, 32)
    moved = tmp_path / "moved.h5"
    shutil.copytree(work / "train.h5", moved, symlinks=True)
    with open_store(moved) as s:
        assert s.backbone["name"] == str(moved.resolve() / "int8")
    again = extract(images, moved, runtime="int8")
    assert (again.embedded, again.unchanged) == (0, 32)


def test_int8_and_fp32_vectors_never_mix(int8_store, tmp_path, monkeypatch):
    work, images, _ = int8_store
    result = CliRunner().invoke(cli, ["extract", str(images), str(work / "train.h5")])
    assert result.exit_code != 0
    assert f"extract with --backbone {(work / 'train.h5' / 'int8').resolve()}" in str(
        result.exception)
    fp32_store = tmp_path / "fp32.h5"
    extract(images, fp32_store)
    monkeypatch.setattr(int8, "quantize", lambda *a, **k: pytest.fail("calibrated anyway"))
    with pytest.raises(BackboneError, match="int8 vectors of mobilenet_v2 cannot be mixed"):
        extract(images, fp32_store, runtime="int8")


def test_a_test_set_embedded_with_the_int8_directory_evaluates_and_predicts(int8_store,
                                                                           tmp_path):
    work, _, _ = int8_store
    directory = str(work / "train.h5" / "int8")
    test_images = _tree(tmp_path / "test", slice(8, 12))
    runner = CliRunner()
    out = runner.invoke(cli, ["extract", str(test_images), str(tmp_path / "test.h5"),
                              "--backbone", directory, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["runtime"] == "int8"
    head = tmp_path / "head"
    assert runner.invoke(cli, ["train", str(work / "train.h5"), str(head),
                               "--val-fraction", "0"]).exit_code == 0
    evaluated = runner.invoke(cli, ["evaluate", str(head), str(tmp_path / "test.h5"), "--json",
                                    "--no-plots"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] >= 0.75  # 16 unseen images, 4 classes
    bag = sorted((test_images / "Bag").glob("*.png"))[0]
    predicted = runner.invoke(cli, ["predict", str(head), str(bag), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)[0]["label"] == "Bag"
    exported = runner.invoke(cli, ["export", str(head), str(tmp_path / "x")])
    assert exported.exit_code != 0 and "is an int8 OpenVINO model" in str(exported.exception)


def test_without_openvino_the_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackboneError, match=r"pip install 'embedstore\[int8\]'"):
        int8.OpenVINORunner(tmp_path / "model.xml")


def test_int8_needs_calibration_images_to_be_made():
    with pytest.raises(BackboneError, match="extract --runtime int8"):
        load_for_inference("mobilenet_v2", "int8")
