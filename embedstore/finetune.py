"""Fine-tuning that rebuilds the cache: tune the top of the backbone, re-embed.

head directory -> (frozen bottom over the images, once, into an activation
cache) -> top blocks + softmax head trained on the cache -> tuned backbone
saved -> store rebuilt from the same cache through the tuned top -> the same
head type retrained on the rebuilt store. The original store and head are
only read. With block 0 the whole network trains from pixels instead
(streamed, augmented), and the rebuild re-reads the images.

Choices: every BatchNormalization layer stays frozen in inference mode, in
the top too (its statistics came from ImageNet-sized batches; a few hundred
images would only make them noisy). AdamW with warm-up and cosine decay,
label smoothing 0.1, horizontal flips of the cached maps: the recipe that
reached 0.941 on Fashion-MNIST from block 14 (issue 13).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from embedstore.activations import ActivationCache
from embedstore.backbones import Backbone, load_backbone
from embedstore.backbones.reference import BackboneRef, check_same_backbone, load_referenced
from embedstore.backbones.split import entry_layer_name, split_at
from embedstore.extract import backbone_meta
from embedstore.headdir import MANIFEST, HeadManifest, load_head, read_manifest
from embedstore.heads import KNNHead, LogRegHead
from embedstore.pipeline import Resizer, batched, stream
from embedstore.splits import validation_mask
from embedstore.store import StoreWriter, open_store
from embedstore.train import train

DEFAULT_BLOCK = 14
CHUNK_IMAGES = 256
SHUFFLE_ROWS = 2048  # rows in the shuffle buffer: bounds training memory
HOLDOUT_FRACTION = 0.1


class FinetuneError(ValueError):
    """Fine-tuning cannot run as asked, with what to do about it."""


@dataclass
class Rows:
    """The original images of a store (view 0), as the rebuild must reproduce them."""

    paths: np.ndarray
    sha256: np.ndarray
    labels: np.ndarray  # indices into classes, -1 unlabelled
    classes: list[str]
    failures: list[dict]
    dropped_views: int


def _read_rows(store: str) -> tuple[Rows, dict]:
    with open_store(store) as s:
        views = s.views
        keep = views == 0
        rows = Rows(s.paths[keep], s.sha256[keep], s.labels[keep], s.classes, s.failures(),
                    int((~keep).sum()))
        return rows, s.backbone


def _split(rows: Rows, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val), the head's split (train.load_split's rule on view 0)."""
    labelled = np.flatnonzero(rows.labels >= 0)
    is_val = validation_mask(rows.sha256[labelled], rows.labels[labelled], val_fraction, seed)
    return labelled[~is_val], labelled[is_val]


