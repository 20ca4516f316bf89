"""What every engine shares: the job it is given, its running state, how a file that
needs no model is triaged, and the commit cadence. Engines import this, never
`embedstore.extraction` (which composes them)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from embedstore.pipeline import STAGES

if TYPE_CHECKING:
    from embedstore.backbones import Backbone
    from embedstore.sources import ImageRef
    from embedstore.store import Writer


@dataclass
class JobState:
    """The running counts of one extraction, reported after every file: enough for a
    progress bar with rate and failures, and for the summary."""

    done: int = 0
    total: int = 0
    embedded: int = 0
    reused: int = 0
    unchanged: int = 0
    failed: int = 0
    pruned: int = 0
    started: float = field(default_factory=time.monotonic)
    # seconds per stage; read..resize are summed over the decode threads or tasks, so
    # with several they add up to more than the wall time
    stages: dict = field(default_factory=lambda: dict.fromkeys((*STAGES, "infer", "write"), 0.0))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ExtractionJob:
    """One extraction handed to an engine; the writer is open and owned by the caller."""

    refs: list[ImageRef]
    root: str
    backbone: Backbone
    writer: Writer
    state: JobState
    new_failures: list
    progress: Callable[[JobState], None] | None
    batch_size: int
    max_pixels: int
    commit_every: int
    workers: int | None = None  # decode threads (local) or decode tasks at once (ray)
    runtime: str = "auto"  # as asked: a remote model worker resolves it on its own node

    def report(self) -> None:
        if self.progress:
            self.progress(self.state)

    def triage(self, ref: ImageRef, sha: str | None, error: str | None) -> None:
        """A file that needs no model run: a failure, unchanged, or known content at a new
        path (a rename or a copy). Every engine calls this, so all write the same store."""
        writer, state = self.writer, self.state
        if error is not None:
            state.failed += 1
            if not writer.failed_before(ref.relpath, sha or ""):
                writer.add_failure(ref.relpath, sha, error)
                self.new_failures.append({"path": ref.relpath, "reason": error})
        elif writer.sha_of(ref.relpath) == sha:
            state.unchanged += 1
        else:
            assert sha is not None  # a file that was read has a hash
            old_paths = [p for p in writer.paths_of(sha) if p != ref.relpath]
            writer.add_copy(ref.relpath, sha, ref.label)
            for old in old_paths:  # a rename: the old path is gone from disk
                if writer.sha_of(old) == sha and not os.path.exists(os.path.join(self.root, old)):
                    writer.remove(old)
            state.reused += 1


class Committer:
    """Adds embedded rows to the writer and commits exactly every `commit_every` new rows
    (also when that is below the batch size): the most a crash can lose."""

    def __init__(self, job: ExtractionJob):
        self.job = job
        self.since_commit = 0

    def add(self, refs: list, shas: list[str], vectors: np.ndarray) -> None:
        job, start = self.job, 0
        clock = time.perf_counter()
        while start < len(refs):
            stop = min(len(refs), start + job.commit_every - self.since_commit)
            job.writer.add(vectors[start:stop], [r.relpath for r in refs[start:stop]],
                           shas[start:stop], [r.label for r in refs[start:stop]])
            self.since_commit += stop - start
            if self.since_commit >= job.commit_every:
                job.writer.commit()
                self.since_commit = 0
            start = stop
        job.state.embedded += len(refs)
        job.state.stages["write"] += time.perf_counter() - clock
