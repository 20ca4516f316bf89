"""Fine-tuning that rebuilds the cache: tune the top of the backbone, re-embed.

head directory -> (frozen bottom over the images, once, into an activation
cache) -> top blocks + softmax head trained on the cache -> tuned backbone
saved -> store rebuilt from the same cache through the tuned top -> the same
head type retrained on the rebuilt store. The original store and head are
only read. With block 0 the whole network trains from pixels instead
(streamed, randomly flipped, rotated and zoomed), and the rebuild re-reads the
images.

Before anything runs, the guard's hold-out is sized up: the sign test needs 5
wins with no loss, so a hold-out on which the frozen head misses fewer than 5
images can never adopt tuned weights, and the run stops there (the original
weights written) unless forced.

Two recipes, chosen by the number of training rows (measured on Fashion-MNIST,
BENCHMARKS.md "Fine-tuning by set size"). Small sets (under LARGE_FROM rows):
the tutorials' recipe, the softmax starting as the frozen logreg head (so
epoch 0 scores what the frozen head scores), BatchNorm frozen in inference
mode, a peak learning rate of 1e-4, a few epochs. Large sets: issue 13's
recipe, 0.9407 on Fashion-MNIST 60k from block 14: BatchNorm trained with
batch statistics (ImageNet's do not fit another domain) and its moving
averages recomputed exactly after training, a fresh softmax layer (a folded
logreg head collapsed at this learning rate), AdamW to a peak of 1e-3 with
warm-up and cosine decay, 3 epochs. Both: label smoothing 0.1, horizontal
flips of the cached maps, and the best epoch on the hold-out kept, epoch 0
(no update) included. The tuned weights are adopted only if the retrained
head is significantly better on the hold-out; otherwise the original weights
are kept and OUT_DIR's store and head name the original backbone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from embedstore.activations import ActivationCache
from embedstore.atomic import replacing_dir
from embedstore.backbones import Backbone, load_backbone
from embedstore.backbones.reference import BackboneRef, check_same_backbone
from embedstore.backbones.split import entry_layer_name, split_at
from embedstore.extraction import backbone_meta
from embedstore.headdir import MANIFEST, HeadManifest, load_head, load_head_backbone, read_manifest
from embedstore.heads import make_head
from embedstore.pipeline import Resizer, batched, stream
from embedstore.splits import validation_mask
from embedstore.store import open_store, open_writer
from embedstore.training import train

DEFAULT_BLOCK = 14
CHUNK_IMAGES = 256
SHUFFLE_ROWS = 2048  # rows in the shuffle buffer: bounds training memory
HOLDOUT_FRACTION = 0.1
RECALIBRATION_ROWS = 4096  # enough for BatchNorm's per-channel means and variances
ADOPT_P_VALUE = 0.05  # the hold-out's evidence needed to adopt the tuned weights


class FinetuneError(ValueError):
    """Fine-tuning cannot run as asked, with what to do about it."""


# --- the report (finetune's return value and OUT_DIR/report.json) ---------------------

class FinetuneScores(TypedDict):
    """A head's scores on its own validation split (None: the split had no rows)."""

    val_accuracy: float | None
    val_macro_f1: float | None


class LeftOutFile(TypedDict):
    """An image of the store left out of fine-tuning and of the rebuilt store."""

    path: str
    sha256: str
    reason: str  # "missing", "changed since extraction", "cannot be read (...)"


class GuardPlan(TypedDict):
    """What the guard can show on the hold-out, known before training."""

    n_holdout: int
    frozen_holdout_errors: int
    min_wins_to_adopt: int
    smallest_detectable_gain: float | None  # None: no hold-out
    can_adopt: bool


class HoldoutVerdict(TypedDict):
    """The frozen and the retrained head compared on the hold-out (a sign test)."""

    n_holdout: int
    holdout_accuracy_original: float | None  # None: no hold-out
    holdout_accuracy_tuned: float | None
    only_tuned_right: int
    only_original_right: int
    p_value: float
    tuned_significantly_better: bool


class _VerdictKeys(TypedDict, total=False):
    # HoldoutVerdict's, in a report only when training ran (total=False rather than
    # NotRequired: __optional_keys__ stays right at runtime under PEP 563 on 3.11)
    holdout_accuracy_original: float | None
    holdout_accuracy_tuned: float | None
    only_tuned_right: int
    only_original_right: int
    p_value: float
    tuned_significantly_better: bool


class GuardReport(GuardPlan, _VerdictKeys):
    """The guard: whether it was on, its plan, and its verdict when training ran."""

    enabled: bool


class BackboneChange(TypedDict):
    before: str  # fingerprints: HEAD_DIR's backbone, the one OUT_DIR's store and head name
    after: str
    path: str | None  # OUT_DIR/backbone, None when training never ran


class CacheInfo(TypedDict):
    dir: str
    bytes: int


class RecipeSettings(TypedDict):
    epochs: int
    learning_rate: float
    patience: int
    batchnorm: str  # "train" or "inference"
    start: str  # "head" or "fresh"


class _ReportInputs(TypedDict):
    """The part of the report known before any training."""

    head_dir: str
    store: str
    out_dir: str
    head: str
    recipe: str  # "small" or "large"
    n_fit: int
    n_holdout: int
    n_val: int
    before: FinetuneScores
    dropped_augmented_views: int


