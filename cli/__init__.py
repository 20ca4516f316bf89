"""embedstore's command line: parses arguments, calls the library, prints.

No logic lives here. Every library error becomes one line naming the file
and the fix, with a non-zero exit code; nothing prints a traceback unless
EMBEDSTORE_DEBUG=1.

TensorFlow is imported only by the commands that need it (info, compact, an
unchanged re-run... never pay its ~9 s start-up). Wherever it is first
imported, a meta-path hook sends the process's stderr to /dev/null for the
import: its native start-up lines (absl, oneDNN, CUDA probing) ignore every
log setting. After it, TensorFlow's Python logger is set to errors only,
which silences retracing warnings.
"""

from __future__ import annotations

import os
import signal

INTERRUPTED = "embedstore: interrupted; committed work is kept, re-run to resume"


def _interrupted_at_start_up(signum, frame) -> None:
    """Ctrl-C while the command line is still importing: nothing has run, so say so in
    one line and leave (a KeyboardInterrupt here would print an import traceback)."""
    os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(130)


# first of all: main() hands Ctrl-C back to Python once its handlers are in place
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start_up)

import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported anywhere

import click  # noqa: E402

from embedstore.quiet import native_output_silenced  # noqa: E402
from embedstore_cli.app import cli  # noqa: E402


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` through the normal machinery, then runs its import with fd 2
    pointed at /dev/null."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once is enough; and lets find_spec below recurse safely
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            # a Ctrl-C that lands inside TensorFlow's import can be swallowed by its
            # broad excepts (the command then runs on): hold it until the import is done
            interrupted: list[int] = []
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) \
                if main_thread else None
            try:
                with native_output_silenced(fds=(2,)):
                    run(module)
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)
            module.get_logger().setLevel("ERROR")  # retracing warnings and the like
            if interrupted:
                raise KeyboardInterrupt

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def main() -> None:
    """Console entry point: run the click group, turning errors into one line."""
    if not os.environ.get("EMBEDSTORE_DEBUG") and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_at_start_up:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # writers commit on it
        cli.main(standalone_mode=False, prog_name="embedstore")
    except (click.exceptions.Abort, KeyboardInterrupt):
        # Committed work was kept while the exception unwound (writers commit on the way
        # out). Exit now: a half-imported TensorFlow can re-raise SIGINT at interpreter
        # shutdown, which would turn the exit code into -2.
        click.echo(INTERRUPTED, err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # `embedstore predict ... | head`: the reader left, not an error
        sys.stderr.close()
        sys.exit(0)
    except Exception as exc:  # the promise: one line, never a traceback
        if os.environ.get("EMBEDSTORE_DEBUG"):
            raise
        click.echo(f"embedstore: error: {exc}", err=True)
        sys.exit(1)


def dump_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)
