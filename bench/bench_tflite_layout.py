"""TFLite/XNNPACK model-only rate by layout: interpreters x threads each x batch size.

    python -m bench.bench_tflite_layout [--seconds 6]

Why TFLiteRunner runs one single-threaded interpreter per core at batch 1.
Uses the cached conversion of the default backbone (made by any extract run);
each interpreter runs in its own Python thread (invoke releases the GIL).
Settings run in turn in one process, in two rounds, best of the two.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from bench.common import report, table
from embedstore.backbones import runtimes
from embedstore.backbones.runtimes import tflite as _tflite  # noqa: F401  (runtimes.tflite)


def _interpreter(batch: int, threads: int):
    model = str(runtimes.tflite._mobilenet_v2_tflite_path())
    it = runtimes.tflite._interpreter_class()(model_path=model,
                                       num_threads=threads)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    it.resize_tensor_input(inp, [batch, 224, 224, 3])
    it.allocate_tensors()
    return it, inp, out


def rate(interpreters: int, threads: int, batch: int, seconds: float) -> float:
    x = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
    counts = [0] * interpreters
    loaded = [_interpreter(batch, threads) for _ in range(interpreters)]

    def work(k: int, stop: float) -> None:
        it, inp, out = loaded[k]
        while time.perf_counter() < stop:
            it.set_tensor(inp, x)
            it.invoke()
            it.get_tensor(out)
            counts[k] += batch

    for k in range(interpreters):  # warm-up
        work(k, 0)
    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k, start + seconds))
               for k in range(interpreters)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6)
    a = ap.parse_args()
    runtimes.load_for_inference("mobilenet_v2")  # converts once if not cached yet
    settings = [(1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 2, 4), (2, 1, 4), (1, 2, 32)]
    best = {s: max(rate(*s, a.seconds) for _ in range(2)) for s in settings}
    rows = [[i, t, b, f"{best[(i, t, b)]:.1f}"] for i, t, b in settings]
    report("TFLite layout: interpreters, threads, batch",
           table(["interpreters", "threads each", "batch", "img/s"], rows))


if __name__ == "__main__":
    main()
