"""embedstore's command line: parses arguments, calls the library, prints.

No logic lives here. Every library error becomes one line naming the file
and the fix, with a non-zero exit code; nothing prints a traceback unless
EMBEDSTORE_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported anywhere

import click  # noqa: E402

from embedstore_cli.app import cli  # noqa: E402


def _import_tensorflow_quietly() -> None:
    """TensorFlow's native start-up lines (absl, oneDNN, CUDA probing) ignore every
    log setting; send the process's stderr to /dev/null while it loads."""
    if os.environ.get("EMBEDSTORE_DEBUG"):
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main() -> None:
    """Console entry point: run the click group, turning errors into one line."""
    args = sys.argv[1:]
    if args and not {"-h", "--help", "--version"} & set(args):
        _import_tensorflow_quietly()
    try:
        cli.main(standalone_mode=False, prog_name="embedstore")
    except click.exceptions.Abort:
        click.echo("embedstore: interrupted; committed work is kept, re-run to resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("embedstore: interrupted; committed work is kept, re-run to resume", err=True)
        sys.exit(130)
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
