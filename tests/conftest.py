"""Shared fixtures: the real backbone (loaded once) and small real image sets."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The fast loop, `pytest -m "not tf"`: every test that needs TensorFlow or the real
# backbone is marked `tf`, by the fixtures it uses or by hand; modules that import
# TensorFlow when imported are not even collected; and a test of the fast loop that
# imports TensorFlow fails, naming itself, so the loop stays fast.
TF_FIXTURES = {"backbone", "hub_savedmodel", "sample_store", "tflite_backbone", "int8_store"}
# modules about the model itself, marked whole; the first imports TensorFlow when imported
TF_MODULES = {"test_predict_export.py", "test_backbones.py", "test_dense_defaults.py",
              "test_finetune.py", "test_int8.py", "test_ray_engine.py", "test_runtime.py"}


def _fast_loop(config) -> bool:
    return "not tf" in (config.option.markexpr or "")


def pytest_configure(config):
    config.addinivalue_line("markers", "tf: needs TensorFlow or the real backbone; "
                                       "`pytest -m 'not tf'` leaves these out")


def pytest_ignore_collect(collection_path, config):
    if _fast_loop(config) and collection_path.name == "test_predict_export.py":
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {}).values()
        if TF_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                item.path.name in TF_MODULES or \
                any(type(p).__name__ == "DenseHead" for p in params):  # the Keras head
            item.add_marker(pytest.mark.tf)


@pytest.fixture(autouse=True)
def _fast_tests_never_import_tensorflow(request):
    before = "tensorflow" in sys.modules
    yield
    if _fast_loop(request.config) and not before and "tensorflow" in sys.modules:
        pytest.fail(f"{request.node.nodeid} imported TensorFlow: mark it "
                    "@pytest.mark.tf, or it slows the fast loop")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "fashion-mnist-sample"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Converted weights go to a per-run cache, as on a fresh machine."""
    os.environ["EMBEDSTORE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def backbone():
    from embedstore.backbones import load_backbone

    return load_backbone("mobilenet_v2")


@pytest.fixture(scope="session")
def hub_savedmodel(backbone, tmp_path_factory) -> Path:
    """The real backbone as a TF-Hub style feature-vector SavedModel ([0, 1] pixels in)."""
    import tensorflow as tf

    model = backbone.model

    class FeatureVector(tf.Module):  # not a Keras model
        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
        def __call__(self, images):
            return model(images * 255.0, training=False)

    module = FeatureVector()
    module.model_vars = model.variables
    path = tmp_path_factory.mktemp("hub") / "hubmodel"
    tf.saved_model.save(module, str(path))
    return path


@pytest.fixture(scope="session")
def china_path() -> str:
    import sklearn.datasets

    return str(Path(sklearn.datasets.__file__).parent / "images" / "china.jpg")


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """3 classes x 4 real Fashion-MNIST images, in class folders."""
    root = tmp_path / "images"
    for cls in ["Bag", "Sneaker", "Trouser"]:
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[:4]:
            shutil.copy(p, root / cls / p.name)
    return root


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory, backbone) -> Path:
    """The bundled 300-image sample, extracted once for every test that reads a store."""
    from embedstore.extraction import extract

    store = tmp_path_factory.mktemp("store") / "sample.h5"
    extract(SAMPLE, store, backbone)
    return store


@pytest.fixture(scope="session")
def heads(sample_store, tmp_path_factory) -> Path:
    """One head of each kind trained on the sample, shared by the predict and export tests
    (they read the heads, and copy one before changing it)."""
    from embedstore.training import train

    root = tmp_path_factory.mktemp("heads")
    train(sample_store, root / "logreg", head="logreg")
    train(sample_store, root / "dense", head="dense", hidden=(64,), epochs=8)
    train(sample_store, root / "knn", head="knn", k=5, weights="distance")
    return root


def labelled_store(path: Path, X: np.ndarray, labels: list) -> Path:
    """A store of the vectors X under a made-up backbone: row i is i.png, with label
    labels[i] (None: unlabelled)."""
    from embedstore.store import StoreWriter

    n, dim = X.shape
    with StoreWriter(path, {"name": "t", "fingerprint": "0" * 64, "dim": dim, "config": {}}) as w:
        w.add(X, [f"{i}.png" for i in range(n)], [f"{i:064x}" for i in range(n)], labels)
    return path


def photo(seed: int = 0, size=(96, 64)) -> Image.Image:
    """A small image with structure (gradients and a block), different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, rng.integers(0, 255))], -1)
    a[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(a.astype(np.uint8))
