"""Controlled fine-tuning experiments on in-memory block inputs (how the defaults were chosen).

    python -m bench.finetune_lab cache WORK [--train 10000] [--test 2000]
    python -m bench.finetune_lab run WORK --n 5000 [--offset 0] [--head fresh|folded|rawlr]
        [--bn train|frozen|affine] [--lr 1e-3] [--epochs 3] [--wd 1e-4] [--recal ROWS]
        [--chunked] [--seed 0] [--ntest 2000]
    python -m bench.finetune_lab table WORK   (WORK/results.jsonl as a markdown table)

`cache` runs the frozen bottom (blocks 0-13) once over random Fashion-MNIST
train/test subsets (seed 0) and keeps block-14 inputs (float16) and frozen
embeddings as .npy. `run` trains the top (blocks 14-18) plus a softmax layer
on rows [offset, offset+n) exactly as a variant says, 10% of them held out,
and appends one JSON line to WORK/results.jsonl: frozen logreg (C=0.1) test
accuracy, the tuned result (logreg retrained on the tuned embeddings, as
`finetune` delivers it), the jointly trained softmax, hold-out accuracy from
epoch 0 (before any update; frozen_hold: a logreg fit on the other rows), and
the per-image correctness in WORK/runs/ID.npz. No early stopping, no guard.

Variants: head "folded" = logreg with its scaler folded in (the old init),
"rawlr" = logreg on unscaled embeddings, "fresh" = random; bn "frozen" =
inference mode and not trained (the old recipe), "train" = batch statistics,
"affine" = ImageNet statistics but gamma/beta trained; --recal N recomputes
BatchNorm's moving statistics over N training rows after training;
--chunked feeds rows the way the old cache did (class-sorted 256-row chunks
in random order through a 2048-row shuffle buffer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from bench.fashion_mnist import load

BLOCK = 14


def cache(work: Path, n_train: int, n_test: int) -> None:
    import tensorflow as tf

    from embedstore.backbones import load_backbone
    from embedstore.backbones.split import split_at
    from embedstore.pipeline import Resizer

    backbone = load_backbone()
    bottom, top = split_at(backbone.model, BLOCK)
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    run_bottom = tf.function(lambda x: bottom(x, training=False), autograph=False)
    run_top = tf.function(lambda x: top(x, training=False), autograph=False)
    work.mkdir(parents=True, exist_ok=True)
    for split, n in (("test", n_test), ("train", n_train)):
        images, labels = load(split)
        idx = np.random.default_rng(0).permutation(len(labels))[:n]
        acts = np.lib.format.open_memmap(work / f"{split}_x.npy", "w+", np.float16,
                                         (n, *bottom.output.shape[1:]))
        emb = np.zeros((n, backbone.dim), np.float32)
        for i in range(0, n, 64):
            gray = images[idx[i:i + 64]]
            pixels = resizer.batch([np.repeat(im[:, :, None], 3, 2) for im in gray])
            a = run_bottom(pixels).numpy()
            acts[i:i + len(a)], emb[i:i + len(a)] = a, run_top(a).numpy()
        acts.flush()
        np.save(work / f"{split}_y.npy", labels[idx].astype(np.int32))
        np.save(work / f"{split}_emb.npy", emb)


def _top(variant: str):
    """Blocks 14-18 of the default backbone with BatchNorm set up as the variant says."""
    import keras

    from embedstore.backbones import load_backbone
    from embedstore.backbones.split import split_at
    from embedstore.finetuning import _all_layers

    _, top = split_at(load_backbone().model, BLOCK)
    top.trainable = True
    for layer in _all_layers(top):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = variant != "frozen"
            if variant == "affine":  # trainable gamma/beta, but always the moving statistics
                call = layer.call
                layer.call = lambda inputs, training=None, mask=None, call=call: call(
                    inputs, training=False, mask=mask)
    return top


def _head(kind: str, embedding, X, y, C: float):
    """The softmax layer on top of the embedding, initialised as `kind` says."""
    import keras
    from sklearn.linear_model import LogisticRegression

    from embedstore import LogRegHead

    layer = keras.layers.Dense(10, activation="softmax", name="head")
    out = layer(embedding)
    if kind == "folded":
        layer.set_weights(list(LogRegHead(C=C).fit(X, y).folded_linear()))
    elif kind == "rawlr":
        lr = LogisticRegression(C=C, max_iter=300).fit(X, y)
        layer.set_weights([lr.coef_.T.astype("float32"), lr.intercept_.astype("float32")])
    return out


def _dataset(X, y, idx, shuffle: bool, a):
    import keras
    import tensorflow as tf

    Y = keras.utils.to_categorical(y, 10)
    if shuffle and a.chunked:
        idx = idx[np.argsort(y[idx], kind="stable")]
        chunks = [idx[i:i + 256] for i in range(0, len(idx), 256)]

        def gen():
            for c in np.random.default_rng().permutation(len(chunks)):
                yield X[chunks[c]], Y[chunks[c]]

        ds = tf.data.Dataset.from_generator(gen, output_signature=(
            tf.TensorSpec((None, *X.shape[1:]), tf.float16),
            tf.TensorSpec((None, 10), tf.float32))).unbatch().shuffle(2048)
    else:
        ds = tf.data.Dataset.from_tensor_slices((X[idx], Y[idx]))
        ds = ds.shuffle(len(idx), seed=a.seed) if shuffle else ds

    def prepare(x, t):
        x = tf.cast(x, tf.float32)
        if shuffle:
            x = tf.where(tf.random.uniform([]) < 0.5, tf.reverse(x, axis=[1]), x)
        return x, t

    return ds.map(prepare).batch(a.batch)


def run(a) -> None:
    import keras
    import tensorflow as tf

    from embedstore import LogRegHead
    from embedstore.finetuning import _recalibrate_batchnorm

    w, rows = a.work, slice(a.offset, a.offset + a.n)
    X, y, E = (np.asarray(np.load(w / f"train_{k}.npy", mmap_mode="r")[rows])
               for k in ("x", "y", "emb"))
    Xt, yt, Et = (np.load(w / f"test_{k}.npy", mmap_mode="r")[:a.ntest] for k in ("x", "y", "emb"))
    frozen = LogRegHead(C=a.C).fit(E, y)
    hold = np.random.default_rng(a.seed + 1).random(a.n) < 0.1
    fit_idx, hold_idx = np.flatnonzero(~hold), np.flatnonzero(hold)
    frozen_fit = LogRegHead(C=a.C).fit(E[fit_idx], y[fit_idx])  # the guard's reference
    keras.utils.set_random_seed(a.seed)
    top = _top(a.bn)
    inputs = keras.Input(top.input.shape[1:])
    model = keras.Model(inputs, _head(a.head, top(inputs), E[fit_idx], y[fit_idx], a.C))
    steps = math.ceil(len(fit_idx) / a.batch) * a.epochs
    warm = steps // 10
    model.compile(keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(
        a.lr / 10, steps - warm, warmup_target=a.lr, warmup_steps=warm), weight_decay=a.wd),
        keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    hold0 = model.evaluate(_dataset(X, y, hold_idx, False, a), verbose=0, return_dict=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    hist = model.fit(_dataset(X, y, fit_idx, True, a), epochs=a.epochs, verbose=0,
                     validation_data=_dataset(X, y, hold_idx, False, a))
    if a.recal:
        _recalibrate_batchnorm(top, _dataset(X, y, fit_idx, True, a), a.recal)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    def apply(m, A):
        run_m = tf.function(lambda x: m(x, training=False), autograph=False)
        return np.concatenate([run_m(A[i:i + 256].astype(np.float32)).numpy()
                               for i in range(0, len(A), 256)])

    tuned = LogRegHead(C=a.C).fit(apply(top, X), y)
    right = {"frozen": frozen.predict(Et) == yt, "tuned": tuned.predict(apply(top, Xt)) == yt}
    run_id = hashlib.sha1(" ".join(sys.argv[2:]).encode()).hexdigest()[:10]
    (w / "runs").mkdir(exist_ok=True)
    np.savez(w / "runs" / f"{run_id}.npz", **right)
    result = {**{k: v for k, v in vars(a).items() if k not in ("work", "cmd")}, "run_id": run_id,
              "frozen": round(float(right["frozen"].mean()), 4),
              "tuned_logreg": round(float(right["tuned"].mean()), 4),
              "tuned_softmax": round(float((apply(model, Xt).argmax(1) == yt).mean()), 4),
              "frozen_hold": round(float(
                  (frozen_fit.predict(E[hold_idx]) == y[hold_idx]).mean()), 4),
              "hold_acc": [round(float(hold0["accuracy"]), 4)]
              + [round(v, 4) for v in hist.history["val_accuracy"]],
              "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1)}
    print(json.dumps(result))
    with open(w / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


BATCHNORM = {"frozen": "frozen (inference mode)", "train": "trained"}


def table(work: Path) -> None:
    """Print every run of WORK/results.jsonl as one markdown row."""
    print("| train images (offset) | softmax starts | BatchNorm | peak lr | epochs | frozen test "
          "acc | tuned test acc | gain | hold-out acc by epoch (0 = before any update; frozen "
          "head on the hold-out) | train s wall / CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in (work / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        start = {"folded": "frozen logreg head", "fresh": "fresh", "rawlr": "raw logreg"}
        hold = [f"{h:.2f}" for h in r.get("hold_acc", [])]
        shown = ", ".join(hold if len(hold) <= 11 else hold[:6] + ["..."] + hold[-3:])
        cpu = r.get("train_cpu_s")
        print(f"| {r['n']} (#{r['offset']}) | {start.get(r['head'], r['head'])} | "
              f"{BATCHNORM.get(r['bn'], r['bn'])}{', recalibrated' if r.get('recal') else ''} | "
              f"{r['lr']:g} | {r['epochs']} | {r['frozen']:.4f} | {r['tuned_logreg']:.4f} | "
              f"{r['tuned_logreg'] - r['frozen']:+.4f} | {shown} ({r.get('frozen_hold', '')}) | "
              f"{r['train_s']:.0f} / {'-' if cpu is None else f'{cpu:.0f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("work", type=Path)
    c.add_argument("--train", type=int, default=10000)
    c.add_argument("--test", type=int, default=2000)
    r = sub.add_parser("run")
    r.add_argument("work", type=Path)
    for name, kind, default in (("--n", int, 2000), ("--offset", int, 0), ("--ntest", int, 2000),
                                ("--head", str, "fresh"), ("--bn", str, "train"),
                                ("--lr", float, 1e-3), ("--epochs", int, 3),
                                ("--batch", int, 64), ("--wd", float, 1e-4),
                                ("--recal", int, 0), ("--seed", int, 0), ("--C", float, 0.1)):
        r.add_argument(name, type=kind, default=default)
    r.add_argument("--chunked", action="store_true")
    sub.add_parser("table").add_argument("work", type=Path)
    a = ap.parse_args()
    if a.cmd == "table":
        table(a.work)
    else:
        cache(a.work, a.train, a.test) if a.cmd == "cache" else run(a)


if __name__ == "__main__":
    main()
