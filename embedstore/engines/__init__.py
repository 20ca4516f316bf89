"""Where extraction runs: a registry of engines, chosen by name.

An engine is a module with `require()` (raises ImportError naming what is
missing) and `run(job, **options)`: it embeds every file of the
`ExtractionJob` that the store does not know, adding rows through
`job.writer` via a `Committer` (the commit cadence), and hands every other file
to `job.triage` (failures, unchanged files, renames and copies), so that all
engines write the same store. `extract` composes: sources -> engine -> store.
Engines load lazily: an optional one (Ray) costs nothing until asked for, and
asking without it installed says how to install it. Adding one is its module
and one line in ENGINES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from embedstore.engines.job import Committer, ExtractionJob, JobState

__all__ = ["ENGINES", "Committer", "EngineError", "ExtractionJob", "JobState", "get_engine"]

# name -> (module with require() and run(job, **options), how to install what it needs)
ENGINES: dict[str, tuple[str, str]] = {
    "local": ("embedstore.engines.local", "nothing: it is built in"),
    "ray": ("embedstore.engines.ray", "pip install 'embedstore[ray]'"),
}


class EngineError(ValueError):
    """An engine that cannot run as asked, with what to do about it."""


def get_engine(name: str, options: dict | None = None) -> Callable[[ExtractionJob], None]:
    """The runner of engine `name` with its options bound (unset ones dropped)."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module_name, install = ENGINES[name]
    try:
        module = importlib.import_module(module_name)
        module.require()
    except ImportError as exc:
        raise EngineError(f"the {name} engine needs {exc.name or 'a missing package'}, which "
                          f"is not installed; install it with: {install}") from None
    try:
        import inspect

        inspect.signature(module.run).bind(None, **options)
    except TypeError:
        raise EngineError(f"{', '.join(sorted(options))} only apply to another engine than "
                          f"{name} (e.g. --engine ray)") from None
    return lambda job: module.run(job, **options)