class _TrainingKeys(TypedDict, total=False):
    """The part of the report there only when training ran."""

    block: str  # the first trained layer's name, "0" for pixels
    recipe_settings: RecipeSettings
    epochs: int  # planned; epochs_run may be fewer (early stopping)
    history: dict[str, list[float]]  # Keras's, per epoch
    start: dict[str, float]  # hold-out loss and accuracy before any update
    peak_rss_mb_through_training: float


class FinetuneReport(_ReportInputs, _TrainingKeys):
    """What `finetune` returns and writes to OUT_DIR/report.json. The keys of
    _TrainingKeys (block, recipe_settings, epochs, history, start,
    peak_rss_mb_through_training) are there only when training ran
    (stopped_before_training False)."""

    stopped_before_training: bool
    kept_original_weights: bool
    guard: GuardReport
    epochs_run: int
    after: FinetuneScores
    backbone: BackboneChange
    left_out: list[LeftOutFile]
    cache: CacheInfo | None  # None: no activation cache (from pixels, or never trained)
    timings: dict[str, float]  # "<stage>_seconds"


@dataclass
class OriginalRows:
    """The store's original rows (view 0: no augmented views), as the rebuild must
    reproduce them."""

    paths: np.ndarray
    sha256: np.ndarray
    labels: np.ndarray  # indices into classes, -1 unlabelled
    classes: list[str]
    failures: list[dict]
    dropped_views: int


def _read_rows(store: str) -> tuple[OriginalRows, dict]:
    with open_store(store) as s:
        views = s.views
        keep = views == 0
        rows = OriginalRows(s.paths[keep], s.sha256[keep], s.labels[keep], s.classes,
                            s.failures(), int((~keep).sum()))
        return rows, s.backbone


def _split(rows: OriginalRows, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val), the head's split (train.load_split's rule on view 0)."""
    labelled = np.flatnonzero(rows.labels >= 0)
    is_val = validation_mask(rows.sha256[labelled], rows.labels[labelled], val_fraction, seed)
    return labelled[~is_val], labelled[is_val]


def _log_default(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def finetune(head_dir: str | Path, out_dir: str | Path, images: str | Path | None = None,
             unfreeze_from: int | str = DEFAULT_BLOCK, epochs: int | None = None,
             learning_rate: float | None = None, batch_size: int = 64,
             random_flip: bool = True, patience: int | None = None,
             cache_dir: str | Path | None = None, log: Callable[[str], None] = _log_default,
             backbone_name: str | None = None, guard: bool = True, force: bool = False,
             recipe: str = "auto") -> FinetuneReport:
    """Fine-tune the backbone of the head in HEAD_DIR; write OUT_DIR; return the report.

    backbone_name: the head's backbone as the user names it (required for a
    hub: SavedModel, see backbones.reference). recipe: "auto" (by the number
    of training rows, see choose_recipe), "small" or "large"; learning_rate,
    epochs and patience None take the recipe's. guard=False adopts the tuned
    weights even when the hold-out does not show them better. When the
    hold-out is too small for the guard ever to adopt, nothing is trained and
    OUT_DIR gets the original weights, unless force (or guard=False).
    random_flip: flip the training batches at random, left to right (from pixels,
    block 0: also small random rotations and zooms); a training-time transform,
    unrelated to the augmented views a store may hold (fine-tuning reads view 0 only).
    """
    timings: dict[str, float] = {}
    manifest = read_manifest(head_dir)
    store, out = manifest.store, Path(out_dir)
    rows, store_backbone = _checked_inputs(manifest, head_dir, out)
    train_rows, val_rows = _split(rows, manifest.val_fraction, manifest.seed)
    head = load_head(head_dir)
    before = _scores(head, store, val_rows, rows)
    fit_rows, hold_rows = _holdout(rows, train_rows, manifest.seed)
    chosen = choose_recipe(len(fit_rows), recipe)
    reference = _Reference.fit(manifest, store, rows, fit_rows, hold_rows)
    log(_plan_message(reference, chosen, guard))
    common = _ReportInputs(
        head_dir=str(Path(head_dir).resolve()), store=store, out_dir=str(out.resolve()),
        head=manifest.head, recipe=chosen.name, n_fit=len(fit_rows), n_holdout=len(hold_rows),
        n_val=int(len(val_rows)), before=before, dropped_augmented_views=rows.dropped_views)
    if guard and not force and not reference.can_adopt:
        log("stopping before training: OUT_DIR gets the original weights (--force trains "
            "anyway, --no-guard adopts the tuned weights unjudged)")
        shutil.rmtree(out / "backbone", ignore_errors=True)  # an earlier run's, if any
        with _stage(timings, "head"):
            after = _write_original(manifest, out, rows, store_backbone, [])
        report: FinetuneReport = {
            **common, "stopped_before_training": True, "kept_original_weights": True,
            "guard": {"enabled": guard, **reference.plan()}, "epochs_run": 0,
            "after": after, "backbone": {"before": store_backbone["fingerprint"],
                                         "after": store_backbone["fingerprint"],
                                         "path": None},
            "left_out": [], "cache": None, "timings": timings}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    backbone = _load_head_backbone(manifest, head_dir, backbone_name)
    with _stage(timings, "cache"):
        feed = _training_feed(backbone, unfreeze_from, rows, images, store, cache_dir, log)
    skipped = {p["sha256"] for p in feed.problems}
    if skipped:  # files gone or changed since extraction: out of training and of the guard
        fit_rows, hold_rows = (np.array([r for r in idx if rows.sha256[r] not in skipped],
                                        np.int64) for idx in (fit_rows, hold_rows))
        reference = _Reference.fit(manifest, store, rows, fit_rows, hold_rows)
    original_weights = backbone.model.get_weights()
    with _stage(timings, "train"):
        training = _train_top(feed, rows, fit_rows, hold_rows, np.asarray(head.classes_),
                              manifest.seed, chosen, epochs, learning_rate, batch_size,
                              random_flip, patience, reference, log)
    peak_rss_mb = _peak_rss_mb()  # the process's peak so far: caching and training
    with _stage(timings, "save"):
        tuned = _save_backbone(backbone, out / "backbone")
    new_store = out / "store.h5"
    with _stage(timings, "rebuild"):
        _rebuild_store(new_store, backbone_meta(tuned), rows,
                       feed.embeddings(tuned, rows, unfreeze_from), feed.problems)
    with _stage(timings, "guard"):
        verdict = _holdout_verdict(manifest, reference, new_store, rows, fit_rows, hold_rows)
        adopted = verdict["tuned_significantly_better"] or not guard
        if not adopted:
            log(_kept_message(verdict))
            # OUT_DIR/backbone stays for convenience; the store and head name the original
            backbone.model.set_weights(original_weights)
            _save_backbone(backbone, out / "backbone", kept_original=True)
    with _stage(timings, "head"):
        after = (_retrain(manifest, new_store, out) if adopted else
                 _write_original(manifest, out, rows, store_backbone, feed.problems))

    history = training.history
    report = {
        **common, "stopped_before_training": False, "block": feed.block,
        "recipe_settings": training.settings, "epochs": training.epochs,
        "epochs_run": len(history.epoch), "kept_original_weights": not adopted,
        "guard": {"enabled": guard, **reference.plan(), **verdict},
        "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()},
        "start": training.start, "after": after,
        "backbone": {"before": backbone.fingerprint,
                     "after": tuned.fingerprint if adopted else store_backbone["fingerprint"],
                     "path": str((out / "backbone").resolve())},
        "left_out": feed.problems,
        "cache": None if feed.cache is None else {"dir": str(feed.cache.dir),
                                                    "bytes": feed.cache.nbytes()},
        "timings": timings, "peak_rss_mb_through_training": peak_rss_mb,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _retrain(manifest: HeadManifest, store: Path, out: Path) -> FinetuneScores:
    """OUT_DIR/head: the head's type and parameters trained on STORE, its scores."""
    # write_head_dir builds it beside and renames it in: a re-run replaces it atomically
    metrics = train(store, out / "head", head=manifest.head, val_fraction=manifest.val_fraction,
                    seed=manifest.seed, overwrite=True, **manifest.params)
    return {"val_accuracy": metrics.get("val_accuracy"),
            "val_macro_f1": metrics.get("val_macro_f1")}


