"""Finding images: a class-per-folder tree, a flat folder, one image, or a text file of paths.

Order is deterministic (sorted relative paths), hidden files and folders are
skipped and extensions are matched case-insensitively. Symlinks are followed
only while they stay inside the folder given (a link back up the tree is
walked once); a link that leads out of it, to `/etc/passwd` or `../..`, is
skipped and reported unless the user opts in with follow_links. Folders that
cannot be listed are reported too, never skipped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp",
                              ".webp", ".tif", ".tiff"})


class SourceError(ValueError):
    """The images argument cannot be read as a tree, folder or list."""


@dataclass(frozen=True)
class ImageRef:
    relpath: str  # as stored: relative to the dataset root (posix separators)
    path: str  # where to read it
    label: str | None  # class name, None when unlabelled


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class Source:
    root: str
    images: list[ImageRef]
    labelled: bool
    skipped: tuple[Skipped, ...] = ()  # links out of the root, unreadable folders

    @property
    def classes(self) -> list[str]:
        return sorted({i.label for i in self.images if i.label is not None})


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


OUTSIDE = "symlink leads outside the images folder; skipped (use --follow-links to read it)"
NOT_UTF8 = ("file name is not valid UTF-8 (shown with its bytes escaped); rename it "
            "(e.g. `convmv -f latin1 -t utf8`) and re-run")


def printable(path: str) -> str:
    """A path as text: bytes of a name that is not valid UTF-8 (Python holds them as
    surrogates) shown escaped, `caf\\xe9.jpg`, so it can be stored, printed and sent as JSON."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_images(top: str, follow_links: bool = False,
                skipped: list[Skipped] | None = None) -> list[str]:
    """Image files below `top`, recursively, sorted.

    Symlinked folders and files are followed while they resolve inside `top`
    (or anywhere with follow_links); what is left out is appended to `skipped`.
    """
    found, seen = [], set()
    root_real = os.path.realpath(top)
    skipped = skipped if skipped is not None else []

    def rel(path: str) -> str:
        return Path(os.path.relpath(path, top)).as_posix()

    def unreadable(err: OSError) -> None:
        skipped.append(Skipped(printable(rel(err.filename)), "unreadable folder "
                               f"({err.strerror or err}); fix its permissions and re-run"))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            if follow_links or _inside(os.path.join(dirpath, d), root_real):
                kept.append(d)
            else:
                skipped.append(Skipped(printable(rel(os.path.join(dirpath, d))), OUTSIDE))
        dirnames[:] = kept
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not is_image_name(f):
                continue
            # a dangling link reads nothing: it fails later as an unreadable file
            if follow_links or not os.path.exists(path) or _inside(path, root_real):
                found.append(path)
            else:
                skipped.append(Skipped(printable(rel(path)), OUTSIDE))
    return sorted(found)


def scan(images: str | Path, follow_links: bool = False, utf8_names: bool = True) -> Source:
    """Read IMAGES as a class tree, a flat folder (unlabelled), one image or a file list.

    With utf8_names (what a store needs: its paths are UTF-8 text), a file whose
    name is not valid UTF-8 is left out and reported under its escaped name;
    without (predict), it is listed like any other.
    """
    images = str(images)
    if os.path.isfile(images):
        if is_image_name(os.path.basename(images)):
            root = os.path.dirname(os.path.abspath(images))
            name = os.path.basename(images)
            if utf8_names and printable(name) != name:
                return Source(root, [], False, (Skipped(printable(name), NOT_UTF8),))
            return Source(root, [ImageRef(name, images, None)], False)
        return _scan_list(images)
    if not os.path.isdir(images):
        raise SourceError(f"{images} does not exist; give a folder of images, one image, or a "
                          "text file with one image path per line")
    try:
        top_level = [e for e in os.scandir(images) if e.is_file() and is_image_name(e.name)]
    except OSError as exc:
        raise SourceError(f"{images}: cannot list the folder ({exc.strerror or exc}); "
                          "fix its permissions") from None
    labelled = not top_level
    refs: list[ImageRef] = []
    skipped: list[Skipped] = []
    for path in walk_images(images, follow_links, skipped):
        rel = Path(os.path.relpath(path, images)).as_posix()
        if utf8_names and printable(rel) != rel:  # a failure, under its escaped name
            skipped.append(Skipped(printable(rel), NOT_UTF8))
            continue
        label = rel.split("/", 1)[0] if labelled else None
        refs.append(ImageRef(rel, path, label))
    if not refs and not skipped:
        raise SourceError(f"{images} holds no image files (looked for "
                          f"{' '.join(sorted(IMAGE_EXTENSIONS))}, in any case, below it)")
    return Source(os.path.abspath(images), refs, labelled, tuple(skipped))


def _scan_list(list_file: str) -> Source:
    root = os.path.dirname(os.path.abspath(list_file))
    refs, seen = [], set()
    try:
        lines = Path(list_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{list_file} is neither an image (by its extension: "
                          f"{' '.join(sorted(IMAGE_EXTENSIONS))}) nor a UTF-8 file list "
                          f"({type(exc).__name__}); give an image, a folder, or a text file "
                          "with one image path per line") from None
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = entry if os.path.isabs(entry) else os.path.join(root, entry)
        rel = Path(entry).as_posix() if not os.path.isabs(entry) else entry
        if rel not in seen:
            seen.add(rel)
            refs.append(ImageRef(rel, path, None))
    if not refs:
        raise SourceError(f"{list_file} lists no image paths; give one path per line")
    return Source(root, sorted(refs, key=lambda r: r.relpath), False)
