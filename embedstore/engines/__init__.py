"""Where extraction runs: a tiny registry of engines, chosen by name.

"local" is extract()'s own in-process path (a decode thread pool feeding the
backbone). Any other engine is a function taking an `EngineJob`: it must embed
every file of the job that the store does not know, through `job.writer`, and
classify the rest with `embedstore.extract.record_unembedded`, so that every
engine writes the same store. Engines load lazily: an optional one (Ray) costs
nothing until asked for, and asking without it installed says how to install it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from embedstore.backbones import Backbone
    from embedstore.extract import Progress
    from embedstore.sources import ImageRef
    from embedstore.store import StoreWriter

# name -> (module with `run(job, **options)`, how to install what it needs); None: in-process
ENGINES: dict[str, tuple[str, str] | None] = {
    "local": None,
    "ray": ("embedstore.engines.ray", "pip install 'embedstore[ray]'"),
}


class EngineError(ValueError):
    """An engine that cannot run as asked, with what to do about it."""


@dataclass
class EngineJob:
    """One extraction run handed to an engine; the writer is open and owned by the caller."""

    refs: list[ImageRef]
    root: str
    backbone: Backbone
    writer: StoreWriter
    state: Progress
    new_failures: list
    progress: Callable[[Progress], None] | None
    batch_size: int
    max_pixels: int
    commit_every: int
    workers: int | None = None  # decode threads (local) or decode tasks at once (ray)


def get_engine(name: str, options: dict | None = None) -> Callable[[EngineJob], None] | None:
    """The runner of engine `name` with its options bound; None for the in-process "local"."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if ENGINES[name] is None:
        if options:
            raise EngineError(f"{', '.join(sorted(options))} only apply to another engine "
                              f"than {name} (e.g. --engine ray)")
        return None
    module_name, install = ENGINES[name]
    try:
        module = importlib.import_module(module_name)
        module.require()
    except ImportError as exc:
        raise EngineError(f"the {name} engine needs {exc.name or 'a missing package'}, which "
                          f"is not installed; install it with: {install}") from None
    return lambda job: module.run(job, **options)
