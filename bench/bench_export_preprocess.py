"""Exported TFLite speed: embedstore's Preprocess layer vs the standard Dense(3) export uses.

Export replaces the backbone's Preprocess layer (a reshaped multiply-add that
XNNPACK runs fast) with a frozen Dense(3) on the channel axis, so that the
.keras file loads without embedstore. This converts mobilenet_v2 both ways
with export's own converter, then times one single-threaded interpreter per
model on the same 224x224 images, batch 1, the two alternating round by
round, and reports the median rate and the largest difference between their
outputs.

  .venv/bin/python -m bench.bench_export_preprocess [--images 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from bench.common import report, table  # noqa: E402


def interpreter(model_bytes: bytes):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite import Interpreter
    run = Interpreter(model_content=model_bytes, num_threads=1)
    return run.get_signature_runner("serving_default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    from embedstore.backbones import load_backbone
    from embedstore.exporting import _tflite_bytes, standard_backbone

    backbone = load_backbone("mobilenet_v2")
    runners = {"Preprocess (embedstore layer)": interpreter(_tflite_bytes(backbone.model)),
               "Dense(3) (standard, exported)": interpreter(
                   _tflite_bytes(standard_backbone(backbone.model)))}
    pixels = np.random.default_rng(0).uniform(0, 255, (args.images, 1, 224, 224, 3))
    pixels = pixels.astype(np.float32)
    rates = {name: [] for name in runners}
    outputs = {}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            out = [run(pixels=p)["probabilities"] for p in pixels]
            rates[name].append(args.images / (time.perf_counter() - start))
            outputs[name] = np.concatenate(out)
    a, b = outputs.values()
    diff = float(np.abs(a - b).max())
    rows = [[name, f"{statistics.median(r):.1f}", f"{min(r):.1f}-{max(r):.1f}"]
            for name, r in rates.items()]
    first, second = (statistics.median(r) for r in rates.values())
    body = (table(["preprocessing in the .tflite", "img/s (median)", "range"], rows)
            + f"\n\nDense(3) / Preprocess: {second / first:.2f}x; largest difference between "
              f"their 1280-d outputs: {diff:.2e} ({args.images} random 224x224 images, "
              f"{args.rounds} alternating rounds, one 1-thread interpreter each, batch 1).")
    if args.no_append:
        print(body)
    else:
        report("Exported TFLite: Preprocess layer vs standard Dense(3)", body)


if __name__ == "__main__":
    main()
