"""Extraction on Ray Data: read, hash and decode on CPU tasks, the backbone in an actor pool.

The driver (this process) keeps the store. It lists the files with
embedstore.sources.scan, the same listing, relative paths and labels the local
engine uses (Ray's own file listing has other rules for hidden files,
extensions and file lists), and sends (index, absolute path) rows to Ray.
CPU tasks read, hash, decode and resize with embedstore.pipeline.load_file;
content the store already holds (a sorted array of known hashes, shared
through the object store) is hashed but never decoded. An actor pool, with the
backbone built once per actor, embeds the new pixels. The driver streams the
results back in file order, classifies the rest with the job's shared triage
(embedstore.engines.job), and commits every `commit_every` new rows: a killed run
keeps every committed batch and the next run resumes from the store.
`workers` (--workers) caps the decode tasks running at once, as it caps the
local engine's decode threads. Stage seconds come back with the rows (read,
hash, decode, resize from the tasks, infer from the actors), summed over all
of them like the local engine's threads; write is the driver's.

Rows that need no model carry no pixels, so pixels and vectors travel as bytes
(empty when absent): Arrow has no column type for "a tensor or nothing".
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore.engines import Committer, EngineError, ExtractionJob
from embedstore.pipeline import STAGES

if TYPE_CHECKING:
    from embedstore.backbones import Backbone

LOCAL_OBJECT_STORE_BYTES = 300 * 2**20  # enough for a few batches in flight on a small box
FILES_PER_BLOCK = 64  # rows per input block: one read task; small blocks keep results streaming
# A TensorFlow process holding the model takes ~1 GB. Reserving it stops Ray packing more
# actors on a node than fit and, as the two stages then ask for different resources,
# stops Ray fusing the decode tasks into the actors (which would serialise decoding
# with inference).
ACTOR_MEMORY_BYTES = 2**30


def require() -> None:
    """Raise ImportError (naming the package) when Ray Data is not installed."""
    import ray  # noqa: F401
    import ray.data  # noqa: F401


def run(job: ExtractionJob, address: str | None = None, num_workers: int | None = None,
        gpus_per_worker: float | None = None) -> None:
    """Embed the job's new files on the Ray cluster at `address` (None: start one here)."""
    import ray

    if num_workers is not None and num_workers < 1:
        raise EngineError("num_workers must be at least 1")
    if job.workers is not None and job.workers < 1:
        raise EngineError("workers must be at least 1")
    if gpus_per_worker is not None and gpus_per_worker <= 0:
        raise EngineError("gpus_per_worker must be positive")
    # A Ray started here belongs to this process: a watchdog ends it if this one is killed
    watchdog = _start_watchdog() if address is None and not ray.is_initialized() else None
    try:
        started = _connect(address)
        try:
            workers = num_workers or _default_pool_size(gpus_per_worker)
            _check_resources(workers, gpus_per_worker, address)
            with _native_stderr_to_session_log():
                _stream_into_store(job, workers, gpus_per_worker)
        finally:
            if started:
                ray.shutdown()
    finally:
        if watchdog is not None:
            watchdog.terminate()  # it ends whatever shutdown left, then exits
            watchdog.wait()


