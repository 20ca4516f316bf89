"""Heads on the cache: estimator contract, splits, train / sweep / evaluate."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.datasets import make_classification

from embedstore import DenseHead, KNNHead, LogRegHead
from embedstore.backbones import BackboneError
from embedstore.evaluate import EvaluationError, evaluate_head
from embedstore.headdir import HeadDirError, load_head, read_manifest
from embedstore.splits import SplitError, conflicting_duplicates, load_split, validation_mask
from embedstore.training import train
from embedstore_cli.app import cli
from tests.conftest import labelled_store


@pytest.fixture(scope="module")
def blobs():
    X, y = make_classification(600, 32, n_informative=12, n_classes=3, class_sep=2.0,
                               random_state=0)
    return X.astype(np.float32), y


@pytest.mark.parametrize("head", [
    LogRegHead(), LogRegHead(C="auto", Cs=(0.01, 1.0)), KNNHead(k=5),
    KNNHead(k=5, weights="distance", class_weight="balanced"),
    DenseHead(hidden=(32,), epochs=60, batch_size=64, learning_rate=0.01),
    DenseHead(hidden=(), optimizer="sgd", learning_rate=0.05, label_smoothing=0.1, epochs=30,
              class_weight="balanced"),
])
def test_heads_follow_the_estimator_contract(head, blobs, tmp_path):
    from embedstore.backbones.reference import BackboneRef
    from embedstore.headdir import HeadManifest, write_head_dir

    X, y = blobs
    params = head.get_params()
    assert clone(head).get_params() == params  # constructor only stores
    assert head.fit(X[:500], y[:500]) is head
    proba = head.predict_proba(X[500:])
    assert proba.shape == (100, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert head.score(X[500:], y[500:]) > 0.8  # chance is 0.33
    assert list(head.classes_) == [0, 1, 2]
    manifest = HeadManifest("", head.get_params(), ["a", "b", "c"],
                            BackboneRef("t", "0" * 64, 32), "s.h5", {"seed": 0})
    write_head_dir(tmp_path / "h", head, manifest, {})
    again = load_head(tmp_path / "h")
    assert type(again) is type(head) and again.get_params() == params
    np.testing.assert_allclose(again.predict_proba(X[500:]), proba, atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logreg_folds_the_scaler_into_one_linear_layer(blobs, n_classes):
    X, y = blobs
    keep = y < n_classes  # two classes: sklearn keeps one logit, the export needs two
    X, y = X[keep], y[keep]
    head = LogRegHead().fit(X, y)
    W, b = head.folded_linear()
    logits = X @ W + b
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(softmax, head.predict_proba(X), atol=1e-4)


@pytest.mark.tf
def test_dense_head_keeps_history_and_stops_early(blobs):
    X, y = blobs
    head = DenseHead(hidden=(64,), epochs=200, patience=2, learning_rate=0.01,
                     early_stopping=True).fit(X, y)
    assert head.n_epochs_ < 200
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(head.history_)


def test_class_weights_shift_knn_votes_towards_the_rare_class():
    X = np.array([[1, 0], [1, 0.01], [1, 0.02], [1, 0.03], [0.99, 0.05]], np.float32)
    y = np.array([0, 0, 0, 0, 1])
    plain = KNNHead(k=5).fit(X, y).predict_proba(X[:1])[0]
    balanced = KNNHead(k=5, class_weight="balanced").fit(X, y).predict_proba(X[:1])[0]
    assert plain[1] == pytest.approx(0.2) and balanced[1] == pytest.approx(0.5)


def test_split_is_stable_stratified_and_keeps_views_together():
    rng = np.random.default_rng(0)
    sha = [f"{i:064x}" for i in range(2000)]
    labels = rng.integers(0, 4, 2000)
    val = validation_mask(sha, labels, 0.25, seed=3)
    assert 0.2 < val.mean() < 0.3
    for c in range(4):
        assert 0.18 < val[labels == c].mean() < 0.32
    grown = validation_mask(sha + [f"{i:064x}" for i in range(5000, 5500)],
                            np.concatenate([labels, rng.integers(0, 4, 500)]), 0.25, seed=3)
    assert np.array_equal(grown[:2000], val)  # every image keeps its split
    assert not np.array_equal(validation_mask(sha, labels, 0.25, seed=4), val)
    # views share the content hash, so they share the split
    views_sha = sha[:10] * 3
    views_val = validation_mask(views_sha, np.tile(labels[:10], 3), 0.5, seed=1)
    assert np.array_equal(views_val[:10], views_val[10:20])


def test_tiny_classes_keep_a_training_and_a_validation_image():
    val = validation_mask(["a", "b", "c"], [0, 0, 1], 0.01)
    assert val[:2].sum() == 1 and not val[2]


def test_duplicates_under_two_labels_are_reported():
    dup = conflicting_duplicates(["x", "x", "y"], [0, 1, 1], ["a/1.png", "b/1.png", "b/2.png"],
                                 ["a", "b"])
    assert dup == [{"sha256": "x", "classes": ["a", "b"], "paths": ["a/1.png", "b/1.png"]}]


def test_train_writes_model_manifest_and_metrics(sample_store, tmp_path):
    out = tmp_path / "head"
    metrics = train(sample_store, out, head="logreg", val_fraction=0.3, seed=0)
    written = json.loads((out / "metrics.json").read_text())
    # pretrained features separate Fashion-MNIST far above the 10% of chance
    assert written["val_accuracy"] > 0.6 and written["val_accuracy"] == metrics["val_accuracy"]
    assert {"val_macro_f1", "train_seconds"} <= set(written)
    assert written["params"] == {**LogRegHead().get_params(), "Cs": [0.001, 0.01, 0.1, 1.0]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"] == "logreg" and len(manifest["classes"]) == 10
    assert not list(out.glob("*.joblib"))  # no pickles
    assert manifest["backbone"]["name"] == "mobilenet_v2"
    assert manifest["split"] == {"seed": 0, "val_fraction": 0.3,
                                 "method": "sha256(seed:content)"}
    assert len(manifest["rows_sha256"]) == 64 and "tensorflow" in manifest["versions"]
    assert manifest["n_train"] + manifest["n_val"] == 300
    again = train(sample_store, tmp_path / "again", head="logreg", val_fraction=0.3, seed=0)
    assert again["val_accuracy"] == metrics["val_accuracy"]  # deterministic
    with pytest.raises(HeadDirError, match="already holds a trained head; pass --overwrite"):
        train(sample_store, out, head="knn")
    assert read_manifest(out).head == "logreg"  # untouched
    train(sample_store, out, head="knn", overwrite=True)
    assert read_manifest(out).head == "knn" and not (out / "model.keras").exists()


def test_evaluate_on_split_and_on_another_store_with_plots(sample_store, tmp_path):
    out = tmp_path / "dense"
    train(sample_store, out, head="dense", val_fraction=0.3, epochs=10, hidden=(64,))
    on_split = evaluate_head(out)
    assert on_split["n"] == json.loads((out / "manifest.json").read_text())["n_val"]
    assert sorted(p.rsplit("/", 1)[1] for p in on_split["plots"]) == \
        ["accuracy.png", "confusion_matrix.png", "loss.png"]
    assert (out / "loss.png").stat().st_size > 1000
    on_store = evaluate_head(out, sample_store, plots=False)
    # 10 classes: top-5 covers at least what top-1 does, and here strictly more
    assert on_store["n"] == 300 and on_store["accuracy"] < on_store["top5_accuracy"] <= 1
    assert np.sum(on_store["confusion_matrix"]) == 300
    assert set(on_store["per_class"]["Bag"]) == {"precision", "recall", "f1", "support"}


def test_evaluate_cli_assertion_sets_the_exit_code(sample_store, tmp_path):
    out = tmp_path / "knn"
    train(sample_store, out, head="knn", k=5)
    runner = CliRunner()
    ok = runner.invoke(cli, ["evaluate", str(out), "--json", "--assert-accuracy-at-least", "0.3"])
    assert ok.exit_code == 0 and json.loads(ok.output)["accuracy"] >= 0.3
    fail = runner.invoke(cli, ["evaluate", str(out), "--assert-accuracy-at-least", "1.01"])
    assert fail.exit_code == 1


def test_sweep_cli_ranks_a_grid(sample_store):
    result = CliRunner().invoke(cli, ["sweep", str(sample_store), "--head", "logreg",
                                      "--head", "knn", "--C", "0.1,1", "--k", "3,9", "--json"])
    assert result.exit_code == 0, result.output
    board = json.loads(result.output)
    assert len(board) == 4
    accs = [m["val_accuracy"] for m in board]
    assert accs == sorted(accs, reverse=True)
    assert {m["head"] for m in board} == {"logreg", "knn"}


def test_train_cli_refuses_options_of_another_head(sample_store, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(sample_store), str(tmp_path / "x"),
                                      "--head", "knn", "--C", "1"])
    assert result.exit_code == 2 and "applies to the logreg head" in result.output


def _store(tmp_path, labels, classes_of):
    X = np.random.default_rng(0).normal(size=(len(labels), 3))
    return labelled_store(tmp_path / "t.h5", X, [classes_of(x) for x in labels])


def test_bad_training_stores_get_clear_errors(tmp_path):
    with pytest.raises(SplitError, match="no labelled rows"):
        load_split(_store(tmp_path / "u", [0] * 5, lambda x: None))
    with pytest.raises(SplitError, match="at least two class"):
        load_split(_store(tmp_path / "one", [0] * 5, lambda x: "a"))
    # a one-image class still gets a training image ...
    tiny = load_split(_store(tmp_path / "tiny", [0] * 5 + [1], lambda x: "ab"[x]), 0.5)
    assert 1 in tiny.y_train
    # ... and a class left without rows on disk (a pruned class) is not listed by the store
    edited = _store(tmp_path / "edited", [0, 1] * 3, lambda x: "ab"[x])
    with h5py.File(edited / "index.h5", "r+") as f:
        del f["classes"]
        f.create_dataset("classes", data=["a", "b", "c"], dtype=h5py.string_dtype())
    assert load_split(edited).classes == ["a", "b"]


def test_evaluate_refuses_a_store_from_another_backbone(sample_store, tmp_path):
    out = tmp_path / "lr"
    train(sample_store, out)
    other = _store(tmp_path, [0, 1] * 3, lambda x: "ab"[x])
    with pytest.raises(BackboneError, match="uses backbone t .* but .*manifest.json uses "
                                            "mobilenet_v2"):
        evaluate_head(out, other)


def test_metrics_name_top5_only_when_it_means_something(tmp_path):
    three = _store(tmp_path, [0, 1, 2] * 10, lambda x: "abc"[x])
    metrics = train(three, tmp_path / "h3", val_fraction=0.3)
    assert "val_accuracy" in metrics and not any(k.startswith("val_top") for k in metrics)


def test_val_fraction_zero_trains_and_evaluate_says_what_to_do(sample_store, tmp_path):
    metrics = train(sample_store, tmp_path / "h", val_fraction=0.0)
    assert metrics["n_val"] == 0 and "val_accuracy" not in metrics
    with pytest.raises(EvaluationError, match="no validation split; give a labelled test STORE"):
        evaluate_head(tmp_path / "h")
    result = CliRunner().invoke(cli, ["train", str(sample_store), str(tmp_path / "c"),
                                      "--val-fraction", "0"])
    assert result.exit_code == 0 and "no validation split" in result.output


@pytest.mark.parametrize("flag, value, head", [
    ("--weights", "distnace", "knn"), ("--k", "0", "knn"), ("--head-batch-size", "big", "dense"),
    ("--head-batch-size", "0", "dense"), ("--optimizer", "adamw", "dense"),
    ("--C", "-1", "logreg"), ("--class-weight", "balance", "logreg"),
    ("--early-stopping", "maybe", "dense"), ("--hidden", "64x0", "dense"),
])
def test_a_bad_head_option_is_reported_under_its_own_name(sample_store, tmp_path, flag, value,
                                                          head):
    result = CliRunner().invoke(cli, ["train", str(sample_store), str(tmp_path / "x"),
                                      "--head", head, flag, value])
    assert result.exit_code == 2 and f"{flag}" in result.output, result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").write_text("{not json"), "not readable JSON"),
    (lambda d: (d / "manifest.json").write_text('{"head": "logreg"}'), "lacks params"),
    (lambda d: (d / "state.npz").unlink(), "no state.npz"),
    (lambda d: (d / "state.npz").write_bytes(b"garbage"), "damaged or incomplete"),
])
def test_damaged_head_directories_get_one_line_naming_them(sample_store, tmp_path, damage,
                                                           message):
    out = tmp_path / "h"
    train(sample_store, out)
    damage(out)
    with pytest.raises(HeadDirError, match=message):
        load_head(out)


def test_a_planted_pickle_is_never_loaded(sample_store, tmp_path):
    """embedstore <= 0.1 stored model.joblib; a head directory must not run code."""
    import pickle

    out = tmp_path / "h"
    train(sample_store, out)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (out / "model.joblib").write_bytes(pickle.dumps(Payload()))
    (out / "state.npz").unlink()
    with pytest.raises(HeadDirError, match="pickle .* not loaded; retrain"):
        load_head(out)
    assert not marker.exists()


def test_train_sweep_and_evaluate_results_have_the_keys_their_types_name(tmp_path):
    from embedstore.evaluate import Evaluation
    from embedstore.training import HeadMetrics, TrainResult, sweep

    def shaped_as(result, typed) -> bool:
        keys = set(result)
        return typed.__required_keys__ <= keys <= typed.__required_keys__ | typed.__optional_keys__

    store = _store(tmp_path, [0, 1, 2, 3, 4, 5] * 10, lambda x: "abcdef"[x])
    trained = train(store, tmp_path / "h", val_fraction=0.3)
    assert shaped_as(trained, TrainResult) and "val_top5_accuracy" in trained
    board = sweep(store, [("logreg", {}), ("knn", {"k": 3})])
    assert all(shaped_as(m, HeadMetrics) for m in board)
    assert shaped_as(evaluate_head(tmp_path / "h", plots=False), Evaluation)
