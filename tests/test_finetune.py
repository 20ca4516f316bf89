"""Fine-tuning on cached activations: outputs, faithfulness, reuse, bad input.

One real run (3 classes x 8 real images, the real MobileNetV2, a late block,
2 epochs of the large recipe, --no-guard so that the tuned weights are kept
whatever the hold-out says) is shared by the tests that read its outputs; the
guard's own runs are cheaper (block 18, one epoch).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.activations import ActivationCache, CacheError
from embedstore.backbones import load_backbone
from embedstore.extraction import extract
from embedstore.finetuning import (
    BackboneChange,
    CacheInfo,
    FinetuneReport,
    FinetuneScores,
    GuardReport,
    LeftOutFile,
    RecipeSettings,
    sign_test_p,
)
from embedstore.store import open_store
from embedstore.training import train
from embedstore_cli.app import cli

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist-sample"
BLOCK = "16"


def _digests(*paths: Path) -> dict:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, backbone):
    work = tmp_path_factory.mktemp("finetune")
    images = work / "images"
    for cls in ["Bag", "Sneaker", "Trouser"]:
        (images / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[:8]:
            shutil.copy(p, images / cls / p.name)
    store, head = work / "store.h5", work / "head"
    extract(images, store, backbone)
    train(store, head, head="logreg")
    before = _digests(store, head)
    result = CliRunner().invoke(cli, ["finetune", str(head), str(work / "out"), "--images",
                                      str(images), "--unfreeze-from", BLOCK, "--epochs", "2",
                                      "--recipe", "large", "--no-guard", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return {"work": work, "images": images, "store": store, "head": head, "out": work / "out",
            "report": report, "before": before, "stderr": result.stderr}


def test_outputs_are_a_tuned_backbone_a_rebuilt_store_and_a_retrained_head(tuned, backbone):
    out, report = tuned["out"], tuned["report"]
    assert "epoch 2/2: training loss" in tuned["stderr"]
    assert "hold-out (3 images) loss" in tuned["stderr"]
    assert not report["kept_original_weights"] and not report["guard"]["enabled"]
    assert _digests(tuned["store"], tuned["head"]) == tuned["before"]  # originals untouched
    tuned_backbone = load_backbone(str(out / "backbone"))
    assert tuned_backbone.fingerprint != backbone.fingerprint
    assert report["backbone"]["after"] == tuned_backbone.fingerprint
    layer = "features_17_conv_0_conv"  # trained: inside the top
    assert not np.allclose(tuned_backbone.model.get_layer(layer).get_weights()[0],
                           backbone.model.get_layer(layer).get_weights()[0])
    layer = "features_10_conv_0_conv"  # frozen: below the block
    np.testing.assert_array_equal(tuned_backbone.model.get_layer(layer).get_weights()[0],
                                  backbone.model.get_layer(layer).get_weights()[0])
    with open_store(tuned["store"]) as a, open_store(out / "store.h5") as b:
        assert b.backbone["fingerprint"] == tuned_backbone.fingerprint
        original = sorted(zip(a.paths, a.sha256, [a.classes[y] for y in a.labels]))
        rebuilt = sorted(zip(b.paths, b.sha256, [b.classes[y] for y in b.labels]))
        assert rebuilt == original
    manifest = json.loads((out / "head" / "manifest.json").read_text())
    assert manifest["head"] == "logreg"
    assert manifest["backbone"]["fingerprint"] == tuned_backbone.fingerprint
    # 9 validation images and 2 epochs of CPU training that is not bit-reproducible, with
    # the guard off: the rebuilt store and retrained head must still separate the classes
    # (chance is 1/3); the guard's run below is the one that must not be worse
    assert report["before"]["val_accuracy"] >= 0.8 and report["after"]["val_accuracy"] >= 0.6
    assert set(report["timings"]) >= {"cache_seconds", "train_seconds", "rebuild_seconds"}
    cache_dir = Path(report["cache"]["dir"])
    meta = json.loads((cache_dir / "cache.json").read_text())
    cached = [s for sha, _ in ActivationCache(cache_dir, meta).chunks() for s in sha]
    assert cached == sorted(cached)  # hash order: chunks mix the classes the store sorts


def test_rebuilt_store_matches_a_fresh_extraction_with_the_tuned_backbone(tuned):
    fresh = tuned["work"] / "fresh.h5"
    extract(tuned["images"], fresh, str(tuned["out"] / "backbone"))
    with open_store(fresh) as a, open_store(tuned["out"] / "store.h5") as b:
        row = {p: i for i, p in enumerate(a.paths)}
        x = a.embeddings([row[p] for p in b.paths])
        y = b.embeddings()
    cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cosine.min() >= 0.999  # 16-bit activations included


def _assert_shaped_as(result: dict, typed) -> None:
    """RESULT holds every required key of the TypedDict TYPED and no key it lacks."""
    assert set(result) <= set(typed.__annotations__), set(result) - set(typed.__annotations__)
    assert typed.__required_keys__ <= set(result), typed.__required_keys__ - set(result)


def test_the_report_of_a_run_that_trained_is_a_finetune_report(tuned):
    report = tuned["report"]
    assert set(report) == set(FinetuneReport.__annotations__)  # a trained run has every key
    assert set(report["guard"]) == set(GuardReport.__annotations__)
    for part, typed in [("before", FinetuneScores), ("after", FinetuneScores),
                        ("backbone", BackboneChange), ("cache", CacheInfo),
                        ("recipe_settings", RecipeSettings)]:
        assert set(report[part]) == set(typed.__annotations__), part


def test_predict_and_export_work_with_the_new_head(tuned, tmp_path):
    runner = CliRunner()
    image = next((tuned["images"] / "Bag").glob("*.png"))
    head, backbone = str(tuned["out"] / "head"), str(tuned["out"] / "backbone")
    result = runner.invoke(cli, ["predict", head, str(image), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["label"] in {"Bag", "Sneaker", "Trouser"}
    named = runner.invoke(cli, ["predict", head, str(image), "--json", "--backbone", backbone])
    assert json.loads(named.stdout)[0] == json.loads(result.stdout)[0]
    result = runner.invoke(cli, ["export", head, str(tmp_path / "m.keras"), "--format", "keras"])
    assert result.exit_code == 0, result.output


def test_a_hold_out_too_small_to_show_a_gain_stops_before_training(tuned):
    out = tuned["work"] / "out-stopped"
    result = CliRunner().invoke(cli, ["finetune", str(tuned["head"]), str(out) + "/",
                                      "--unfreeze-from", "18", "--cache-dir",
                                      str(tuned["work"] / "never")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert f"wrote {out / 'store.h5'}, {out / 'head'}, {out / 'report.json'}" in result.stderr
    # 3 hold-out images: the sign test needs 5 wins, so no run could ever be adopted
    assert "the guard will judge on 3 hold-out images" in result.stderr
    assert "no gain can be shown on this set" in result.stderr
    assert report["stopped_before_training"] and report["kept_original_weights"]
    assert not report["guard"]["can_adopt"] and report["guard"]["min_wins_to_adopt"] == 5
    assert report["after"] == report["before"]
    assert not (tuned["work"] / "never").exists()  # no cache, no model: nothing was run
    _assert_shaped_as(report, FinetuneReport)
    assert not set(report) & FinetuneReport.__optional_keys__  # those only training gives
    assert set(report["guard"]) == GuardReport.__required_keys__
    _assert_names_the_original_backbone(out, tuned["store"])
    assert _digests(tuned["store"], tuned["head"]) == tuned["before"]


def test_a_head_without_a_validation_split_prints_dashes_for_its_scores(tuned, tmp_path):
    head = tmp_path / "head"
    train(tuned["store"], head, val_fraction=0.0)
    result = CliRunner().invoke(cli, ["finetune", str(head), str(tmp_path / "out"),
                                      "--unfreeze-from", "18"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["before", "-", "-"] and lines[2].split() == ["after", "-", "-"]


def _assert_names_the_original_backbone(out: Path, store: Path) -> None:
    """OUT_DIR's store and head are the original's: same backbone record, same vectors."""
    with open_store(store) as a, open_store(out / "store.h5") as b:
        assert b.backbone["name"] == a.backbone["name"] == "mobilenet_v2"
        assert b.backbone["fingerprint"] == a.backbone["fingerprint"]
        row = {p: i for i, p in enumerate(b.paths)}
        assert sorted(row) == sorted(a.paths)
        np.testing.assert_array_equal(b.embeddings([row[p] for p in a.paths]), a.embeddings())
    manifest = json.loads((out / "head" / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "mobilenet_v2"


def test_the_guard_keeps_the_original_weights_when_the_hold_out_cannot_tell(tuned, backbone):
    out = tuned["work"] / "out-guarded"
    result = CliRunner().invoke(cli, ["finetune", str(tuned["head"]), str(out), "--images",
                                      str(tuned["images"]), "--unfreeze-from", "18",
                                      "--epochs", "1", "--force", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # a hold-out of three images: nothing on it is significant, the original weights stay
    assert report["kept_original_weights"] and report["guard"]["p_value"] >= 0.05
    assert "keeping the original weights" in result.stderr
    assert report["after"] == report["before"]
    # OUT_DIR/backbone is still written, with the original weights; the head and store
    # name the original backbone, not that copy
    assert load_backbone(str(out / "backbone")).fingerprint == backbone.fingerprint
    assert report["backbone"]["after"] == backbone.fingerprint
    _assert_names_the_original_backbone(out, tuned["store"])
    assert _digests(tuned["store"], tuned["head"]) == tuned["before"]


def test_the_small_recipe_starts_at_the_frozen_head_and_keeps_its_best_epoch(tuned, backbone):
    """Epoch 0 (no update) scores what the frozen head scores; a learning rate that only
    makes things worse leaves the original weights (epoch 0 was the best)."""
    out = tuned["work"] / "out-small"
    result = CliRunner().invoke(cli, ["finetune", str(tuned["head"]), str(out),
                                      "--unfreeze-from", BLOCK, "--epochs", "2",
                                      "--learning-rate", "3", "--no-guard", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"] == "small" and report["recipe_settings"]["batchnorm"] == "inference"
    frozen = report["guard"]["holdout_accuracy_original"]
    assert report["start"]["accuracy"] == pytest.approx(frozen)
    assert "epoch 0/2 (before any update): hold-out (3 images) loss" in result.stderr
    assert f"accuracy {frozen:.4f} (frozen head {frozen:.4f})" in result.stderr
    assert not any(loss < report["start"]["loss"]  # lr 3: every epoch worse (or NaN)
                   for loss in report["history"]["val_loss"])
    kept = load_backbone(str(out / "backbone"))
    for layer in ("features_17_conv_0_conv", "features_16_conv_1_bn"):
        for w, w0 in zip(kept.model.get_layer(layer).get_weights(),
                         backbone.model.get_layer(layer).get_weights()):
            np.testing.assert_array_equal(w, w0)
    assert report["after"]["val_accuracy"] == report["before"]["val_accuracy"]


@pytest.mark.parametrize("args, random_flip", [
    ([], True), (["--no-random-flip"], False), (["--random-flip"], True),
    (["--augment", "none"], False), (["--augment", "flip"], True),
    (["--augment", "flip", "--random-flip"], True),
])
def test_random_flip_and_the_deprecated_augment_alias(tmp_path, monkeypatch, args, random_flip):
    """--augment flip|none, the option's old name, still works (hidden from --help) and
    says what to write instead; the library is called with random_flip either way."""
    import embedstore.finetuning

    calls = []
    monkeypatch.setattr(embedstore.finetuning, "finetune",
                        lambda *a, **kw: calls.append(kw) or {})
    result = CliRunner().invoke(cli, ["finetune", str(tmp_path), str(tmp_path / "out"),
                                      *args, "--json"])
    assert result.exit_code == 0, result.output
    assert calls[0]["random_flip"] is random_flip and "augment" not in calls[0]
    assert ("is deprecated: use --" in result.stderr) == ("--augment" in args)


def test_the_augment_alias_is_hidden_and_cannot_contradict_random_flip(tmp_path):
    help_text = CliRunner().invoke(cli, ["finetune", "--help"]).output
    assert "--random-flip / --no-random-flip" in help_text and "--augment" not in help_text
    result = CliRunner().invoke(cli, ["finetune", str(tmp_path), str(tmp_path / "out"),
                                      "--augment", "flip", "--no-random-flip"])
    assert result.exit_code == 2
    assert "--augment flip contradicts --no-random-flip" in result.output


def test_recipes_by_training_rows():
    from embedstore.finetuning import LARGE, LARGE_FROM, SMALL, choose_recipe

    assert choose_recipe(LARGE_FROM - 1) is SMALL and choose_recipe(LARGE_FROM) is LARGE
    assert choose_recipe(10, "large") is LARGE
    # 60k images (43,272 training rows): issue 13's measured recipe, unchanged
    assert LARGE.settings(677, None, None, None) == {
        "epochs": 3, "learning_rate": 1e-3, "patience": 2, "batchnorm": "train",
        "start": "fresh"}
    small = SMALL.settings(2, None, None, None)  # ~140 images: a few dozen steps at most
    assert small["epochs"] * 2 <= 30 and small["patience"] == 2
    assert small["learning_rate"] == 1e-4


def test_sign_test_needs_a_clear_majority_of_the_disagreements():
    assert sign_test_p(5, 0) == 1 / 32  # the fewest disagreements that can adopt
    assert sign_test_p(3, 1) == 5 / 16 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(34, 11) < 0.001  # a 5-point gain on 450 hold-out images


def test_batchnorm_statistics_are_recalibrated_to_the_training_batches():
    import keras

    from embedstore.finetuning import _recalibrate_batchnorm

    bn = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Sequential([keras.Input((3,)), bn])
    x = np.random.default_rng(0).normal(5.0, 2.0, (96, 3)).astype(np.float32)
    batches = [(x[i:i + 32], None) for i in range(0, 96, 32)]
    _recalibrate_batchnorm(model, batches)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.mean([b.var(0) for b, _ in batches], 0), rtol=1e-4)
    assert bn.momentum == 0.9


def test_second_run_reuses_the_cache_without_images(tuned):
    result = CliRunner().invoke(cli, ["finetune", str(tuned["head"]), str(tuned["work"] / "out2"),
                                      "--unfreeze-from", BLOCK, "--epochs", "1", "--force",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert "all 24 images cached" in result.stderr
    assert "caching block inputs" not in result.stderr


def test_block_0_trains_the_whole_network_from_pixels(tuned, backbone):
    out = tuned["work"] / "out-pixels"
    result = CliRunner().invoke(cli, ["finetune", str(tuned["head"]), str(out), "--images",
                                      str(tuned["images"]), "--unfreeze-from", "0",
                                      "--epochs", "1", "--recipe", "large", "--no-guard",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert "from pixels: on a CPU this is slow" in result.stderr
    assert json.loads(result.stdout)["cache"] is None  # no activation cache
    tuned_backbone = load_backbone(str(out / "backbone"))
    layer = "features_0_conv"  # the stem trained too
    assert not np.allclose(tuned_backbone.model.get_layer(layer).get_weights()[0],
                           backbone.model.get_layer(layer).get_weights()[0])
    with open_store(tuned["store"]) as a, open_store(out / "store.h5") as b:
        assert sorted(b.paths) == sorted(a.paths)
        assert b.backbone["fingerprint"] == tuned_backbone.fingerprint


def test_changed_and_missing_images_are_reported_and_left_out(tuned):
    images = tuned["work"] / "images-edited"
    shutil.copytree(tuned["images"], images)
    bags = sorted((images / "Bag").glob("*.png"))
    bags[0].unlink()
    bags[1].write_bytes((tuned["images"] / "Sneaker" / sorted(
        p.name for p in (tuned["images"] / "Sneaker").glob("*.png"))[0]).read_bytes())
    result = CliRunner().invoke(cli, [
        "finetune", str(tuned["head"]), str(tuned["work"] / "out3"), "--images", str(images),
        "--unfreeze-from", "18", "--epochs", "1", "--cache-dir", str(tuned["work"] / "c3"),
        "--force", "--json"])
    assert result.exit_code == 0, result.output
    left_out = json.loads(result.stdout)["left_out"]
    for p in left_out:
        _assert_shaped_as(p, LeftOutFile)
    left = {p["path"]: p["reason"] for p in left_out}
    assert left == {f"Bag/{bags[0].name}": "missing",
                    f"Bag/{bags[1].name}": "changed since extraction"}
    with open_store(tuned["work"] / "out3" / "store.h5") as s:
        assert f"Bag/{bags[0].name}" not in set(s.paths)
        assert {f["path"] for f in s.failures()} >= set(left)


@pytest.mark.parametrize("args, message", [
    (["--unfreeze-from", "19"], "valid blocks: 1..18"),
    (["--unfreeze-from", "-1"], "valid blocks: 1..18"),
    (["--unfreeze-from", "nonsense_layer"], "has no layer 'nonsense_layer'"),
    (["--cache-dir", "{work}/empty-cache"], "give --images"),
])
def test_bad_input_is_one_clear_line(tuned, args, message):
    args = [a.format(work=tuned["work"]) for a in args]
    result = CliRunner().invoke(cli, ["finetune", str(tuned["head"]),
                                      str(tuned["work"] / "bad"), "--force", *args])
    assert result.exit_code != 0
    assert message in str(result.exception)


def test_hub_backbone_gets_a_clear_error(tuned, tmp_path):
    head = tmp_path / "hub-head"
    shutil.copytree(tuned["head"], head)
    manifest = json.loads((head / "manifest.json").read_text())
    manifest["backbone"]["name"] = "hub:/some/savedmodel"
    (head / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["finetune", str(head), str(tmp_path / "out")])
    assert "cannot be split into blocks" in str(result.exception)


def test_cache_chunks_survive_a_full_disk_and_a_crash(tmp_path, monkeypatch):
    meta = {"fingerprint": "f" * 64, "block": "b", "shape": [2, 2, 3]}
    cache = ActivationCache(tmp_path / "c", meta)
    x = np.random.default_rng(0).normal(size=(4, 2, 2, 3)).astype(np.float32)
    cache.write_chunk(["a", "b", "c", "d"], x)
    (tmp_path / "c" / ".chunk-000000002.tmp").write_bytes(b"half a chunk")  # a kill -9

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(CacheError, match="disk full .* chunks already written are kept"):
        cache.write_chunk(["e"], x[:1])
    monkeypatch.undo()
    again = ActivationCache(tmp_path / "c", meta)  # the next run
    assert again.cached_sha() == {"a", "b", "c", "d"}
    assert not list((tmp_path / "c").glob(".chunk-*"))
    (sha, stored), = list(again.chunks())
    assert np.allclose(stored, x, rtol=1e-3, atol=1e-3)
    with pytest.raises(CacheError, match="caches block b"):
        ActivationCache(tmp_path / "c", {**meta, "block": "other"})


def test_keras_backbones_split_at_a_layer_named_block(tmp_path):
    import keras

    from embedstore.backbones import BackboneError
    from embedstore.backbones.split import split_at

    weights = tmp_path / "MobileNetV2.weights.h5"  # offline: random weights are enough here
    keras.applications.MobileNetV2(weights=None).save_weights(weights)
    model = load_backbone(f"keras:MobileNetV2@{weights}").model
    bottom, top = split_at(model, "block_13_expand")
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    assert bottom.output.shape[1:] == (14, 14, 96)
    np.testing.assert_allclose(top(bottom(x)), model(x), atol=1e-4)
    with pytest.raises(BackboneError, match="block_13_expand"):  # inside a residual block
        split_at(model, "block_14_project")
