"""The batch job: sources -> pipeline -> backbone -> store, resumable.

Every file is read and hashed once. Content already in the store is never
decoded or embedded again: an unchanged file is skipped, a renamed or copied
file reuses its vectors, a changed file gets new ones. Bad files are recorded
in /failures with the reason and never stop the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from embedstore.backbones import Backbone
from embedstore.backbones.runtimes import DEFAULT_RUNTIME, Preparation, get_runtime, load_for_store
from embedstore.engines import ExtractionJob, JobState, get_engine
from embedstore.lazy_backbone import recorded_lazily
from embedstore.pipeline import DEFAULT_MAX_PIXELS
from embedstore.sources import scan
from embedstore.store import layout, open_writer, stored_backbone


@dataclass
class ExtractResult:
    store: str
    backbone: str
    total: int
    embedded: int
    reused: int
    unchanged: int
    failed: int
    pruned: int
    seconds: float  # the job's own time, after start-up
    images_per_second: float
    new_failures: list[dict]
    startup_seconds: float = 0.0  # loading the backbone (converting it, the first time)
    runtime: str = ""
    device: str = ""  # CPU, or the GPU the backbone ran on
    stages: dict = field(default_factory=dict)  # stage -> seconds, see JobState.stages


def backbone_meta(backbone: Backbone) -> dict:
    """How the store records the backbone that made its vectors."""
    return {"name": backbone.name, "fingerprint": backbone.fingerprint, "dim": backbone.dim,
            "config": backbone.config()}


def extract(images: str | Path, store: str | Path, backbone: str | Backbone = "mobilenet_v2",
            batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
            commit_every: int = 512, workers: int | None = None, prune: bool = False,
            progress: Callable[[JobState], None] | None = None,
            runtime: str = DEFAULT_RUNTIME, status: Callable[[str], None] | None = None,
            follow_links: bool = False, engine: str = "local",
            engine_options: dict | None = None) -> ExtractResult:
    """Embed every image under IMAGES that the store does not hold yet.

    With prune, rows and failures of files no longer under IMAGES are dropped.
    Symlinks leading out of IMAGES are recorded as failures unless follow_links.
    A backbone given by name runs on `runtime` (backbones.runtimes); `status`
    hears what start-up is doing ("loading mobilenet_v2 (tflite)...").
    `engine` says where decoding and the model run (see embedstore.engines);
    `engine_options` are that engine's own settings (e.g. Ray's address).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    run = get_engine(engine, engine_options)  # fails fast, e.g. Ray not installed
    started = time.monotonic()
    source = scan(images, follow_links)
    if isinstance(backbone, str):  # the model loads at the first new image, if any
        backbone = cast(Backbone, (
            # a runtime that prepares a model from the images (int8) decides for itself
            engine == "local" and not get_runtime(runtime).extract_only
            and recorded_lazily(store, backbone, runtime, status)
            or load_for_store(backbone, runtime, Preparation(
                str(store), _recorded_backbone(Path(store)), layout(store).int8,
                [r.path for r in source.images], str(source.root), max_pixels), say=status)))
    refs = source.images
    startup = time.monotonic() - started
    state = JobState(total=len(refs))
    new_failures: list[dict] = []

    with open_writer(store, backbone_meta(backbone)) as writer:
        for skipped in source.skipped:  # links out of the root, unreadable folders
            state.failed += 1
            if not writer.failed_before(skipped.relpath, ""):
                writer.add_failure(skipped.relpath, None, skipped.reason)
                new_failures.append({"path": skipped.relpath, "reason": skipped.reason})
        run(ExtractionJob(refs, source.root, backbone, writer, state, new_failures, progress,
                          batch_size, max_pixels, commit_every, workers, runtime))
        if prune:
            gone = writer.paths() - {r.relpath for r in refs} - {k.relpath for k in source.skipped}
            for path in sorted(gone):
                writer.remove(path)
            state.pruned = len(gone)
        closing = time.perf_counter()
    state.stages["write"] += time.perf_counter() - closing  # the last commit and the merge
    return ExtractResult(str(store), backbone.name, state.total, state.embedded, state.reused,
                         state.unchanged, state.failed, state.pruned, round(state.seconds, 3),
                         round(state.images_per_second, 2), new_failures,
                         startup_seconds=round(startup, 3), runtime=backbone.runtime,
                         device=backbone.device,
                         stages={k: round(v, 3) for k, v in state.stages.items()})


def _recorded_backbone(store: Path) -> str | None:
    """The backbone name STORE records, None if there is no store yet."""
    recorded = stored_backbone(store)
    return recorded["name"] or None if recorded else None
