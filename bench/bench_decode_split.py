"""How to split 2 cores between decoding and inference: decode threads vs processes.

    python -m bench.bench_decode_split [--fm 3000] [--jpegs 500] [--rounds 2]

Files in, embeddings out (no store): the pipeline's `stream` with 1, 2 and 4
decode threads feeding the TFLite runner, against a pool of 2 decode processes
(forkserver) sending resized pixels back (a grey image as one plane). Each
round runs every setting once, in turn, between two model-only runs; a ratio
divides by the faster model-only run of its round. Best of the rounds.
Data as bench_extract.py makes it (Fashion-MNIST PNG, synthetic 500x375 JPEG).
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.bench_extract import make_jpegs, make_tree
from bench.common import report, table
from embedstore.backbones.runtimes import load_for_inference
from embedstore.pipeline import Resizer, batched, load_file, stream

RESIZER = Resizer(224, 0.875)  # MobileNetV2's policy
BATCH = 32


def _decode_in_process(path: str):
    image = load_file(path, RESIZER, lambda sha: False).image
    if image.strides[-1] == 0:  # a grey image's broadcast view: one plane is enough
        return image[..., 0].copy(), True
    return np.ascontiguousarray(image), False


def _with_processes(files: list[str], backbone, pool, window: int = 128) -> None:
    pending: deque = deque()

    def pixels():
        plane, grey = pending.popleft().result()
        return np.broadcast_to(plane[..., None], (*plane.shape, 3)) if grey else plane

    batch = []
    for path in files:
        pending.append(pool.submit(_decode_in_process, path))
        if len(pending) >= window:
            batch.append(pixels())
        if len(batch) == BATCH:
            backbone.embed(batch)
            batch = []
    while pending:
        batch.append(pixels())
    for rest in batched(batch, BATCH):
        backbone.embed(rest)


def _with_threads(files: list[str], backbone, workers: int) -> None:
    for batch in batched(stream(files, RESIZER, workers=workers), BATCH):
        backbone.embed([item.image for item in batch])


def _model_only(backbone, seconds: float) -> float:
    x = [np.random.default_rng(0).uniform(0, 255, (224, 224, 3)).astype(np.float32)] * BATCH
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        backbone.embed(x)
        n += BATCH
    return n / (time.perf_counter() - start)


def _rate(run, files: list[str]) -> float:
    start = time.perf_counter()
    run(files)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/es-bench"))
    ap.add_argument("--fm", type=int, default=3000, help="Fashion-MNIST PNGs")
    ap.add_argument("--jpegs", type=int, default=500, help="500x375 JPEGs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model-seconds", type=float, default=5)
    a = ap.parse_args()
    from bench.fashion_mnist import write_pngs

    full = a.work / "fm-test"
    if not full.exists():
        write_pngs(full, "test")
    datasets = {"Fashion-MNIST PNG 28x28": make_tree(full, a.work / f"fm-{a.fm}", a.fm),
                "synthetic JPEG 500x375": make_jpegs(a.work / "jpeg", a.jpegs)}
    backbone = load_for_inference("mobilenet_v2", "tflite")
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))
    settings = {f"{w} decode thread{'s' if w > 1 else ''}":
                (lambda files, w=w: _with_threads(files, backbone, w)) for w in (1, 2, 4)}
    settings["2 decode processes"] = lambda files: _with_processes(files, backbone, pool)
    for tree in datasets.values():  # warm: page cache, conversion, process start-up
        files = sorted(glob.glob(f"{tree}/*/*"))[:64]
        for run in settings.values():
            run(files)
    best: dict = {}
    for _ in range(a.rounds):
        for label, tree in datasets.items():
            files = sorted(glob.glob(f"{tree}/*/*"))
            before = _model_only(backbone, a.model_seconds)
            rates = {name: _rate(run, files) for name, run in settings.items()}
            model = max(before, _model_only(backbone, a.model_seconds))
            for name, r in rates.items():
                old = best.get((label, name))
                if old is None or r / model > old[1]:
                    best[(label, name)] = (r, r / model, model)
    pool.shutdown()
    rows = [[label, name, f"{r:.0f}", f"{m:.0f}", f"**{ratio:.2f}**"]
            for (label, name), (r, ratio, m) in best.items()]
    report("Splitting the cores: decode threads vs processes",
           table(["data", "decode side", "img/s", "model-only img/s", "/ model-only"], rows))


if __name__ == "__main__":
    main()
