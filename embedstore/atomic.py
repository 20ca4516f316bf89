"""Directories replaced whole: a reader sees the old one or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_dir(out: str | Path) -> Iterator[Path]:
    """A fresh temp directory beside `out` to fill; it becomes `out` when the block ends.

    The old `out` stays in place until the new one is complete (renamed aside, then
    removed), and a block that raises, Ctrl-C included, leaves `out` as it was and
    removes the temp directory.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
