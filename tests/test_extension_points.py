"""Extension points have one shape: a new head or runtime is its own module plus one
registry line, and works through the whole workflow with nothing else edited."""

from __future__ import annotations

import ast
import json
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.backbones import runtimes
from embedstore.heads import HEADS
from embedstore_cli.app import cli
from tests.conftest import REPO, SAMPLE, labelled_store

CENTROID_HEAD = '''
"""centroid: softmax of the cosine similarity to each class's mean embedding."""

from numbers import Real

import numpy as np

from embedstore.heads import options as opt
from embedstore.heads.base import EmbeddingHead, Interval, fit_context


def unit(X):
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class CentroidHead(EmbeddingHead):
    summary = "nearest class mean by cosine"
    options = (opt.HeadOption("--sharpness", "sharpness", "FLOAT",
                              "scale of the cosine similarities before the softmax", float),)
    calibrated = True
    _parameter_constraints = {"sharpness": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, sharpness: float = 20.0):
        self.sharpness = sharpness

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        X, y = self._validate_fit_data(X, y)
        X = unit(X)
        self.centroids_ = unit(np.stack([X[y == c].mean(axis=0) for c in self.classes_]))
        return self

    def predict_proba(self, X):
        z = self.sharpness * unit(self._validate_predict_data(X)) @ self.centroids_.T
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def export_layer(self, dim, temperature=1.0):
        import keras

        dense = keras.layers.Dense(len(self.classes_), activation="softmax", use_bias=False)
        model = keras.Sequential([keras.Input((dim,)), keras.layers.UnitNormalization(), dense])
        dense.set_weights([(self.sharpness / temperature) * self.centroids_.T.astype("float32")])
        return model


HEAD = CentroidHead
'''

RIDGE_HEAD = '''
"""ridge: standardise + a ridge classifier, its scores through a softmax."""

import threading

import numpy as np
from sklearn.linear_model import RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from embedstore.heads.base import EmbeddingHead


class RidgeHead(EmbeddingHead):
    summary = "ridge classifier"

    def __init__(self, alpha: float = 1.0, keep_a_lock: bool = False):
        self.alpha = alpha
        self.keep_a_lock = keep_a_lock

    def fit(self, X, y):
        X, y = self._validate_fit_data(X, y)
        self.model_ = make_pipeline(StandardScaler(), RidgeClassifier(alpha=self.alpha))
        self.model_.fit(X, y)
        if self.keep_a_lock:  # state no file can hold
            self.lock_ = threading.Lock()
        return self

    def predict_proba(self, X):
        z = self.model_.decision_function(self._validate_predict_data(X))
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


HEAD = RidgeHead
'''

ONE_THREAD_RUNTIME = '''
"""tflite1: TFLite on one thread, for a machine shared with other jobs."""

from embedstore.backbones.runtimes import Runtime, tflite


def load(name, say, threads=None):
    say(f"loading {name} (tflite on one thread)...")
    return tflite.load(name, lambda message: None, 1)


RUNTIME = Runtime("tflite1", "TFLite fp32 on one CPU thread", load)
'''


def _scratch_module(tmp_path, monkeypatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _run(*args: str) -> dict | list:
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_no_module_outside_a_heads_own_tests_for_its_class():
    """export, train, evaluate, finetune and the CLI ask the head, never which head it is."""
    names = {cls.__name__ for cls in HEADS.values()}
    found = []
    for path in [*(REPO / "embedstore").rglob("*.py"), *(REPO / "cli").rglob("*.py")]:
        if path.parent.name == "heads":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
                    "isinstance", "issubclass", "type"):
                used = {n.id for arg in node.args[1:] for n in ast.walk(arg)
                        if isinstance(n, ast.Name)}
                found += [f"{path.name}:{node.lineno}" for _ in used & names]
            if isinstance(node, ast.Compare) and any(
                    isinstance(n, ast.Name) and n.id in names for n in ast.walk(node)):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, found


