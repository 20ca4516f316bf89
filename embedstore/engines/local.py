"""The local engine: decode threads feeding the backbone in this process.

A bounded pool of threads reads, hashes, decodes and resizes (pipeline.stream);
content the store knows is never decoded. One batch embeds while the one before
is written and committed, so the model never waits for the store.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embedstore.engines.job import Committer, ExtractionJob
from embedstore.pipeline import Resizer, batched, stream


def require() -> None:
    """Nothing to install."""


def run(job: ExtractionJob) -> None:
    backbone, state = job.backbone, job.state
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    committer = Committer(job)

    def needing_the_model():
        for item in stream([r.path for r in job.refs], resizer, job.writer.known,
                           job.max_pixels, job.workers):
            ref = job.refs[item.index]
            state.done += 1
            for stage, seconds in item.seconds.items():
                state.stages[stage] += seconds
            if item.error is None and item.image is not None:
                yield ref, item
                continue
            job.triage(ref, item.sha256, item.error)
            job.report()

    def embed(batch: list) -> np.ndarray:
        clock = time.perf_counter()
        vectors = backbone.embed([item.image for _, item in batch])
        state.stages["infer"] += time.perf_counter() - clock
        return vectors

    def write(batch: list, vectors: np.ndarray) -> None:
        committer.add([ref for ref, _ in batch], [item.sha256 for _, item in batch], vectors)
        job.report()

    with ThreadPoolExecutor(1, thread_name_prefix="embed") as embedder:
        behind = None
        for batch in batched(needing_the_model(), job.batch_size):
            ahead = (batch, embedder.submit(embed, batch))
            if behind:
                write(behind[0], behind[1].result())
            behind = ahead
        if behind:
            write(behind[0], behind[1].result())