def _write_original(manifest: HeadManifest, out: Path, rows: OriginalRows, store_backbone: dict,
                    problems: list[LeftOutFile]) -> FinetuneScores:
    """OUT_DIR/store.h5 and head with the original backbone: its name, fingerprint, vectors."""
    new_store = out / "store.h5"
    _rebuild_store(new_store, store_backbone, rows,
                   _stored_embeddings(manifest.store, rows, problems), problems)
    return _retrain(manifest, new_store, out)


@contextmanager
def _stage(timings: dict, name: str) -> Iterator[None]:
    """Time a stage of the run into timings[f"{name}_seconds"]."""
    start = time.perf_counter()
    yield
    timings[f"{name}_seconds"] = round(time.perf_counter() - start, 2)


# --- inputs --------------------------------------------------------------------------

def _checked_inputs(manifest: HeadManifest, head_dir, out: Path) -> tuple[OriginalRows, dict]:
    """The store's rows and backbone record, once every input is known to fit."""
    _check_out_dir(out, head_dir, manifest.store)
    if manifest.backbone.name.startswith("hub:"):
        raise FinetuneError(f"the head in {head_dir} uses {manifest.backbone.name}: a "
                            "TF-Hub model cannot be split into blocks; extract with "
                            "mobilenet_v2 or a keras: backbone to fine-tune")
    rows, store_backbone = _read_rows(manifest.store)
    check_same_backbone(manifest.backbone, BackboneRef.from_dict(store_backbone, manifest.store),
                        str(Path(head_dir) / MANIFEST), manifest.store,
                        advice="retrain the head on this store first")
    return rows, dict(store_backbone)