def _log_default(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def finetune(head_dir: str | Path, out_dir: str | Path, images: str | Path | None = None,
             unfreeze_from: int | str = DEFAULT_BLOCK, epochs: int = 3,
             learning_rate: float = 1e-4, batch_size: int = 64, augment: str = "flip",
             patience: int = 2, cache_dir: str | Path | None = None,
             log: Callable[[str], None] = _log_default,
             backbone_name: str | None = None) -> dict:
    """Fine-tune the backbone of the head in HEAD_DIR; write OUT_DIR; return the report.

    backbone_name: the head's backbone as the user names it (required for a
    hub: SavedModel, see backbones.reference).
    """
    timings: dict[str, float] = {}
    manifest = read_manifest(head_dir)
    store = manifest.store
    out = Path(out_dir)
    _check_out_dir(out, head_dir, store)
    if manifest.backbone.name.startswith("hub:"):
        raise FinetuneError(f"the head in {head_dir} uses {manifest.backbone.name}: a "
                            "TF-Hub model cannot be split into blocks; extract with "
                            "mobilenet_v2 or a keras: backbone to fine-tune")
    rows, store_backbone = _read_rows(store)
    check_same_backbone(manifest.backbone, BackboneRef.from_dict(store_backbone, store),
                        str(Path(head_dir) / MANIFEST), store,
                        advice="retrain the head on this store first")
    backbone = _load_head_backbone(manifest, head_dir, backbone_name)
    train_rows, val_rows = _split(rows, manifest.val_fraction, manifest.seed)
    head = load_head(head_dir)
    before = _scores(head, store, val_rows, rows)
    from_pixels = str(unfreeze_from) == "0"

    start = time.perf_counter()
    if from_pixels:
        log("fine-tuning the whole network from pixels: on a CPU this is slow "
            "(every epoch runs the full backbone forward and backward)")
        root = _images_root(images, store, None)
        top, bottom, cache, problems = backbone.model, None, None, []
        block_name = "0"
    else:
        block_name = entry_layer_name(backbone.model, unfreeze_from)
        bottom, top = split_at(backbone.model, unfreeze_from)
        cache = ActivationCache(
            Path(cache_dir) if cache_dir else _default_cache_dir(store, backbone, block_name),
            {"fingerprint": backbone.fingerprint, "block": block_name,
             "shape": [int(d) for d in bottom.output.shape[1:]], "dtype": "float16",
             "store": store})
        problems = _fill_cache(cache, bottom, backbone, rows, images, store, log)
    timings["cache_seconds"] = round(time.perf_counter() - start, 2)
    skipped = {p["sha256"] for p in problems}
    train_rows = np.array([r for r in train_rows if rows.sha256[r] not in skipped], np.int64)

    start = time.perf_counter()
    if isinstance(head, KNNHead):
        log("the knn head has no weights to start from: training a fresh softmax layer")
    classes = np.asarray(head.classes_)
    import keras

    # before the model and the datasets exist: their initialisers and shuffle seeds are
    # drawn from the global seed when they are built, not when training starts
    keras.utils.set_random_seed(manifest.seed)
    model = _training_model(top, head, len(classes), from_pixels, augment)
    fit_rows, hold_rows = _holdout(rows, train_rows, manifest.seed)
    label_of = lambda idx: {rows.sha256[r]: int(np.searchsorted(classes, rows.labels[r]))  # noqa
                            for r in idx}
    if from_pixels:
        resizer = Resizer(backbone.input_size, backbone.crop_fraction)
        make = lambda idx, shuffle: _pixel_dataset(root, rows, idx, label_of(idx), resizer,  # noqa
                                                    len(classes), batch_size, shuffle)
    else:
        make = lambda idx, shuffle: _cache_dataset(cache, label_of(idx), len(classes),  # noqa
                                                   batch_size, shuffle,
                                                   augment == "flip" and shuffle)
    steps = max(1, math.ceil(len(fit_rows) / batch_size)) * epochs
    history = _fit(model, make(fit_rows, True), make(hold_rows, False), steps, learning_rate,
                   epochs, patience, manifest.seed, log)
    _freeze_batchnorm(top, frozen=False)  # saved as it was loaded
    timings["train_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    tuned = _save_backbone(backbone, out / "backbone")
    timings["save_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    if from_pixels:
        embeddings = _embed_images(tuned, root, rows, problems)
    else:
        tuned_top = split_at(tuned.model, unfreeze_from)[1]
        embeddings = _embed_cache(cache, tuned_top)
    new_store = out / "store.h5"
    _rebuild_store(new_store, tuned, rows, embeddings, problems)
    timings["rebuild_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    # write_head_dir builds it beside and renames it in: a re-run replaces it atomically
    after = train(new_store, out / "head", head=manifest.head, val_fraction=manifest.val_fraction,
                  seed=manifest.seed, overwrite=True, **manifest.params)
    timings["head_seconds"] = round(time.perf_counter() - start, 2)

    report = {
        "head_dir": str(Path(head_dir).resolve()), "store": store, "out_dir": str(out.resolve()),
        "block": block_name, "epochs_run": len(history.epoch),
        "kept_original_weights": getattr(history, "kept_original_weights", False),
        "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()},
        "head": manifest.head,
        "head_init": "fresh softmax layer (a knn head has no weights to start from)"
        if isinstance(head, KNNHead) else f"from the {manifest.head} head",
        "n_fit": len(fit_rows), "n_holdout": len(hold_rows), "n_val": int(len(val_rows)),
        "before": before,
        "after": {"val_accuracy": after.get("val_accuracy"),
                  "val_macro_f1": after.get("val_macro_f1")},
        "backbone": {"before": backbone.fingerprint, "after": tuned.fingerprint,
                     "path": str((out / "backbone").resolve())},
        "left_out": problems, "dropped_augmented_views": rows.dropped_views,
        "cache": None if cache is None else {"dir": str(cache.dir), "bytes": cache.nbytes()},
        "timings": timings,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# --- inputs --------------------------------------------------------------------------

def _check_out_dir(out: Path, head_dir, store: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mine = {(out / "store.h5").resolve(), (out / "head").resolve(), out.resolve()}
    if Path(store).resolve() in mine or Path(head_dir).resolve() in mine:
        raise FinetuneError(f"{out} would overwrite the original store or head; "
                            "give a new OUT_DIR")


def _load_head_backbone(manifest: HeadManifest, head_dir, named_by_user: str | None) -> Backbone:
    """The head's backbone as a Keras model (the trust rule and fingerprint checked)."""
    import keras

    backbone = load_referenced(manifest.backbone, named_by_user, Path(head_dir) / MANIFEST)
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


def _verified_images(root: Path, rows: Rows, indices, resizer: Resizer,
                     problems: list | None = None) -> Iterator[tuple[str, np.ndarray]]:
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
        yield expected, item.image


# --- the activation cache ------------------------------------------------------------

def _fill_cache(cache: ActivationCache, bottom, backbone: Backbone, rows: Rows, images,
                store: str, log) -> list[dict]:
    """Cache every image of the store not cached yet; returns the files left out."""
    import tensorflow as tf

    done = cache.cached_sha()
    todo, seen = [], set(done)
    for r, sha in enumerate(rows.sha256):
        if sha not in seen:
            seen.add(sha)
            todo.append(r)
    # files left out by an earlier run stay out, unless --images is given to try them again
    problems: list[dict] = [] if images else list(cache.meta.get("left_out", []))
    left = {p["sha256"] for p in problems}
    todo = [r for r in todo if rows.sha256[r] not in left]
    if not todo:
        log(f"activation cache {cache.dir}: all {len(done)} images cached")
        return problems
    root = _images_root(images, store, cache)
    log(f"caching block inputs of {len(todo)} images in {cache.dir} ({len(done)} cached)")
    run = tf.function(lambda x: bottom(x, training=False), autograph=False)
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    new_problems: list[dict] = []
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


def _pixel_dataset(root: Path, rows: Rows, indices, label_of: dict, resizer: Resizer,
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

def _freeze_batchnorm(model, frozen: bool = True) -> None:
    """Train every layer but BatchNorm (frozen: inference mode); frozen=False undoes it."""
    import keras

    model.trainable = True  # Keras propagates this to every sub-layer
    if frozen:
        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _training_model(top, head, n_classes: int, from_pixels: bool, augment: str):
    """top (BatchNorm frozen) -> softmax head initialised from HEAD_DIR's head."""
    import keras

    _freeze_batchnorm(top)
    inputs = keras.Input(top.input.shape[1:])
    x = inputs
    if from_pixels and augment != "none":
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomRotation(0.05, fill_mode="reflect")(x)
        x = keras.layers.RandomZoom(0.1, fill_mode="reflect")(x)
    embedding = top(x)
    if isinstance(head, LogRegHead):
        W, b = head.folded_linear()
        layer = keras.layers.Dense(n_classes, activation="softmax", name="head")
        probs = layer(embedding)
        layer.set_weights([W, b])
    elif hasattr(head, "model_"):  # a dense head: its own Keras model, as is
        probs = head.model_(embedding)
    else:  # knn has no weights: a fresh softmax layer
        probs = keras.layers.Dense(n_classes, activation="softmax", name="head")(embedding)
    return keras.Model(inputs, probs)


def _fit(model, train_ds, holdout_ds, steps: int, learning_rate: float, epochs: int,
         patience: int, seed: int, log):
    """AdamW, warm-up + cosine decay, label smoothing; early stopping on the hold-out."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    log(f"training on {'GPU ' + gpus[0].name if gpus else 'CPU'}")
    warmup = steps // 10  # a tiny run (under 10 steps) starts at the peak: no step is wasted
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate / 10 if warmup else learning_rate, max(1, steps - warmup),
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                  keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                  metrics=["accuracy"])
    keras.utils.set_random_seed(seed)
    initial = model.get_weights()
    start_loss = model.evaluate(holdout_ds, verbose=0, return_dict=True)["loss"]
    log(f"start: hold-out loss {start_loss:.4f}")
    with warnings.catch_warnings():  # a tf.data of unknown length: Keras warns every epoch
        warnings.simplefilter("ignore", UserWarning)
        history = model.fit(train_ds, validation_data=holdout_ds, epochs=epochs, verbose=0,
                            callbacks=[keras.callbacks.EarlyStopping(
                                "val_loss", patience=patience, restore_best_weights=True),
                                _EpochLog(epochs, log)])
    if min(history.history["val_loss"]) > start_loss:  # never hand back a worse backbone
        model.set_weights(initial)
        history.kept_original_weights = True
        log("no epoch beat the starting hold-out loss: keeping the original weights "
            "(try a lower --learning-rate or more images)")
    return history


def _holdout(rows: Rows, train_rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Early stopping watches a hold-out of the training rows, never the validation split."""
    is_hold = validation_mask(rows.sha256[train_rows], rows.labels[train_rows],
                              HOLDOUT_FRACTION, seed + 1)
    return train_rows[~is_hold], train_rows[is_hold]


class _EpochLog:
    """Keras callback: one stderr line per epoch (loss, hold-out accuracy, time)."""

    def __new__(cls, epochs: int, log):
        import keras

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                log(f"epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.4f}  "
                    f"hold-out loss {logs.get('val_loss', float('nan')):.4f}  hold-out accuracy "
                    f"{logs.get('val_accuracy', float('nan')):.4f}  "
                    f"{time.perf_counter() - self.started:.1f} s")

        return EpochLog()


# --- outputs -------------------------------------------------------------------------

def _save_backbone(backbone: Backbone, directory: Path) -> Backbone:
    """Save the tuned model (temp + rename) and load it back: its fingerprint is the saved one."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Backbone(backbone.name, backbone.model, backbone.input_size, backbone.dim,
             backbone.preprocessing, backbone.crop_fraction, backbone.weights_source).save(tmp)
    meta = json.loads((tmp / "backbone.json").read_text())
    (tmp / "backbone.json").write_text(json.dumps({**meta, "fine_tuned_from": backbone.name,
                                                   "base_fingerprint": backbone.fingerprint},
                                                  indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return load_backbone(str(directory))


def _embed_cache(cache: ActivationCache, top) -> Iterator[tuple[list, np.ndarray]]:
    import tensorflow as tf

    run = tf.function(lambda x: top(x, training=False), autograph=False)
    for sha, x in cache.chunks():
        vectors = [run(x[i:i + 128].astype(np.float32)).numpy() for i in range(0, len(x), 128)]
        yield list(sha), np.concatenate(vectors)


def _embed_images(backbone: Backbone, root: Path, rows: Rows, problems: list):
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    first = list({s: r for r, s in reversed(list(enumerate(rows.sha256)))}.values())
    for batch in batched(_verified_images(root, rows, sorted(first), resizer, problems), 32):
        yield [s for s, _ in batch], backbone.embed(resizer.batch([img for _, img in batch]))


def _rebuild_store(path: Path, backbone: Backbone, rows: Rows, embeddings, problems) -> None:
    """OUT_DIR/store.h5: the original rows (view 0) with the tuned embeddings."""
    for stale in (path, Path(f"{path}.parts")):  # an earlier run's output, never the original
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(
            missing_ok=True)
    by_sha: dict[str, list[int]] = {}
    for r, s in enumerate(rows.sha256):
        by_sha.setdefault(s, []).append(r)
    names = lambda idx: [rows.classes[rows.labels[r]] if rows.labels[r] >= 0 else ""  # noqa
                         for r in idx]
    with StoreWriter(path, backbone_meta(backbone)) as writer:
        for sha, vectors in embeddings:
            idx = [r for s in sha for r in by_sha[s]]
            rep = [i for i, s in enumerate(sha) for _ in by_sha[s]]
            writer.add(vectors[rep], list(rows.paths[idx]), list(rows.sha256[idx]), names(idx))
            writer.commit()
        for f in rows.failures:
            writer.add_failure(f["path"], f["sha256"], f["reason"])
        for p in problems:
            writer.add_failure(p["path"], p["sha256"], f"left out of fine-tuning: {p['reason']}")


def _scores(head, store: str, val_rows: np.ndarray, rows: Rows) -> dict:
    """Validation accuracy and macro F1 of HEAD_DIR's head on its own validation split."""
    from sklearn.metrics import accuracy_score, f1_score

    with open_store(store) as s:
        view0 = np.flatnonzero(s.views == 0)
        X = s.embeddings(view0[val_rows])
    y = rows.labels[val_rows]
    pred = head.predict(X)
    return {"val_accuracy": float(accuracy_score(y, pred)),
            "val_macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