# Runs beside a driver that starts Ray itself. Ray's processes are the driver's
# descendants; on SIGKILL of the driver, gcs_server and raylet go (Ray makes them
# share its fate), but the raylet's agents (DashboardAgent, RuntimeEnvAgent) hang for
# about a minute trying to report to the dead GCS. The watchdog notes the driver's
# descendants started after itself (not the caller's own children) every
# WATCH_SECONDS; once the driver is gone (the watchdog's parent changes) or on
# SIGTERM, it kills those still running (psutil checks pid reuse) and exits.
WATCH_SECONDS = 0.25
_WATCHDOG = """
import os, signal, sys, time
sys.path.append(sys.argv[3])  # Ray ships psutil in its thirdparty_files
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
driver, me, seen = psutil.Process(int(sys.argv[1])), psutil.Process(), {}
while not stop and os.getppid() == driver.pid:
    try:
        for p in driver.children(recursive=True):
            if p.pid != me.pid and p.create_time() >= me.create_time():
                seen[p.pid] = p
    except psutil.Error:
        pass
    time.sleep(float(sys.argv[2]))
for p in seen.values():
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _start_watchdog():
    import subprocess

    import ray

    vendored = os.path.join(os.path.dirname(ray.__file__), "thirdparty_files")
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                             str(WATCH_SECONDS), vendored], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a small local one; True if we started Ray."""
    import ray

    _quiet_logging()
    if ray.is_initialized():  # the caller's own Ray session (a notebook, the tests)
        return False
    quiet = not os.environ.get("EMBEDSTORE_DEBUG")
    settings: dict[str, Any] = dict(include_dashboard=False, log_to_driver=not quiet,
                    logging_level=logging.ERROR if quiet else logging.INFO,
                    runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    if address is None:
        settings.update(num_cpus=os.cpu_count() or 1,
                        object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    try:
        ray.init(address=address, **settings)
    except ConnectionError as exc:
        raise EngineError(f"cannot reach the Ray cluster at {address} ({exc}); start it with "
                          "`ray start --head` or give its address with --address") from None
    return True


def _quiet_logging() -> None:
    """Ray's own lines stay off the terminal (they are in its session logs); embedstore
    shows the progress. EMBEDSTORE_DEBUG=1 lets them through."""
    if os.environ.get("EMBEDSTORE_DEBUG"):
        return
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_stderr_to_session_log() -> Iterator[None]:
    """The driver's native stderr (Ray's C++ core worker logs its errors there, e.g.
    about actor restarts) goes to the session's logs/embedstore_driver.err; Python's
    sys.stderr (embedstore's progress and messages) keeps the terminal."""
    if os.environ.get("EMBEDSTORE_DEBUG"):
        yield
        return
    log = os.path.join(_session_dir(), "logs", "embedstore_driver.err")
    sys.stderr.flush()
    terminal = os.dup(2)
    python_stderr = sys.stderr
    try:
        sink = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    os.close(sink)
    sys.stderr = open(terminal, "w", buffering=1, encoding=python_stderr.encoding,
                      errors=python_stderr.errors, closefd=False)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)
        os.close(terminal)


def _session_dir() -> str:
    """This driver's Ray session directory (/tmp/ray/session_...)."""
    try:
        from ray._private import worker

        return worker._global_node.get_session_dir_path()  # type: ignore[attr-defined]
    except Exception:  # a private API: if it moved, the lines go to the temp dir
        import tempfile

        return tempfile.gettempdir()


def _default_pool_size(gpus_per_worker: float | None) -> int:
    """One actor per GPU share when asked for GPUs; else half the CPUs (the rest decode)."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)) // 2)


def _check_resources(workers: int, gpus_per_worker: float | None, address: str | None) -> None:
    """Refuse a pool the cluster cannot hold: Ray would wait for it forever."""
    import ray

    resources = ray.cluster_resources()
    where = f"the Ray cluster at {address}" if address else "this machine's Ray"
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if gpus_per_worker and workers * gpus_per_worker > gpus:
        raise EngineError(f"{where} has {gpus:g} GPUs; {workers} workers x {gpus_per_worker:g} "
                          "GPUs do not fit: lower --num-workers or --gpus-per-worker")
    if workers >= cpus:
        raise EngineError(f"{where} has {cpus:g} CPUs; {workers} model workers would leave none "
                          "for decoding: lower --num-workers")


def _stream_into_store(job: ExtractionJob, workers: int, gpus_per_worker: float | None) -> None:
    import pyarrow as pa
    import ray
    import ray.data

    if not job.refs:
        return
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True  # results arrive in file order
    context.enable_progress_bars = False
    try:
        files = pa.table({"index": np.arange(len(job.refs), dtype=np.int64),
                          "path": [os.path.abspath(r.path) for r in job.refs]})
        dataset: Any = ray.data.from_arrow([files.slice(start, FILES_PER_BLOCK)
                                       for start in range(0, len(job.refs), FILES_PER_BLOCK)])
        backbone = job.backbone
        dataset = dataset.map_batches(
            load_batch, batch_size=job.batch_size, num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=job.workers),
            fn_kwargs={"known": ray.put(job.writer.known_digests()),
                       "input_size": backbone.input_size,
                       "crop_fraction": backbone.crop_fraction, "max_pixels": job.max_pixels})
        dataset = dataset.map_batches(
            Embedder, batch_size=job.batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
            num_gpus=gpus_per_worker or None, memory=ACTOR_MEMORY_BYTES,
            # the runtime as asked ("auto" picks the GPU on a GPU node), not as the driver
            # resolved it on its own machine
            fn_constructor_kwargs={"backbone_name": backbone.name, "runtime": job.runtime,
                                   "fingerprint": backbone.fingerprint})
        _write(job, dataset.iter_batches(batch_size=job.batch_size, batch_format="numpy"))
    except ray.exceptions.RayError as exc:
        raise EngineError(f"the Ray job failed: {_first_line(exc)}") from None
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def _write(job: ExtractionJob, batches) -> None:
    """Stream results into the store on the driver, committing every commit_every new rows."""
    state, committer = job.state, Committer(job)
    for batch in batches:
        for stage in (*STAGES, "infer"):
            state.stages[stage] += float(batch[stage].sum())
        refs, shas, vectors = [], [], []
        for index, sha, error, vector in zip(batch["index"], batch["sha256"], batch["error"],
                                             batch["vector"]):
            ref = job.refs[int(index)]
            state.done += 1
            if len(vector):
                refs.append(ref)
                shas.append(sha)
                vectors.append(np.frombuffer(vector, np.float32))
            else:
                job.triage(ref, sha or None, error or None)
        if refs:
            committer.add(refs, shas, np.stack(vectors))
        job.report()


def load_batch(batch: dict, known, input_size: int, crop_fraction: float,
               max_pixels: int) -> dict:
    """Ray CPU task: read, hash, and (unless known) decode and resize a batch of files."""
    import ray

    from embedstore.pipeline import Resizer, load_file

    if isinstance(known, ray.ObjectRef):
        known = ray.get(known)
    resizer = Resizer(input_size, crop_fraction)

    def is_known(sha: str) -> bool:
        at = np.searchsorted(known, sha.encode())
        return bool(at < len(known) and known[at] == sha.encode())

    loaded = [load_file(str(path), resizer, is_known, max_pixels, int(index))
              for index, path in zip(batch["index"], batch["path"])]
    return {"index": batch["index"],
            "sha256": _objects([item.sha256 or "" for item in loaded]),
            "error": _objects([item.error or "" for item in loaded]),
            # resized float32 pixels, copied once into bytes (a grey image's view too)
            "pixels": _objects([item.image.tobytes() if item.error is None and
                                item.image is not None else b"" for item in loaded]),
            **{stage: np.array([item.seconds.get(stage, 0.0) for item in loaded])
               for stage in STAGES}}


class Embedder:
    """Ray actor: the backbone, built once per actor, embedding the batch's new pixels.

    The model is built on the first batch with new pixels, so a re-run over
    unchanged files never loads it.
    """

    def __init__(self, backbone_name: str, runtime: str, fingerprint: str):
        self.backbone_name, self.runtime, self.fingerprint = backbone_name, runtime, fingerprint
        self.backbone: Backbone | None = None

    def _build(self):
        from embedstore.backbones.runtimes import load_for_inference

        backbone = load_for_inference(self.backbone_name, self.runtime)  # as asked, on this node
        if backbone.fingerprint != self.fingerprint:  # e.g. other weights on a worker node
            raise EngineError(f"backbone {self.backbone_name} on this Ray worker has "
                              f"fingerprint {backbone.fingerprint[:12]}, not the driver's "
                              f"{self.fingerprint[:12]}; install the same weights on every node")
        return backbone

    def __call__(self, batch: dict) -> dict:
        pixels = batch.pop("pixels")
        new = [i for i, p in enumerate(pixels) if len(p)]
        vectors = [b""] * len(pixels)
        seconds = np.zeros(len(pixels))  # "infer", shared by the batch's new files
        if new:
            backbone = self.backbone = self.backbone or self._build()
            size = backbone.input_size
            clock = time.perf_counter()
            x = np.stack([np.frombuffer(pixels[i], np.float32).reshape(size, size, 3)
                          for i in new])
            for i, vector in zip(new, backbone.embed(x)):
                vectors[i] = vector.tobytes()
            seconds[new] = (time.perf_counter() - clock) / len(new)
        batch["vector"] = _objects(vectors)
        batch["infer"] = seconds
        return batch


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _first_line(exc: BaseException) -> str:
    """The user-facing cause of a Ray error, without Ray's wrapping and traceback."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(cause).__name__)