def test_a_new_head_is_its_module_and_one_registry_line(sample_store, tmp_path, monkeypatch):
    from embedstore import heads

    module = _scratch_module(tmp_path, monkeypatch, "centroid_head", CENTROID_HEAD)
    monkeypatch.setitem(heads._MODULES, "centroid", module)  # the one registration line

    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert "--sharpness FLOAT" in help_text and "centroid: nearest class mean" in help_text
    metrics = _run("train", str(sample_store), str(tmp_path / "head"), "--head", "centroid",
                   "--sharpness", "30")
    assert metrics["head"] == "centroid" and metrics["params"] == {"sharpness": 30.0}
    assert metrics["val_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert metrics["calibration"]["method"] == "temperature"
    refused = CliRunner().invoke(cli, ["train", str(sample_store), str(tmp_path / "x"),
                                       "--head", "logreg", "--sharpness", "3"])
    assert refused.exit_code == 2 and "applies to the centroid head" in refused.output

    board = _run("sweep", str(sample_store), "--head", "centroid", "--sharpness", "5,30")
    assert sorted(m["given_params"]["sharpness"] for m in board) == [5.0, 30.0]
    evaluated = _run("evaluate", str(tmp_path / "head"), "--no-plots")
    assert evaluated["accuracy"] == pytest.approx(metrics["val_accuracy"])

    files = sorted(SAMPLE.glob("*/*.png"))[::60]
    predicted = _run("predict", str(tmp_path / "head"), *map(str, files), "--top-k", "10")
    export_dir = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "head"), str(export_dir),
                                      "--format", "keras"])
    assert result.exit_code == 0, result.output

    import keras

    from embedstore.pipeline import Resizer, decode_image

    classes = (export_dir / "labels.txt").read_text().split()
    pixels = Resizer(224, 0.875).batch([decode_image(f.read_bytes()) for f in files])
    got = keras.saving.load_model(export_dir / "model.keras").predict(pixels, verbose=0)
    want = [[{t["label"]: t["probability"] for t in r["top_k"]}[c] for c in classes]
            for r in predicted]
    np.testing.assert_allclose(got, want, atol=1e-3)  # temperature folded in, as predict


def _separable_store(path):
    labels = np.repeat(np.arange(3), 20)
    X = np.random.default_rng(0).normal(size=(60, 8)) + 3 * np.eye(8)[labels]
    return labelled_store(path, X, ["abc"[c] for c in labels])


def test_a_head_holding_scikit_learn_estimators_saves_them_without_pickle(tmp_path,
                                                                         monkeypatch):
    from embedstore import heads
    from embedstore.headdir import HeadDirError, load_head
    from embedstore.splits import load_split
    from embedstore.training import train

    module = _scratch_module(tmp_path, monkeypatch, "ridge_head", RIDGE_HEAD)
    monkeypatch.setitem(heads._MODULES, "ridge", module)
    store = _separable_store(tmp_path / "t.h5")
    metrics = train(store, tmp_path / "head", head="ridge", alpha=0.5)
    split = load_split(store)
    fresh = heads.make_head("ridge", alpha=0.5).fit(split.X_train, split.y_train)
    loaded = load_head(tmp_path / "head")
    np.testing.assert_allclose(loaded.predict_proba(split.X_val), fresh.predict_proba(split.X_val))
    assert metrics["val_accuracy"] == 1.0 and not (tmp_path / "head" / "model.joblib").exists()

    # a state.json naming anything but a scikit-learn estimator class imports nothing
    state_file = tmp_path / "head" / "state.json"
    saved = state_file.read_text()
    for name in ("os:system", "sklearn.utils:Bunch", "sklearn:__import__"):
        state_file.write_text(saved.replace("sklearn.pipeline:Pipeline", name))
        with pytest.raises(HeadDirError, match="is not a scikit-learn estimator class"):
            load_head(tmp_path / "head")

    # state no file can hold: one line saying what to do, and no head directory
    with pytest.raises(HeadDirError, match="lock_ is a lock, .* give the head fitted_state"):
        train(store, tmp_path / "locked", head="ridge", keep_a_lock=True)
    assert not (tmp_path / "locked").exists()


