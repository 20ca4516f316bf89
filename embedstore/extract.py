"""The batch job: sources -> pipeline -> backbone -> store, resumable.

Every file is read and hashed once. Content already in the store is never
decoded or embedded again: an unchanged file is skipped, a renamed or copied
file reuses its vectors, a changed file gets new ones. Bad files are recorded
in /failures with the reason and never stop the job.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from embedstore.backbones import Backbone, BackboneError, int8
from embedstore.backbones.reference import canonical_name
from embedstore.backbones.runtimes import DEFAULT_RUNTIME, load_for_inference
from embedstore.engines import EngineJob, get_engine
from embedstore.lazy_backbone import recorded_lazily
from embedstore.pipeline import DEFAULT_MAX_PIXELS, STAGES, Resizer, batched, stream
from embedstore.sources import scan
from embedstore.store import StoreWriter, open_store


@dataclass
class Progress:
    """Reported after every file: enough for a bar with rate and failures."""

    done: int = 0
    total: int = 0
    embedded: int = 0
    reused: int = 0
    unchanged: int = 0
    failed: int = 0
    pruned: int = 0
    started: float = field(default_factory=time.monotonic)
    # seconds per stage; read..resize are summed over the decode threads, so with
    # several threads they add up to more than the wall time
    stages: dict = field(default_factory=lambda: dict.fromkeys((*STAGES, "infer", "write"), 0.0))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


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
    stages: dict = field(default_factory=dict)  # stage -> seconds, see Progress.stages


def backbone_meta(backbone: Backbone) -> dict:
    """How the store records the backbone that made its vectors."""
    return {"name": backbone.name, "fingerprint": backbone.fingerprint, "dim": backbone.dim,
            "config": backbone.config()}


def extract(images: str | Path, store: str | Path, backbone: str | Backbone = "mobilenet_v2",
            batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
            commit_every: int = 512, workers: int | None = None, prune: bool = False,
            progress: Callable[[Progress], None] | None = None,
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
    run_elsewhere = get_engine(engine, engine_options)  # fails fast, e.g. Ray not installed
    started = time.monotonic()
    source = scan(images, follow_links)
    if isinstance(backbone, str) and runtime == "int8":
        backbone = _int8_backbone(backbone, Path(store), source, max_pixels, status)
    elif isinstance(backbone, str):  # the model loads at the first new image, if any
        backbone = (run_elsewhere is None and recorded_lazily(store, backbone, runtime, status)
                    or load_for_inference(backbone, runtime, say=status))
    resizer = Resizer(backbone.input_size, backbone.crop_fraction)
    refs = source.images
    startup = time.monotonic() - started
    state = Progress(total=len(refs))
    new_failures: list[dict] = []
    since_commit = 0

    with StoreWriter(store, backbone_meta(backbone)) as writer:
        for skipped in source.skipped:  # links out of the root, unreadable folders
            state.failed += 1
            if not writer.failed_before(skipped.relpath, ""):
                writer.add_failure(skipped.relpath, None, skipped.reason)
                new_failures.append({"path": skipped.relpath, "reason": skipped.reason})

        def embed(batch: list) -> np.ndarray:
            clock = time.perf_counter()
            vectors = backbone.embed([item.image for _, item in batch])
            state.stages["infer"] += time.perf_counter() - clock
            return vectors

        def write(batch: list, vectors: np.ndarray) -> None:
            nonlocal since_commit
            clock = time.perf_counter()
            start = 0
            while start < len(batch):  # commit exactly every commit_every rows
                stop = min(len(batch), start + commit_every - since_commit)
                part = batch[start:stop]
                writer.add(vectors[start:stop], [ref.relpath for ref, _ in part],
                           [item.sha256 for _, item in part], [ref.label for ref, _ in part])
                since_commit += len(part)
                if since_commit >= commit_every:
                    writer.commit()
                    since_commit = 0
                start = stop
            state.embedded += len(batch)
            state.stages["write"] += time.perf_counter() - clock
            if progress:
                progress(state)

        if run_elsewhere is not None:
            run_elsewhere(EngineJob(refs, source.root, backbone, writer, state, new_failures,
                                    progress, batch_size, max_pixels, commit_every, workers))
        else:
            to_embed = _classify(stream([r.path for r in refs], resizer, writer.known,
                                        max_pixels, workers), refs, writer, source.root, state,
                                 new_failures, progress)
            # one batch embeds while the one before is written and committed: the model
            # never waits for the store
            with ThreadPoolExecutor(1, thread_name_prefix="embed") as embedder:
                behind = None
                for batch in batched(to_embed, batch_size):
                    ahead = (batch, embedder.submit(embed, batch))
                    if behind:
                        write(behind[0], behind[1].result())
                    behind = ahead
                if behind:
                    write(behind[0], behind[1].result())
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
                         stages={k: round(v, 3) for k, v in state.stages.items()})


def _int8_backbone(name: str, store: Path, source, max_pixels: int,
                   say: Callable[[str], None] | None) -> Backbone:
    """--runtime int8: the quantized model STORE was made with, else one calibrated on
    (up to 300 of) the images about to be embedded, saved as STORE.int8."""
    say = say or (lambda message: None)
    recorded = _recorded_backbone(store)
    if recorded and int8.is_int8_dir(recorded) and \
            int8.describe(recorded)["based_on"] == canonical_name(name):
        return load_for_inference(recorded, "int8", say=say)
    if recorded:
        raise BackboneError(f"{store} holds vectors of backbone {recorded}; int8 vectors of {name} "
                            "cannot be mixed with them: extract into a new store, or drop "
                            "--runtime int8")
    base = load_for_inference(name, "tflite", say=say)
    tflite_path = getattr(base.model, "path", None)
    if base.runtime != "tflite" or tflite_path is None:
        raise BackboneError(f"{name} cannot be converted to TFLite, so it cannot be quantized "
                            "to int8; use --runtime tflite or keras")
    refs = source.images
    picks = np.unique(np.linspace(0, len(refs) - 1, min(int8.CALIBRATION_IMAGES, len(refs)))
                      .round().astype(int))  # spread over the sorted tree: every class
    resizer = Resizer(base.input_size, base.crop_fraction)
    pixels = [item.image for item in stream([refs[i].path for i in picks], resizer,
                                            max_pixels=max_pixels) if item.image is not None]
    if not pixels:
        raise BackboneError(f"none of the images under {source.root} could be decoded to "
                            "calibrate the int8 model")
    say(f"calibrating int8 {name} on {len(pixels)} of your images (once per store)...")
    quantized = int8.quantize(base, tflite_path, resizer.batch(pixels), f"{store}.int8",
                              str(source.root))
    fidelity = int8.describe(quantized.name)["fidelity"]
    say(f"int8 model saved in {quantized.name}: cosine to fp32 min {fidelity['min_cosine']:.3f}, "
        f"median {fidelity['median_cosine']:.3f} on its calibration images")
    return quantized


def _recorded_backbone(store: Path) -> str | None:
    """The backbone name STORE records, None if there is no store yet."""
    if not store.exists():
        return None
    with open_store(store) as reader:
        return reader.backbone["name"] or None


def _classify(loaded, refs, writer: StoreWriter, root: str, state: Progress,
              new_failures: list, progress):
    """Record known content and failures as they stream past; yield what needs the model."""
    for item in loaded:
        ref = refs[item.index]
        state.done += 1
        for stage, seconds in item.seconds.items():
            state.stages[stage] += seconds
        if item.error is None and item.image is not None:
            yield ref, item
            continue
        record_unembedded(writer, ref, item.sha256, item.error, root, state, new_failures)
        if progress:
            progress(state)


def record_unembedded(writer: StoreWriter, ref, sha: str | None, error: str | None, root: str,
                      state: Progress, new_failures: list) -> None:
    """A file that needs no model run: a failure, unchanged, or known content at a new path.

    Every engine classifies through here, so all of them write the same store.
    """
    if error is not None:
        state.failed += 1
        if not writer.failed_before(ref.relpath, sha or ""):
            writer.add_failure(ref.relpath, sha, error)
            new_failures.append({"path": ref.relpath, "reason": error})
    elif writer.path_sha.get(ref.relpath) == sha:
        state.unchanged += 1
    else:
        _reuse(writer, ref, sha, root)
        state.reused += 1


def _reuse(writer: StoreWriter, ref, sha: str, root: str) -> None:
    """Known content at a new path: a rename (old path gone) or a copy."""
    old_paths = [p for p in writer.sha_paths.get(sha, []) if p != ref.relpath]
    writer.add_copy(ref.relpath, sha, ref.label)
    for old in old_paths:
        if writer.path_sha.get(old) == sha and not os.path.exists(os.path.join(root, old)):
            writer.remove(old)