def _check_out_dir(out: Path, head_dir, store: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mine = {(out / "store.h5").resolve(), (out / "head").resolve(), out.resolve()}
    if Path(store).resolve() in mine or Path(head_dir).resolve() in mine:
        raise FinetuneError(f"{out} would overwrite the original store or head; "
                            "give a new OUT_DIR")


def _load_head_backbone(manifest: HeadManifest, head_dir, named_by_user: str | None) -> Backbone:
    """The head's backbone as a Keras model (the trust rule and fingerprint checked)."""
    import keras

    backbone = load_head_backbone(head_dir, named_by_user)  # also beside a moved head
    if not isinstance(backbone.model, keras.Model):
        raise FinetuneError(f"backbone {manifest.backbone.name} is not a Keras model and cannot "
                            "be split into blocks")
    return backbone


def _default_cache_dir(store: str, backbone: Backbone, block: str) -> Path:
    return Path(f"{store}.activations") / f"{block}-{backbone.fingerprint[:16]}"


def _images_root(images, store: str, cache: ActivationCache | None) -> Path:
    """Where the store's relative paths point: --images, or what the cache recorded."""
    root = images or (cache.meta.get("images") if cache else None)
    if root is None:
        raise FinetuneError(f"{store} does not record where its images are; give --images "
                            "with the folder (or file list's folder) it was extracted from")
    root = Path(root)
    if root.is_file():  # a file list: paths are relative to its folder
        root = root.parent
    if not root.is_dir():
        raise FinetuneError(f"--images {root} is not a folder; give the folder the store "
                            "was extracted from")
    return root.resolve()


def _verified_images(root: Path, rows: OriginalRows, indices, resizer: Resizer,
                     problems: list[LeftOutFile] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(sha256, decoded image) of each row whose file still has the store's content."""
    indices = list(indices)
    files = [str(root / rows.paths[r]) for r in indices]
    for item in stream(files, resizer):
        r = indices[item.index]
        expected = rows.sha256[r]
        reason = (f"cannot be read ({item.error})" if item.sha256 is None or item.error
                  else None if item.sha256 == expected else "changed since extraction")
        if item.sha256 is None and not os.path.exists(files[item.index]):
            reason = "missing"
        if reason:
            if problems is not None:
                problems.append({"path": str(rows.paths[r]), "sha256": expected,
                                 "reason": reason})
            continue
        assert item.image is not None  # read, unchanged and decoded
        yield expected, item.image


# --- what the top trains on ----------------------------------------------------------

@dataclass
class _TrainingFeed:
    """What the top trains on: the activation cache at a block, or pixels (block 0)."""

    block: str  # the block's entry layer name, "0" for pixels
    top: Any  # the Keras model that trains: blocks >= block
    resizer: Resizer
    cache: ActivationCache | None  # None: train from pixels under root
    root: Path | None  # set when cache is None
    problems: list[LeftOutFile]  # files left out: missing, changed, unreadable

    def dataset(self, rows: OriginalRows, idx: np.ndarray, classes: np.ndarray, batch_size: int,
                random_flip: bool, shuffle: bool):
        label_of = {rows.sha256[r]: int(np.searchsorted(classes, rows.labels[r])) for r in idx}
        if self.cache is None:
            assert self.root is not None
            return _pixel_dataset(self.root, rows, idx, label_of, self.resizer, len(classes),
                                  batch_size, shuffle)
        return _cache_dataset(self.cache, label_of, len(classes), batch_size, shuffle,
                              random_flip and shuffle)

    def embeddings(self, tuned: Backbone, rows: OriginalRows, unfreeze_from: int | str):
        """(sha256s, vectors) chunks of every image through the tuned backbone."""
        if self.cache is None:
            assert self.root is not None
            return _embed_images(tuned, self.root, rows, self.problems)
        return _embed_cache(self.cache, split_at(tuned.model, unfreeze_from)[1])


def _training_feed(backbone: Backbone, unfreeze_from: int | str, rows: OriginalRows, images,
                   store: str, cache_dir, log) -> _TrainingFeed:
    """Block 0: the images themselves; else the activation cache at the block, filled."""
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    if str(unfreeze_from) == "0":
        log("fine-tuning the whole network from pixels: on a CPU this is slow "
            "(every epoch runs the full backbone forward and backward)")
        return _TrainingFeed("0", backbone.model, resizer, None,
                             _images_root(images, store, None), [])
    block = entry_layer_name(backbone.model, unfreeze_from)
    bottom, top = split_at(backbone.model, unfreeze_from)
    cache = ActivationCache(
        Path(cache_dir) if cache_dir else _default_cache_dir(store, backbone, block),
        {"fingerprint": backbone.fingerprint, "block": block,
         "shape": [int(d) for d in bottom.output.shape[1:]], "dtype": "float16",
         "store": store})
    problems = _fill_cache(cache, bottom, resizer, rows, images, store, log)
    return _TrainingFeed(block, top, resizer, cache, None, problems)


# --- the activation cache ------------------------------------------------------------

def _fill_cache(cache: ActivationCache, bottom, resizer: Resizer, rows: OriginalRows, images,
                store: str, log) -> list[LeftOutFile]:
    """Cache every image of the store not cached yet; returns the files left out."""
    import tensorflow as tf

    done = cache.cached_sha()
    todo, seen = [], set(done)
    # in content-hash order, not the store's (class folders, sorted): every chunk then mixes
    # the classes, so a shuffle buffer of a few chunks yields batches of all of them
    for r in sorted(range(len(rows.sha256)), key=lambda r: rows.sha256[r]):
        sha = rows.sha256[r]
        if sha not in seen:
            seen.add(sha)
            todo.append(r)
    # files left out by an earlier run stay out, unless --images is given to try them again
    problems: list[LeftOutFile] = [] if images else list(cache.meta.get("left_out", []))
    left = {p["sha256"] for p in problems}
    todo = [r for r in todo if rows.sha256[r] not in left]
    if not todo:
        log(f"activation cache {cache.dir}: all {len(done)} images cached")
        return problems
    root = _images_root(images, store, cache)
    log(f"caching block inputs of {len(todo)} images in {cache.dir} ({len(done)} cached)")
    run = tf.function(lambda x: bottom(x, training=False), autograph=False)
    new_problems: list[LeftOutFile] = []
    images_iter = _verified_images(root, rows, todo, resizer, new_problems)
    for chunk in batched(images_iter, CHUNK_IMAGES):
        parts = [run(resizer.batch([img for _, img in b])).numpy()
                 for b in batched(chunk, 32)]
        cache.write_chunk([s for s, _ in chunk], np.concatenate(parts))
    for p in new_problems:
        log(f"  left out: {p['path']}: {p['reason']}")
    problems += new_problems
    cache.update_meta(images=str(root), left_out=problems)
    return problems


def _cache_dataset(cache: ActivationCache, label_of: dict, n_classes: int, batch_size: int,
                   shuffle: bool, flip: bool):
    """tf.data over the cache: one chunk in memory at a time plus a shuffle buffer."""
    import tensorflow as tf

    shape = tuple(cache.meta["shape"])
    n_chunks = len(cache.chunk_files())
    epoch = [0]

    def chunks():
        rng = np.random.default_rng(epoch[0])
        epoch[0] += 1
        order = rng.permutation(n_chunks) if shuffle else range(n_chunks)
        for sha, x in cache.chunks(order):
            keep = [i for i, s in enumerate(sha) if s in label_of]
            if keep:
                yield x[keep], np.array([label_of[sha[i]] for i in keep], np.int32)

    ds = tf.data.Dataset.from_generator(chunks, output_signature=(
        tf.TensorSpec((None, *shape), tf.float16), tf.TensorSpec((None,), tf.int32))).unbatch()
    if shuffle:
        ds = ds.shuffle(SHUFFLE_ROWS)

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if flip:
            x = tf.where(tf.random.uniform([]) < 0.5, tf.reverse(x, axis=[1]), x)
        return x, tf.one_hot(y, n_classes)

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)


def _pixel_dataset(root: Path, rows: OriginalRows, indices, label_of: dict, resizer: Resizer,
                   n_classes: int, batch_size: int, shuffle: bool):
    """tf.data streaming decoded images from files: memory bounded by the buffers."""
    import tensorflow as tf

    size = resizer.size

    def images():
        order = np.random.permutation(indices) if shuffle else indices
        for sha, img in _verified_images(root, rows, order, resizer):
            yield resizer.batch([img])[0], label_of[sha]

    ds = tf.data.Dataset.from_generator(images, output_signature=(
        tf.TensorSpec((size, size, 3), tf.float32), tf.TensorSpec((), tf.int32)))
    if shuffle:
        ds = ds.shuffle(256)
    def one_hot(x, y):
        return x, tf.one_hot(y, n_classes)

    return ds.map(one_hot).batch(batch_size).prefetch(2)


# --- the model -----------------------------------------------------------------------

def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _training_model(top, n_classes: int, from_pixels: bool, random_flip: bool, recipe: Recipe,
                    start: tuple[np.ndarray, np.ndarray] | None):
    """top -> a softmax layer, trainable as the recipe says.

    recipe.batchnorm "train": BatchNorm normalises with batch statistics (the ImageNet
    moving averages do not fit another domain: frozen, they cost 1.6 points at 5k
    Fashion-MNIST images). "inference": BatchNorm keeps ImageNet's statistics and
    scale, so the first updates change the features little (at 157 natural images
    training them sank hold-out accuracy from 0.96 to 0.48-0.67). start: (W, b) of
    the softmax layer, else it starts fresh.
    """
    import keras

    top.trainable = True  # Keras propagates this to every sub-layer
    for layer in _all_layers(top):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = recipe.batchnorm == "train"  # not trainable: inference mode
    inputs = keras.Input(top.input.shape[1:])
    x = inputs
    if from_pixels and random_flip:
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomRotation(0.05, fill_mode="reflect")(x)
        x = keras.layers.RandomZoom(0.1, fill_mode="reflect")(x)
    softmax = keras.layers.Dense(n_classes, activation="softmax", name="head")
    model = keras.Model(inputs, softmax(top(x)))
    if start is not None:
        softmax.set_weights(list(start))
    return model


@dataclass
class _Training:
    """What training leaves: Keras's history, the epochs planned, the settings, the start."""

    history: Any  # keras History
    epochs: int
    settings: RecipeSettings
    start: dict[str, float]  # the hold-out loss and accuracy before any update


def _train_top(feed: _TrainingFeed, rows: OriginalRows, fit_rows: np.ndarray,
               hold_rows: np.ndarray, classes: np.ndarray, seed: int, recipe: Recipe,
               epochs: int | None, learning_rate: float | None, batch_size: int,
               random_flip: bool, patience: int | None, reference: _Reference, log) -> _Training:
    """Train feed.top plus a softmax layer as the recipe says (then recalibrate BatchNorm
    if it trained); the weights left are the best on the hold-out, the start included."""
    import keras

    # before the model and the datasets exist: their initialisers and shuffle seeds are
    # drawn from the global seed when they are built, not when training starts
    keras.utils.set_random_seed(seed)
    start = reference.softmax_start(classes) if recipe.start == "head" else None
    model = _training_model(feed.top, len(classes), feed.cache is None, random_flip, recipe,
                            start)

    def make(idx: np.ndarray, shuffle: bool):
        return feed.dataset(rows, idx, classes, batch_size, random_flip, shuffle)

    per_epoch = max(1, math.ceil(len(fit_rows) / batch_size))
    settings = recipe.settings(per_epoch, epochs, learning_rate, patience)
    log(f"recipe {recipe.name}: {settings['epochs']} epochs of {per_epoch} steps at most, "
        f"patience {settings['patience']}, peak learning rate {settings['learning_rate']:g}, "
        f"BatchNorm {'trained' if recipe.batchnorm == 'train' else 'frozen (inference mode)'}, "
        f"softmax starting {'from the frozen logreg head' if start else 'fresh'}")
    history, first = _fit(model, make(fit_rows, True), make(hold_rows, False), per_epoch,
                          settings, seed, reference, len(hold_rows), log)
    if recipe.batchnorm == "train":
        _recalibrate_batchnorm(feed.top, make(fit_rows, True))
    return _Training(history, settings["epochs"], settings, first)


def _fit(model, train_ds, holdout_ds, per_epoch: int, settings: RecipeSettings, seed: int,
         reference: _Reference, n_hold: int, log):
    """AdamW, warm-up + cosine decay, label smoothing; the best epoch on the hold-out kept."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    log(f"training on {'GPU ' + gpus[0].name if gpus else 'CPU'}")
    epochs, learning_rate = settings["epochs"], settings["learning_rate"]
    steps = per_epoch * epochs
    warmup = steps // 10  # a tiny run (under 10 steps) starts at the peak: no step is wasted
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate / 10 if warmup else learning_rate, max(1, steps - warmup),
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                  keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                  metrics=["accuracy"])
    epoch_log: Any = _EpochLog(epochs, n_hold, reference.accuracy, log)
    with warnings.catch_warnings():  # a tf.data of unknown length: Keras warns every epoch
        warnings.simplefilter("ignore", UserWarning)
        first = (model.evaluate(holdout_ds, verbose=0, return_dict=True) if n_hold
                 else {"loss": math.inf, "accuracy": math.nan})
        epoch_log.line(0, None, first)
        keras.utils.set_random_seed(seed)
        history = model.fit(train_ds, validation_data=holdout_ds if n_hold else None,
                            epochs=epochs, verbose=0,
                            callbacks=[_KeepBest(first["loss"], settings["patience"]),
                                       epoch_log])
    return history, {k: round(float(v), 5) for k, v in first.items()}


class _KeepBest:
    """Keras callback: stop after `patience` epochs without a lower hold-out loss and
    leave the weights of the best epoch, epoch 0 (no update) included: a run whose
    every epoch is worse on the hold-out ends where it started."""

    def __new__(cls, start_loss: float, patience: int):
        import keras

        class KeepBest(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.best, self.wait = start_loss, 0
                self.best_weights = self.model.get_weights()

            def on_epoch_end(self, epoch, logs=None):
                loss = (logs or {}).get("val_loss")
                if loss is None:  # no hold-out: the last epoch stands
                    self.best_weights = None
                    return
                if loss < self.best:
                    self.best, self.wait = loss, 0
                    self.best_weights = self.model.get_weights()
                    return
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

            def on_train_end(self, logs=None):
                if self.best_weights is not None:
                    self.model.set_weights(self.best_weights)

        return KeepBest()


class _EpochLog:
    """Keras callback: one stderr line per epoch, the frozen head's figure beside it."""

    def __new__(cls, epochs: int, n_hold: int, frozen: float, log):
        import keras

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                self.line(epoch + 1, logs.get("loss"),
                          {"loss": logs.get("val_loss"), "accuracy": logs.get("val_accuracy")},
                          time.perf_counter() - self.started)

            def line(self, epoch, train_loss, hold, seconds=None):
                head = (f"epoch {epoch}/{epochs}: training loss {train_loss:.4f}; "
                        if epoch else f"epoch 0/{epochs} (before any update): ")
                if n_hold:
                    head += (f"hold-out ({n_hold} images) loss {hold['loss']:.4f}, accuracy "
                             f"{hold['accuracy']:.4f} (frozen head {frozen:.4f})")
                log(head + (f"  {seconds:.1f} s" if seconds is not None else ""))

        return EpochLog()


def _recalibrate_batchnorm(model, dataset, max_rows: int = RECALIBRATION_ROWS) -> None:
    """Set BatchNorm's moving statistics to exact averages over training batches.

    Training normalised with batch statistics; the moving averages (momentum 0.9) still
    remember ImageNet after the dozen steps of a small run, so inference would not see
    what training saw (at 240 images the jointly trained softmax lost 0.03-0.11).
    """
    import keras

    layers = [layer for layer in _all_layers(model)
              if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    seen = 0
    for k, (x, _) in enumerate(dataset):
        for layer in layers:
            layer.momentum = k / (k + 1)  # moving = the mean of the batches so far
        model(x, training=True)
        seen += len(x)
        if seen >= max_rows:
            break
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum


# --- recipes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How the top trains; chosen by the number of training rows (BENCHMARKS.md)."""

    name: str
    learning_rate: float  # peak of warm-up + cosine decay
    batchnorm: str  # "train": batch statistics, recalibrated after; "inference": frozen
    start: str  # "head": the softmax starts as the frozen logreg head; "fresh": random
    epochs: int  # at least
    min_steps: int  # unless epochs are given: more epochs until this many updates
    patience: int
    scale_patience: bool  # patience grows with the epochs added for min_steps

    def settings(self, steps_per_epoch: int, epochs: int | None, learning_rate: float | None,
                 patience: int | None) -> RecipeSettings:
        auto = max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))
        grown = (round(self.patience * auto / self.epochs)
                 if self.scale_patience and epochs is None else 0)
        return {"epochs": epochs or auto,
                "learning_rate": learning_rate or self.learning_rate,
                "patience": patience or max(self.patience, grown),
                "batchnorm": self.batchnorm, "start": self.start}


