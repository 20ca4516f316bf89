"""Keep native libraries' chatter off the terminal.

TensorFlow's converter and Keras's exporter print from C++ and Python
straight to the process's stdout/stderr ("Saved artifact at ...", MLIR
warnings), ignoring every log setting; only an fd-level redirect stops them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """fds 1 and 2 point at /dev/null inside the block (unless EMBEDSTORE_DEBUG is set)."""
    if os.environ.get("EMBEDSTORE_DEBUG"):
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(open(os.devnull, "w")) as quiet:
            try:
                yield
            finally:
                quiet.close()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