def test_a_head_option_that_would_shadow_a_command_option_is_refused(tmp_path, monkeypatch):
    from embedstore import heads

    source = ("from embedstore.heads import options as opt\n"
              "from embedstore.heads.knn import KNNHead\n\n\n"
              "class SeededHead(KNNHead):\n"
              "    options = (opt.HeadOption('--seed', 'random_state', 'INTEGER', 'seed', int),)\n"
              "\n\nHEAD = SeededHead\n")
    monkeypatch.setitem(heads._MODULES, "seeded",
                        _scratch_module(tmp_path, monkeypatch, "seeded_head", source))
    for command in ("train", "sweep"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 1 and "--seed (random_state) clashes with" in result.output


def test_a_head_subclassing_a_registered_one_is_saved_under_its_own_name(tmp_path,
                                                                         monkeypatch):
    from embedstore import heads
    from embedstore.headdir import load_head, read_manifest
    from embedstore.training import train

    source = ("from embedstore.heads.logreg import LogRegHead\n\n\n"
              "class BalancedHead(LogRegHead):\n"
              "    def __init__(self, C=0.1, Cs=(0.001, 0.01, 0.1, 1.0), cv=3, max_iter=40,\n"
              "                 tol=1e-4, class_weight='balanced'):\n"
              "        super().__init__(C, Cs, cv, max_iter, tol, class_weight)\n\n\n"
              "HEAD = BalancedHead\n")
    module = _scratch_module(tmp_path, monkeypatch, "balanced_head", source)
    monkeypatch.setitem(heads._MODULES, "balanced", module)
    train(_separable_store(tmp_path / "t.h5"), tmp_path / "head", head="balanced")
    assert read_manifest(tmp_path / "head").head == "balanced"
    assert type(load_head(tmp_path / "head")).__name__ == "BalancedHead"


@pytest.mark.tf  # the export module imports Keras
def test_a_head_without_an_export_layer_is_refused_in_one_line(tmp_path, monkeypatch):
    from embedstore import heads
    from embedstore.exporting import ExportError, export
    from embedstore.training import train

    monkeypatch.setitem(heads._MODULES, "ridge",
                        _scratch_module(tmp_path, monkeypatch, "ridge_head", RIDGE_HEAD))
    train(_separable_store(tmp_path / "t.h5"), tmp_path / "head", head="ridge")
    with pytest.raises(ExportError, match="ridge head, which has no export layer"):
        export(tmp_path / "head", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


@pytest.mark.tf  # converts the backbone to TFLite in the test's fresh cache
def test_a_new_runtime_is_its_module_and_one_registry_line(small_tree, tmp_path, monkeypatch):
    module = _scratch_module(tmp_path, monkeypatch, "one_thread_runtime", ONE_THREAD_RUNTIME)
    monkeypatch.setitem(runtimes._MODULES, "tflite1", module)  # the one registration line

    for command in ("extract", "predict", "similar"):
        shown = CliRunner().invoke(cli, [command, "--help"]).output
        assert "tflite1: TFLite fp32 on one CPU thread" in " ".join(shown.split())
    runner = CliRunner()
    for runtime in ("tflite1", "tflite"):
        result = runner.invoke(cli, ["extract", str(small_tree), str(tmp_path / runtime),
                                     "--runtime", runtime])
        assert result.exit_code == 0, result.output

    from embedstore.store import open_store

    with open_store(tmp_path / "tflite1") as one, open_store(tmp_path / "tflite") as default:
        assert list(one.paths) == list(default.paths) and len(one.paths) == 12
        assert one.backbone["fingerprint"] == default.backbone["fingerprint"]
        np.testing.assert_allclose(one.embeddings(), default.embeddings(), atol=1e-5)


def test_a_runtime_whose_library_is_missing_is_listed_and_refused_in_one_line(
        small_tree, tmp_path, monkeypatch):
    module = _scratch_module(tmp_path, monkeypatch, "missing_runtime",
                             "import not_a_library_here  # noqa: F401\n")
    monkeypatch.setitem(runtimes._MODULES, "onnx", module)
    shown = " ".join(CliRunner().invoke(cli, ["extract", "--help"]).output.split())
    assert "onnx: unavailable here (runtime 'onnx' needs not_a_library_here" in shown
    result = CliRunner().invoke(cli, ["extract", str(small_tree), str(tmp_path / "s.h5"),
                                      "--runtime", "onnx"])
    message = str(result.exception)  # the one line `embedstore` prints
    assert result.exit_code == 1 and "\n" not in message
    assert "needs not_a_library_here, which is not installed" in message
    assert not (tmp_path / "s.h5").exists()


@pytest.fixture(autouse=True)
def _registries_are_restored():
    """Each test's registry line is undone after it (and a checkout with heads or
    runtimes of its own passes too)."""
    before = list(HEADS), list(runtimes._MODULES)
    yield
    assert (list(HEADS), list(runtimes._MODULES)) == before

