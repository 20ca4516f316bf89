"""Keep native libraries' chatter off the terminal.

TensorFlow's start-up, its converter, Keras's exporter and the TFLite delegate
print from C++ and Python straight to the process's stdout/stderr ("Saved
artifact at ...", absl and MLIR lines), ignoring every log setting; only an
fd-level redirect stops them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def native_output_silenced(fds: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """`fds` (stdout and stderr by default) point at /dev/null inside the block, for
    native code and Python alike; a no-op when EMBEDSTORE_DEBUG is set."""
    if os.environ.get("EMBEDSTORE_DEBUG"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        with open(os.devnull, "w") as sink, contextlib.ExitStack() as python_streams:
            if 1 in fds:
                python_streams.enter_context(contextlib.redirect_stdout(sink))
            yield
    finally:
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
        for fd in (*saved, devnull):
            os.close(fd)
