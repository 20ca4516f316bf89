"""TFLite/XNNPACK model-only rate by batch size and thread count (why TFLITE_BATCH is 1).

    python bench/bench_tflite_batch.py [--seconds 6]

Uses the cached conversion of the default backbone (made by any extract run);
each setting runs in turn in one process, in two rounds, best of the two.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import report, table  # noqa: E402

from embedstore.backbones import runtimes  # noqa: E402


def rate(batch: int, threads: int, seconds: float) -> float:
    it = runtimes._interpreter_class()(model_path=str(runtimes._mobilenet_v2_tflite_path()),
                                       num_threads=threads)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    it.resize_tensor_input(inp, [batch, 224, 224, 3])
    it.allocate_tensors()
    x = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
    it.set_tensor(inp, x)
    it.invoke()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        it.set_tensor(inp, x)
        it.invoke()
        it.get_tensor(out)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6)
    a = ap.parse_args()
    runtimes.load_for_inference("mobilenet_v2")  # converts once if not cached yet
    settings = [(b, t) for b in (1, 4, 32) for t in (1, 2)]
    best = {s: max(rate(*s, a.seconds) for _ in range(2)) for s in settings}
    rows = [[b, t, f"{best[(b, t)]:.1f}"] for b, t in settings]
    report("TFLite batch size and threads", table(["batch", "threads", "img/s"], rows))


if __name__ == "__main__":
    main()
