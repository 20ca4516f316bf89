"""Fine-tuning a few hundred images: is the result ever worse than before?

    python -m bench.bench_finetune_small WORK_DIR [--seeds 0,1,2] [--epochs N]

Issues 13 and 23's check: on a labelled set of a few hundred images,
`finetune` at its defaults must not lower validation accuracy (by more than
0.01, under one image of ~60), with the guard or without, and must answer
quickly. Each set is extracted once; for each seed a logreg head is trained
(`train --seed`: another validation split and training order), then
`finetune` runs with the guard (the default) and with --no-guard, both from
the same activation cache; wall seconds of each run are reported. Sets: the bundled
Fashion-MNIST sample, two Fashion-MNIST subsets, and photo crops made from scikit-image's and
scikit-learn's sample photos (class = source photo).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, report, table
from bench.fashion_mnist import write_pngs

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "retina"]


def write_photo_crops(out: Path, per_class: int = 25, seed: int = 0) -> None:
    """Random square crops (20-45% of the short side, flipped at random) of 12 photos."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    photos = {name: getattr(skimage.data, name)() for name in PHOTOS}
    photos.update({n[:-4]: load_sample_image(n) for n in ("china.jpg", "flower.jpg")})
    for name, img in photos.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        h, w = img.shape[:2]
        for i in range(per_class):
            side = int(min(h, w) * rng.uniform(0.2, 0.45))
            y, x = rng.integers(0, h - side), rng.integers(0, w - side)
            crop = img[y:y + side, x:x + side]
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            Image.fromarray(np.ascontiguousarray(crop)).resize((160, 160)).save(
                out / name / f"{name}-{i:03d}.jpg", quality=90)


def make_sets(work: Path) -> dict[str, Path]:
    sets = {"fashion-mnist-sample (bundled)": REPO / "data" / "fashion-mnist-sample"}
    for per_class, offset in ((20, 1000), (50, 2000)):
        folder = work / f"fm{per_class * 10}"
        if not folder.is_dir():
            write_pngs(folder, "train", per_class, offset)
        sets[f"Fashion-MNIST train, {per_class}/class from #{offset}"] = folder
    folder = work / "photos"
    if not folder.is_dir():
        write_photo_crops(folder)
    sets["photo crops, 12 classes x 25"] = folder
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="[default: the recipe's]")
    a = ap.parse_args()
    from embedstore.extraction import extract
    from embedstore.finetuning import finetune
    from embedstore.training import train

    rows, worse = [], {"guard": 0, "no guard": 0}
    for label, images in make_sets(a.work).items():
        store = a.work / f"{images.name}.h5"
        extract(images, store)
        for seed in map(int, a.seeds.split(",")):
            head = a.work / f"{images.name}-head{seed}"
            train(store, head, head="logreg", seed=seed, overwrite=True)
            result = {}
            for name, guard in (("guard", True), ("no guard", False)):
                out = a.work / f"{images.name}-out{seed}-{'g' if guard else 'n'}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                result[name] = finetune(head, out, images=images, epochs=a.epochs, guard=guard,
                                        log=lambda m: print(m, file=sys.stderr))
                result[name]["wall_s"] = time.perf_counter() - start
                scores = result[name]["before"], result[name]["after"]
                worse[name] += scores[1]["val_accuracy"] < scores[0]["val_accuracy"] - 0.01
            g, n = result["guard"], result["no guard"]
            v = g["guard"]
            judged = (f"+{v['only_tuned_right']} -{v['only_original_right']} p={v['p_value']:.2f}"
                      if "p_value" in v else "stopped before training")
            rows.append([label, len(list(images.rglob("*.*"))), seed, g["recipe"], g["n_val"],
                         f"{g['before']['val_accuracy']:.3f}", f"{g['after']['val_accuracy']:.3f}",
                         "original" if g["kept_original_weights"] else "tuned",
                         f"{v['n_holdout']} ({v['frozen_holdout_errors']} missed): {judged}",
                         f"{g['wall_s']:.0f}", f"{n['after']['val_accuracy']:.3f}",
                         f"{n['start']['accuracy']:.3f} / "
                         f"{n['guard']['holdout_accuracy_original']:.3f}"
                         if n.get("start") else "", f"{n['wall_s']:.0f}"])
    body = (table(["set", "images", "seed", "recipe", "val images", "val acc before",
                   "after (guard, default)", "weights kept",
                   "hold-out (frozen misses): tuned wins/losses, p", "guard run s",
                   "after (--no-guard)", "--no-guard epoch 0 / frozen hold-out acc",
                   "--no-guard run s"], rows)
            + f"\n\n`finetune` ({f'--epochs {a.epochs}' if a.epochs else 'default epochs'}) at "
              f"block 14, logreg heads. Runs worse than "
              f"before by more than 0.01: guard {worse['guard']} of {len(rows)}, --no-guard "
              f"{worse['no guard']} of {len(rows)}.")
    report("Fine-tuning a few hundred images: before/after (bench/bench_finetune_small.py)", body)


if __name__ == "__main__":
    main()
