"""Calibration: temperature scaling, ECE, predict --unknown-below, export carrying T."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore import DenseHead, LogRegHead
from embedstore.calibration import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
)
from embedstore.extraction import extract
from embedstore.headdir import HeadDirError, read_manifest
from embedstore.store import open_store
from embedstore_cli.app import cli
from tests.conftest import SAMPLE


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _overconfident(n=20000, true_t=2.0, seed=0):
    """Labels drawn from softmax(z / 2) while the 'model' says softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, 5))
    truth = _softmax(z / true_t)
    y = np.array([rng.choice(5, p=p) for p in truth])
    return _softmax(z), y, truth


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    proba, y, truth = _overconfident()
    t = fit_temperature(proba, y)
    assert 1.8 < t < 2.2
    np.testing.assert_allclose(apply_temperature(proba, t), truth, atol=0.03)
    assert expected_calibration_error(apply_temperature(proba, t), y) < 0.02
    assert expected_calibration_error(proba, y) > 0.1
    # the argmax (accuracy) never changes
    np.testing.assert_array_equal(apply_temperature(proba, t).argmax(1), proba.argmax(1))
    report = calibrate(proba, y)
    assert report["applied"] and report["ece_after"] < report["ece_before"] / 3


def test_a_calibrated_model_keeps_temperature_one():
    proba, y, truth = _overconfident(true_t=1.0)
    assert abs(fit_temperature(proba, y) - 1.0) < 0.1
    assert abs(calibrate(proba, y)["temperature"] - 1.0) < 0.1


def test_ece_of_a_perfect_and_an_always_sure_model():
    y = np.array([0, 1] * 50)
    assert expected_calibration_error(np.eye(2)[y], y) == 0.0
    half_right = np.eye(2)[np.array([0, 0] * 50)]  # sure of class 0, right half the time
    assert expected_calibration_error(half_right, y) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone) -> dict:
    """10 classes x 8 real images, a logreg head on them (16 validation images)."""
    root = tmp_path_factory.mktemp("calib") / "images"
    for d in sorted(SAMPLE.iterdir()):
        (root / d.name).mkdir(parents=True)
        for p in sorted(d.glob("*.png"))[:8]:
            shutil.copy(p, root / d.name / p.name)
    store = root.parent / "store.h5"
    extract(root, store, backbone)
    head = root.parent / "head"
    result = CliRunner().invoke(cli, ["train", str(store), str(head)])
    assert result.exit_code == 0, result.output
    return {"store": store, "head": head, "root": root}


def test_train_records_ece_before_and_after(trained):
    metrics = json.loads((trained["head"] / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["method"] == "temperature" and cal["n"] == metrics["n_val"]
    assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1
    manifest = read_manifest(trained["head"])
    assert manifest.calibration["temperature"] == cal["temperature"] > 0


def test_predict_unknown_below(trained):
    files = [str(p) for p in sorted(trained["root"].rglob("*.png"))[::7]]
    runner = CliRunner()
    base = ["predict", str(trained["head"]), *files, "--store", str(trained["store"]), "--json"]
    plain = json.loads(runner.invoke(cli, base).output)
    assert all("unknown" not in r and r["label"] for r in plain)
    probs = sorted(r["probability"] for r in plain)
    cut = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2  # flags half of them
    flagged = json.loads(runner.invoke(cli, base + ["--unknown-below", str(cut)]).output)
    from embedstore.prediction import ClassProbability, Prediction

    for r, f in zip(plain, flagged):  # what predict returns, as the TypedDicts say
        assert set(r) == set(Prediction.__annotations__) - {"unknown", "error"}
        assert set(f) == set(Prediction.__annotations__) - {"error"}
        assert all(set(t) == set(ClassProbability.__annotations__) for t in f["top_k"])
        assert f["unknown"] == (r["probability"] < cut)
        assert f["label"] == (None if f["unknown"] else r["label"])
        assert f["top_k"] == r["top_k"]  # the candidates are still listed
    text = runner.invoke(cli, base[:-1] + ["--unknown-below", str(cut)]).output
    assert text.count("(unknown)") == sum(f["unknown"] for f in flagged) > 0


def test_predict_applies_the_temperature(trained, tmp_path):
    from embedstore.headdir import load_head
    from embedstore.prediction import predict

    head = tmp_path / "hot"
    shutil.copytree(trained["head"], head)
    manifest = json.loads((head / "manifest.json").read_text())
    manifest["calibration"] = {"method": "temperature", "temperature": 3.0}
    (head / "manifest.json").write_text(json.dumps(manifest))
    file = sorted(trained["root"].rglob("*.png"))[0]
    [hot] = predict(head, [str(file)], top_k=10, store=trained["store"])
    with open_store(trained["store"]) as s:
        x = s.embeddings([list(s.paths).index(f"{file.parent.name}/{file.name}")])
    expected = apply_temperature(load_head(head).predict_proba(x), 3.0)[0]
    classes = read_manifest(head).classes
    got = {t["label"]: t["probability"] for t in hot["top_k"]}
    np.testing.assert_allclose([got[c] for c in classes], expected, atol=1e-6)
    manifest["calibration"]["temperature"] = -1
    (head / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeadDirError, match="temperature -1.0 is not a positive number"):
        predict(head, [str(file)], store=trained["store"])


@pytest.mark.parametrize("kind", ["logreg", "dense"])
def test_export_folds_the_temperature_into_the_softmax_layer(trained, kind):
    with open_store(trained["store"]) as s:
        X, y = s.embeddings(), s.labels
    head = (LogRegHead() if kind == "logreg" else
            DenseHead(hidden=(16,), epochs=2, verbose=0)).fit(X, y)
    layer = head.export_layer(X.shape[1], temperature=2.5)
    np.testing.assert_allclose(np.asarray(layer(X)), apply_temperature(head.predict_proba(X),
                                                                        2.5), atol=1e-5)