# issue 13's recipe, 0.9407 on Fashion-MNIST 60k: unchanged from LARGE_FROM rows on
LARGE = Recipe("large", 1e-3, "train", "fresh", epochs=3, min_steps=150, patience=2,
               scale_patience=True)
# the tutorials' recipe for few images: start at the trained head, BatchNorm frozen,
# a learning rate ten times lower, a few epochs
SMALL = Recipe("small", 1e-4, "inference", "head", epochs=5, min_steps=30, patience=2,
               scale_patience=False)
RECIPES = {"small": SMALL, "large": LARGE}
LARGE_FROM = 2000  # training rows (after the hold-out)


def choose_recipe(n_fit: int, name: str = "auto") -> Recipe:
    """SMALL below LARGE_FROM training rows, else LARGE; or the one named."""
    if name == "auto":
        return LARGE if n_fit >= LARGE_FROM else SMALL
    if name not in RECIPES:
        raise FinetuneError(f"unknown recipe {name!r}; choose auto, small or large")
    return RECIPES[name]


def _holdout(rows: OriginalRows, train_rows: np.ndarray, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Early stopping watches a hold-out of the training rows, never the validation split."""
    is_hold = validation_mask(rows.sha256[train_rows], rows.labels[train_rows],
                              HOLDOUT_FRACTION, seed + 1)
    return train_rows[~is_hold], train_rows[is_hold]


# --- outputs -------------------------------------------------------------------------

def _save_backbone(backbone: Backbone, directory: Path, kept_original: bool = False) -> Backbone:
    """Save the tuned model (temp + rename) and load it back: its fingerprint is the saved one."""
    with replacing_dir(directory) as tmp:
        Backbone(backbone.name, backbone.model, backbone.input_size, backbone.dim,
                 backbone.preprocessing, backbone.crop_fraction, backbone.weights_source).save(tmp)
        meta = json.loads((tmp / "backbone.json").read_text())
        (tmp / "backbone.json").write_text(json.dumps({**meta, "fine_tuned_from": backbone.name,
                                                       "base_fingerprint": backbone.fingerprint,
                                                       "kept_original_weights": kept_original},
                                                      indent=2))
    return load_backbone(str(directory))


def _embed_cache(cache: ActivationCache, top) -> Iterator[tuple[list, np.ndarray]]:
    import tensorflow as tf

    run = tf.function(lambda x: top(x, training=False), autograph=False)
    for sha, x in cache.chunks():
        vectors = [run(x[i:i + 128].astype(np.float32)).numpy() for i in range(0, len(x), 128)]
        yield list(sha), np.concatenate(vectors)


def _stored_embeddings(store: str, rows: OriginalRows, problems: list[LeftOutFile]):
    """The original store's vectors (view 0), one per image, in chunks: the kept weights'."""
    skipped = {p["sha256"] for p in problems}
    first = sorted({s: r for r, s in reversed(list(enumerate(rows.sha256)))
                    if s not in skipped}.values())
    with open_store(store) as s:
        view0 = np.flatnonzero(s.views == 0)
        for i in range(0, len(first), CHUNK_IMAGES):
            idx = first[i:i + CHUNK_IMAGES]
            yield list(rows.sha256[idx]), s.embeddings(view0[idx])


def _embed_images(backbone: Backbone, root: Path, rows: OriginalRows,
                  problems: list[LeftOutFile]):
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    first = list({s: r for r, s in reversed(list(enumerate(rows.sha256)))}.values())
    for batch in batched(_verified_images(root, rows, sorted(first), resizer, problems), 32):
        yield [s for s, _ in batch], backbone.embed(resizer.batch([img for _, img in batch]))


def _rebuild_store(path: Path, backbone: dict, rows: OriginalRows, embeddings, problems) -> None:
    """OUT_DIR/store.h5: the original rows (view 0) with these embeddings, made by the
    backbone this record (extract.backbone_meta) describes."""
    for stale in (path, Path(f"{path}.parts")):  # an earlier run's output, never the original
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(
            missing_ok=True)
    by_sha: dict[str, list[int]] = {}
    for r, s in enumerate(rows.sha256):
        by_sha.setdefault(s, []).append(r)
    names = lambda idx: [rows.classes[rows.labels[r]] if rows.labels[r] >= 0 else ""  # noqa
                         for r in idx]
    with open_writer(path, backbone) as writer:
        for sha, vectors in embeddings:
            idx = [r for s in sha for r in by_sha[s]]
            rep = [i for i, s in enumerate(sha) for _ in by_sha[s]]
            writer.add(vectors[rep], list(rows.paths[idx]), list(rows.sha256[idx]), names(idx))
            writer.commit()
        for f in rows.failures:
            writer.add_failure(f["path"], f["sha256"], f["reason"])
        for p in problems:
            writer.add_failure(p["path"], p["sha256"], f"left out of fine-tuning: {p['reason']}")


# --- the guard ---------------------------------------------------------------------------

@dataclass
class _Reference:
    """The frozen head as the guard sees it: HEAD_DIR's type and parameters fit on the
    stored vectors of the fit rows, right or wrong on each hold-out row."""

    head: Any
    right: np.ndarray
    store: str
    fit_X: np.ndarray
    fit_y: np.ndarray

    @classmethod
    def fit(cls, manifest: HeadManifest, store: str, rows: OriginalRows, fit_rows: np.ndarray,
            hold_rows: np.ndarray) -> _Reference:
        X, y = _embeddings_of(store, rows, fit_rows), rows.labels[fit_rows]
        head = make_head(manifest.head, **manifest.params).fit(X, y)
        right = (head.predict(_embeddings_of(store, rows, hold_rows)) == rows.labels[hold_rows]
                 if len(hold_rows) else np.zeros(0, bool))
        return cls(head, right, store, X, y)

    @property
    def accuracy(self) -> float:
        return float(self.right.mean()) if len(self.right) else math.nan

    @property
    def can_adopt(self) -> bool:
        """Could the sign test ever be significant: do enough hold-out rows stay to win?"""
        return int((~self.right).sum()) >= MIN_WINS

    def plan(self) -> GuardPlan:
        n = len(self.right)
        return {"n_holdout": n, "frozen_holdout_errors": int((~self.right).sum()),
                "min_wins_to_adopt": MIN_WINS,
                "smallest_detectable_gain": round(MIN_WINS / n, 5) if n else None,
                "can_adopt": self.can_adopt}

    def softmax_start(self, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of a softmax over `classes` equal to a logreg head on the frozen vectors:
        the reference itself when it is one, else one fit on the same rows."""
        linear = self.head if self.head.folded_linear() is not None else make_head(
            "logreg").fit(self.fit_X, self.fit_y)
        W, b = linear.folded_linear()
        cols = np.searchsorted(classes, linear.classes_)
        full_W = np.zeros((W.shape[0], len(classes)), np.float32)
        full_b = np.full(len(classes), -30.0, np.float32)  # a class the fit rows lack
        full_W[:, cols], full_b[cols] = W, b
        return full_W, full_b


def _smallest_significant_wins(alpha: float = ADOPT_P_VALUE) -> int:
    """The fewest hold-out wins (with no loss) the sign test calls significant: 5 at 0.05."""
    wins = 1
    while sign_test_p(wins, 0) >= alpha:
        wins += 1
    return wins


def _plan_message(reference: _Reference, recipe: Recipe, guard: bool) -> str:
    n, errors = len(reference.right), int((~reference.right).sum())
    said = (f"the guard will judge on {n} hold-out images (of the training split); the frozen "
            f"head, fit on the other {len(reference.fit_y)}, gets {n - errors} right "
            f"(accuracy {reference.accuracy:.3f}). Adopting tuned weights needs at least "
            f"{MIN_WINS} more right than it (none lost, p < {ADOPT_P_VALUE}), ")
    said += (f"a gain of {MIN_WINS / n:.1%} or more on the hold-out" if reference.can_adopt
             else f"but it misses only {errors}: no gain can be shown on this set")
    if not guard:
        said += "; --no-guard: the tuned weights are adopted whatever it says"
    return said + f" (recipe: {recipe.name})"


def _holdout_verdict(manifest: HeadManifest, reference: _Reference, rebuilt: Path,
                     rows: OriginalRows, fit_rows: np.ndarray, hold_rows: np.ndarray
                     ) -> HoldoutVerdict:
    """Is the head retrained on the tuned embeddings better? Judged on the hold-out only.

    The head of HEAD_DIR's type and parameters is fit on the fit rows of each store and
    scored on the hold-out rows, which neither the tuning nor either head has seen. The
    two are compared on the images where exactly one is right (a one-sided sign test):
    on a few hundred images tuning changed about 10% of the predictions either way, and
    a gain of a point or two there is noise.
    """
    head = make_head(manifest.head, **manifest.params)
    head.fit(_embeddings_of(rebuilt, rows, fit_rows), rows.labels[fit_rows])
    right = {"original": reference.right,
             "tuned": (head.predict(_embeddings_of(rebuilt, rows, hold_rows))
                       == rows.labels[hold_rows] if len(hold_rows) else np.zeros(0, bool))}
    wins = int(np.sum(right["tuned"] & ~right["original"]))
    losses = int(np.sum(right["original"] & ~right["tuned"]))
    p = sign_test_p(wins, losses)
    accuracy = {k: round(float(v.mean()), 5) if len(v) else None for k, v in right.items()}
    return {"n_holdout": int(len(hold_rows)),
            "holdout_accuracy_original": accuracy["original"],
            "holdout_accuracy_tuned": accuracy["tuned"],
            "only_tuned_right": wins, "only_original_right": losses,
            "p_value": round(p, 5), "tuned_significantly_better": p < ADOPT_P_VALUE}


def _kept_message(verdict: HoldoutVerdict) -> str:
    return (f"keeping the original weights: on the {verdict['n_holdout']} hold-out images the "
            f"retrained head was right on {verdict['only_tuned_right']} the original missed and "
            f"wrong on {verdict['only_original_right']} it got (p = {verdict['p_value']:.2f}; "
            f"adopting needs p < {ADOPT_P_VALUE}); more images help, --no-guard overrides")


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided sign test: P(at least `wins` of wins + losses fair coin flips)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


MIN_WINS = _smallest_significant_wins()


def _embeddings_of(store: str | Path, rows: OriginalRows, idx: np.ndarray) -> np.ndarray:
    """The view-0 vectors of rows idx, found by path (the rebuilt store has its own order)."""
    with open_store(store) as s:
        view0 = np.flatnonzero(s.views == 0)
        at = {p: i for i, p in zip(view0, s.paths[view0])}
        return s.embeddings([at[p] for p in rows.paths[idx]])


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _scores(head, store: str, val_rows: np.ndarray, rows: OriginalRows) -> FinetuneScores:
    """Validation accuracy and macro F1 of HEAD_DIR's head on its own validation split;
    None for a head trained with --val-fraction 0."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(val_rows) == 0:
        return {"val_accuracy": None, "val_macro_f1": None}

    with open_store(store) as s:
        view0 = np.flatnonzero(s.views == 0)
        X = s.embeddings(view0[val_rows])
    y = rows.labels[val_rows]
    pred = head.predict(X)
    return {"val_accuracy": float(accuracy_score(y, pred)),
            "val_macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
