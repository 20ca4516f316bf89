"""Know your data, measured: near-duplicate thresholds, audit at 70k, label errors,
calibration and open-set rejection.

    python -m bench.bench_audit duplicates            # thresholds: re-encoded / resized copies
    python -m bench.bench_audit audit STORE           # time and peak RSS of one audit
    python -m bench.bench_audit labels STORE --flip 0.01 [--draws 1]
    python -m bench.bench_audit calibration STORE [--per-class 1000]

duplicates: the bundled sample's 300 images and 19 scikit-image photos,
embedded with the default backbone, against copies of each (JPEG q50 and
q90, resized 0.5x and 2x): how often the copy's nearest neighbour is its
original, how many copies the default rule (audit.THRESHOLD,
MUTUAL_THRESHOLD, GAP) pairs with their original, and how many pairs of
distinct originals it pairs.

labels: flips the given share of labelled rows to another class at random,
ranks every row by the out-of-fold probability of its given label (the
audit's ranking, groups of identical files kept in one fold), and reports
the share of flipped rows among the top-ranked rows as many as were flipped
(precision) and the share of flipped rows found there (recall); averaged
over --draws.

calibration: trains the default logreg head (`embedstore.training.train`) and
reports metrics.json's ECE before/after; then leave-one-class-out: for each
class, a logreg on up to --per-class training images of each other class,
calibrated on their validation images, scores the validation images of all
classes by top probability; the AUROC of known vs unseen class and the share
of unseen-class images flagged when the threshold keeps 95% of known ones.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, report, run_child, table

SKIMAGE = ["astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
           "immunohistochemistry", "page", "text", "retina", "moon", "horse", "coins", "clock",
           "brick", "grass", "gravel", "colorwheel"]


# --- duplicates -------------------------------------------------------------------------

def _originals():
    import skimage.data
    from PIL import Image

    images = [Image.open(p).convert("RGB")
              for p in sorted((REPO / "data" / "fashion-mnist-sample").rglob("*.png"))]
    n_sample = len(images)
    for name in SKIMAGE:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype != np.uint8:
            a = (a * 255 if a.max() <= 1 else a).astype(np.uint8)
        images.append(Image.fromarray(a).convert("RGB"))
    return images, n_sample


def _copies():
    from PIL import Image

    def jpeg(im, q):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def resize(im, f):
        return im.resize((max(8, int(im.width * f)), max(8, int(im.height * f))),
                         Image.BILINEAR)

    return {"JPEG q90": lambda im: jpeg(im, 90), "JPEG q50": lambda im: jpeg(im, 50),
            "resized 2x": lambda im: resize(im, 2), "resized 0.5x": lambda im: resize(im, 0.5)}


def bench_duplicates() -> None:
    from embedstore.auditing import near_duplicate_pairs, neighbours
    from embedstore.backbones.runtimes import load_for_inference
    from embedstore.pipeline import Resizer, decode_image
    from embedstore.similarity import normalise

    backbone = load_for_inference("mobilenet_v2", "tflite")
    resizer = Resizer(backbone.input_size, backbone.config()["crop_fraction"])

    def embed(images):
        pixels = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, "PNG")
            pixels.append(resizer.early(decode_image(buf.getvalue(), min_side=resizer.min_side)))
        return normalise(backbone.embed(pixels))

    originals, n_sample = _originals()
    n = len(originals)
    X = embed(originals)
    sims, rows = neighbours(X, np.arange(n), 3)
    distinct = near_duplicate_pairs(sims, rows)
    out = [["distinct images only", "-", "-", "-",
            f"{len(distinct)} pairs (nearest-neighbour cosine median "
            f"{np.median(sims[:, 0]):.3f}, max {sims[:, 0].max():.3f})"]]
    for kind, make in _copies().items():
        Y = embed([make(im) for im in originals])
        Z = np.vstack([X, Y])
        s, r = neighbours(Z, np.arange(2 * n), 3)
        pairs = {(i, j) for i, j, _ in near_duplicate_pairs(s, r)}
        found = np.array([(i, i + n) in pairs for i in range(n)])
        own = np.einsum("ij,ij->i", X, Y)
        nearest = r[n:, 0] == np.arange(n)
        false = sum(1 for i, j in pairs if j - i != n)
        out.append([kind,
                    f"{np.median(own[:n_sample]):.3f} / {np.median(own[n_sample:]):.3f}",
                    f"{nearest[:n_sample].mean():.3f} / {nearest[n_sample:].mean():.3f}",
                    f"{found[:n_sample].mean():.3f} / {found[n_sample:].mean():.3f}",
                    f"{false} pairs"])
    from embedstore.auditing import GAP, MUTUAL_THRESHOLD, THRESHOLD

    report("audit: near-duplicate rule on re-encoded and resized copies", table(
        ["copies of every image", "median cosine to original (sample / photos)",
         "original is nearest (sample / photos)",
         "paired by the default rule (sample / photos)", "other pairs (false)"], out)
        + f"\n\n{n_sample} Fashion-MNIST sample images (28 px) and {n - n_sample} "
          f"scikit-image photos; default rule: cosine >= {THRESHOLD}, or mutual nearest "
          f"neighbours at cosine >= {MUTUAL_THRESHOLD} with a lead >= {GAP} over both "
          "one's next neighbours.")


# --- audit at scale ---------------------------------------------------------------------

AUDIT_CHILD = r"""
import json, sys, time
from embedstore.auditing import audit
t = time.perf_counter()
r = audit(sys.argv[1], top=10)
r["summary"]["seconds"] = time.perf_counter() - t
print(json.dumps(r["summary"]))
"""


def bench_audit(store: str) -> None:
    r = run_child(AUDIT_CHILD, store)
    print(json.dumps(r))
    report(f"audit of {Path(store).name}", table(
        ["rows", "seconds", "peak RSS (MB)", "duplicate groups", "of identical files",
         "across split", "across classes", "likely label errors", "out-of-fold accuracy",
         "outliers"],
        [[_rows(store), f"{r['seconds']:.0f}", r["peak_rss_mb"], r["duplicate_groups"],
          r["exact_duplicate_groups"], r["groups_across_split"], r["groups_across_classes"],
          r["likely_label_errors"], r["oof_accuracy"], r["outliers"]]]))


def _rows(store: str) -> int:
    from embedstore.store import open_store

    with open_store(store) as s:
        return s.n_rows


# --- label errors -----------------------------------------------------------------------

def _labelled(store: str):
    from embedstore.similarity import normalise
    from embedstore.store import open_store

    with open_store(store) as s:
        rows = np.flatnonzero((s.views == 0) & (s.labels >= 0))
        return normalise(s.embeddings(rows)), s.labels[rows], s.classes, s.sha256[rows]


def bench_labels(store: str, flip: float, draws: int) -> None:
    from embedstore.auditing import out_of_fold_proba

    X, y, classes, sha = _labelled(store)
    groups = np.unique(sha, return_inverse=True)[1]
    results = []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        flipped = rng.choice(len(y), max(1, round(flip * len(y))), replace=False)
        noisy = y.copy()
        noisy[flipped] = (y[flipped] + rng.integers(1, len(classes), len(flipped))) % len(classes)
        t = time.perf_counter()
        rows, proba = out_of_fold_proba(X, noisy, len(classes), groups)
        seconds = time.perf_counter() - t
        ranked = rows[np.argsort(proba[np.arange(len(rows)), noisy[rows]], kind="stable")]
        top = set(ranked[:len(flipped)].tolist())
        hits = len(top & set(flipped.tolist()))
        results.append((hits / len(flipped), hits / len(flipped), seconds, len(flipped)))
        print(draw, results[-1], flush=True)
    p = np.mean([r[0] for r in results])
    report(f"audit: planted label errors in {Path(store).name}", table(
        ["rows", "flipped", "draws", "precision in the top ranked", "recall there",
         "seconds per draw (5-fold logreg)"],
        [[len(y), f"{flip:.0%} ({results[0][3]})", draws, f"{p:.3f}", f"{p:.3f}",
          f"{np.mean([r[2] for r in results]):.0f}"]])
        + "\n\nTop ranked = as many rows as were flipped, so precision equals recall.")


# --- calibration and open-set -----------------------------------------------------------

def bench_calibration(store: str, per_class: int) -> None:
    from sklearn.metrics import roc_auc_score

    from embedstore import LogRegHead
    from embedstore.calibration import apply_temperature, calibrate
    from embedstore.splits import load_split
    from embedstore.training import train

    with tempfile.TemporaryDirectory() as tmp:
        cal = train(store, Path(tmp) / "head", overwrite=True)["calibration"]
    split = load_split(store)
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(split.classes):
        known = np.flatnonzero(split.y_train != c)
        keep = np.concatenate([rng.permutation(known[split.y_train[known] == k])[:per_class]
                               for k in np.unique(split.y_train[known])])
        head = LogRegHead().fit(split.X_train[keep], split.y_train[keep])
        val_known = split.y_val != c
        y_known = np.searchsorted(head.classes_, split.y_val[val_known])
        proba = head.predict_proba(split.X_val)
        # the temperature is fitted on known classes only, as train would
        t = calibrate(proba[val_known], y_known)["temperature"]
        score = apply_temperature(proba, t).max(axis=1)
        auroc = roc_auc_score(~val_known, -score)
        threshold = np.percentile(score[val_known], 5)  # keeps 95% of known images
        flagged = float(np.mean(score[~val_known] < threshold))
        rows.append([name, f"{auroc:.3f}", f"{flagged:.3f}", f"{threshold:.3f}"])
        print(rows[-1], flush=True)
    aurocs = [float(r[1]) for r in rows]
    flagged = [float(r[2]) for r in rows]
    thresholds = [float(r[3]) for r in rows]
    rows.append(["**mean**", f"{np.mean(aurocs):.3f}", f"{np.mean(flagged):.3f}",
                 f"{np.median(thresholds):.3f} (median)"])
    report(f"calibration and --unknown-below on {Path(store).name}",
           f"Default logreg head, temperature fitted on the validation split: ECE "
           f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after (T = "
           f"{cal['temperature']}, applied: {cal['applied']}; 'after' measured on halves T "
           f"was not fitted on; log loss {cal['log_loss_before']:.4f} -> "
           f"{cal['log_loss_after']:.4f}; {cal['n']} validation images).\n\n"
           f"Leave one class out (logreg on up to {per_class} training images per known "
           "class, calibrated on the known classes' validation images):\n\n"
           + table(["unseen class", "AUROC known vs unseen (top probability)",
                    "unseen flagged at 95% of known kept", "threshold P there"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["duplicates", "audit", "labels", "calibration"])
    ap.add_argument("store", nargs="?")
    ap.add_argument("--flip", type=float, default=0.01)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--per-class", type=int, default=1000)
    a = ap.parse_args()
    if a.what != "duplicates" and not a.store:
        ap.error(f"{a.what} needs a STORE")
    {"duplicates": bench_duplicates, "audit": lambda: bench_audit(a.store),
     "labels": lambda: bench_labels(a.store, a.flip, a.draws),
     "calibration": lambda: bench_calibration(a.store, a.per_class)}[a.what]()


if __name__ == "__main__":
    main()
