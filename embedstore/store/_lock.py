"""The one-writer lock: an flock on `STORE/lock`, inside the store's directory.

Every path to a store (a symlink, a second mount, a relative name) reaches
the same directory and so the same lock file. (A directory cannot be hard
linked; a format-2 store file, which can, is upgraded under an flock on the
file itself, see writer.upgrade_legacy.)

The lock file exists only while a writer runs (or after one was killed): a
clean release unlinks it *while still holding the flock*. A second process
that opened the old file just before the unlink may then win the flock on an
inode nobody else will ever see, so after locking we check that the path
still names the inode we hold, and retry otherwise. Two writers therefore
never both believe they hold the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from embedstore.store._format import StoreError
from embedstore.store._layout import layout


def lock_path(store: str | Path) -> Path:
    return layout(store).lock


def acquire_lock(path: Path, store: str | Path) -> int:
    """Take the writer lock file `path` of STORE (non-blocking); a StoreError if another
    writer has it."""
    while True:
        try:  # never through a symlink: a crafted store's `lock -> /etc/passwd` is not opened
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreError(f"{path}: cannot open the store's lock file ({exc.strerror}); "
                             "it must be a plain file inside the store: remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"{store} is being written by another process (pid {holder}); "
                             "wait for it to finish (readers can keep reading)") from None
        if names_inode(path, fd):
            break
        os.close(fd)  # we locked a file a releasing writer had just unlinked: try again
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def release_lock(fd: int, path: Path) -> None:
    """Unlink the lock file, then drop the flock (in that order: see the module doc)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def names_inode(path: Path, fd: int) -> bool:
    """Whether `path` still names the file `fd` holds open."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
