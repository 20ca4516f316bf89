"""The TFLite runtime and the TensorFlow-free pipeline: same vectors, faster, no TF on warm runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedstore.backbones import Backbone, runtimes
from embedstore.backbones.runtimes import auto, load_for_inference, tflite  # noqa: F401  (runtimes.tflite)
from embedstore.extraction import extract
from embedstore.pipeline import Resizer, decode_image, resize_for_backbone, resize_image
from embedstore.store import StoreWriter, open_store
from embedstore_cli.app import cli
from tests.conftest import REPO, SAMPLE


@pytest.fixture(scope="session")
def tflite_backbone():
    """The default runtime, converted from the Keras model into this run's cache (if no
    earlier test did)."""
    return load_for_inference("mobilenet_v2")


def _real_photos(china_path) -> list[np.ndarray]:
    import skimage.data

    photos = [decode_image(Path(china_path).read_bytes()), skimage.data.coffee()]
    return [np.asarray(p, np.uint8) for p in photos]


# (height, width): shrinking, enlarging, mixed, tiny, exact, odd and extreme aspect ratios
SIZES = [(28, 28), (375, 500), (500, 375), (100, 300), (256, 256), (257, 300), (224, 224),
         (223, 225), (640, 427), (50, 1000), (1000, 1500), (7, 400)]


@pytest.mark.parametrize("crop_fraction", [0.875, 1.0])
def test_numpy_resize_equals_tensorflow_resize_on_real_photos(china_path, crop_fraction):
    """The pipeline's TF-free resize gives the pixels of the exported model's resize."""
    worst = 0.0
    for photo in _real_photos(china_path):
        for h, w in SIZES:
            img = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC))
            ours = resize_image(img, 224, crop_fraction)
            theirs = resize_for_backbone(img, 224, crop_fraction).numpy()
            assert ours.shape == theirs.shape == (224, 224, 3)
            worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst < 1e-2  # on [0, 255]: float32 rounding, 4e-5 of the range


def test_tflite_embeddings_match_keras_on_real_images(tflite_backbone, backbone, china_path):
    assert tflite_backbone.runtime == "tflite" and backbone.runtime == "keras"
    assert tflite_backbone.fingerprint == backbone.fingerprint  # stores stay interchangeable
    files = sorted(SAMPLE.glob("*/*.png"))[::30]
    images = [decode_image(f.read_bytes()) for f in files] + _real_photos(china_path)
    # the whole new path (NumPy/Pillow resize, TFLite) against the old (TF resize, Keras)
    fast = tflite_backbone.embed(Resizer(224, 0.875).batch(images))
    ref = backbone.embed(np.stack([resize_for_backbone(i, 224, 0.875).numpy() for i in images]))
    assert fast.shape == ref.shape == (len(images), 1280)
    assert np.abs(fast - ref).max() <= 1e-4


def test_a_list_of_resized_images_embeds_as_the_stacked_batch(tflite_backbone):
    """extract hands the runtime its images unstacked, grey ones as broadcast views."""
    resizer = Resizer(224, 0.875)
    files = sorted(SAMPLE.glob("*/*.png"))[::40]
    images = [resizer.early(decode_image(f.read_bytes())) for f in files]
    assert any(not img.flags.c_contiguous for img in images)  # a grey view is among them
    stacked = tflite_backbone.embed(np.stack(images))
    np.testing.assert_array_equal(tflite_backbone.embed(images), stacked)
    np.testing.assert_array_equal(tflite_backbone.embed(images[:1]), stacked[:1])


def test_the_cached_conversion_is_reused(tflite_backbone, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the cached .tflite should have been used")

    monkeypatch.setattr(runtimes.tflite, "convert_to_tflite", no_conversion)
    said: list[str] = []
    again = load_for_inference("mobilenet_v2", say=said.append)
    assert said == ["loading mobilenet_v2 (tflite on CPU)..."]
    assert again.fingerprint == tflite_backbone.fingerprint


def test_a_backbone_that_cannot_be_converted_runs_on_keras_and_says_so(hub_savedmodel):
    said: list[str] = []
    bb = load_for_inference(f"hub:{hub_savedmodel}", say=said.append)
    assert bb.runtime == "keras" and bb.dim == 1280
    assert len(said) == 2 and said[1].endswith(
        "cannot run on tflite (not a Keras model); running it on keras")


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(ValueError,
                       match="unknown runtime 'gpu'; use one of: auto, tflite, keras, int8"):
        load_for_inference("mobilenet_v2", "gpu")


def test_extract_json_reports_stages_startup_and_runtime(small_tree, tmp_path, tflite_backbone):
    result = CliRunner().invoke(cli, ["extract", str(small_tree), str(tmp_path / "s.h5"), "--json"])
    assert result.exit_code == 0, result.output
    assert "loading mobilenet_v2 (tflite on CPU)..." in result.stderr
    out = json.loads(result.stdout)
    assert out["embedded"] == 12 and out["runtime"] == "tflite" and out["device"] == "CPU"
    assert set(out["stages"]) == {"read", "hash", "decode", "resize", "infer", "write"}
    assert out["stages"]["infer"] > 0 and out["stages"]["decode"] > 0
    assert 0 < out["startup_seconds"] < 60 and out["seconds"] > 0


WARM_RUN = """
import json, sys
from embedstore.extraction import extract
from embedstore.prediction import predict
first = extract(sys.argv[1], sys.argv[2])
again = extract(sys.argv[1], sys.argv[2])
labels = [r["label"] for r in predict(sys.argv[3], [sys.argv[4]])]
print(json.dumps({"embedded": first.embedded, "unchanged": again.unchanged, "labels": labels,
                  "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""


def test_warm_extract_and_predict_never_import_tensorflow(small_tree, tmp_path, sample_store,
                                                          tflite_backbone):
    from embedstore.training import train

    train(sample_store, tmp_path / "head", head="logreg")
    image = sorted((small_tree / "Bag").glob("*.png"))[0]
    proc = subprocess.run(
        [sys.executable, "-c", WARM_RUN, str(small_tree), str(tmp_path / "s.h5"),
         str(tmp_path / "head"), str(image)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})  # the session's cache holds the .tflite
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["embedded"], out["unchanged"]) == (12, 12) and out["labels"] == ["Bag"]
    assert not out["tensorflow"] and not out["keras"]


def test_commit_every_is_honoured_below_the_batch_size(small_tree, tmp_path, tflite_backbone,
                                                       monkeypatch):
    committed: list[int] = []
    commit = StoreWriter.commit

    def counting_commit(self):
        committed.append(len(self.pending.paths))
        commit(self)

    monkeypatch.setattr(StoreWriter, "commit", counting_commit)
    result = extract(small_tree, tmp_path / "s.h5", tflite_backbone, batch_size=8, commit_every=5)
    assert result.embedded == 12
    assert committed[:2] == [5, 5] and sum(committed) == 12  # the last 2 at the end
    with open_store(tmp_path / "s.h5") as s:
        assert len(s.paths) == 12


def test_auto_on_a_machine_without_a_gpu_driver_is_tflite_without_importing_tensorflow(
        tflite_backbone):
    code = ("import sys; from embedstore.backbones.runtimes import load_for_inference; "
            "b = load_for_inference('mobilenet_v2'); "
            "print(b.runtime, b.device, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.split() == ["tflite", "CPU", "False"]


def test_auto_asks_tensorflow_only_where_a_gpu_could_be(monkeypatch):
    monkeypatch.setattr(auto.os.path, "exists", lambda p: p == "/proc/driver/nvidia/version")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert auto.gpu_possible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # hidden on purpose
    assert not auto.gpu_possible() and auto.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(auto.os.path, "exists", lambda p: False)
    monkeypatch.setattr(auto.glob, "glob", lambda pattern: [])
    assert not auto.gpu_possible()


@pytest.mark.parametrize("noise, chosen", [(0.0, "mixed"), (0.05, "float32")])
def test_auto_on_a_gpu_keeps_mixed_precision_only_where_the_vectors_stay(monkeypatch, backbone,
                                                                        noise, chosen):
    """The choice on a GPU, with this CPU standing in for it (no GPU in CI): the probe
    compares real embeddings; a mixed-precision model that moves them is not used."""
    monkeypatch.setattr(auto, "visible_gpus", lambda: ["/physical_device:GPU:0"])
    monkeypatch.setattr(auto, "load_backbone", lambda name: backbone)
    rng = np.random.default_rng(0)
    bent = Backbone(backbone.name, lambda x: backbone.embed(x) * (1 + noise * rng.standard_normal(
        (len(x), 1280))).astype(np.float32), 224, 1280, backbone.preprocessing, 0.875,
        backbone.weights_source, fingerprint=backbone.fingerprint, runtime="tflite",
        numpy_model=True)
    monkeypatch.setattr(auto, "_mixed_precision", lambda name: bent)
    said: list[str] = []
    got = load_for_inference("mobilenet_v2", "auto", say=said.append)
    assert got.device == "/physical_device:GPU:0"
    assert (got is bent) == (chosen == "mixed")
    assert said[-1].startswith(f"mobilenet_v2: {'mixed precision' if noise == 0 else 'float32'}")
