"""Finding images: a class-per-folder tree, a flat folder, or a text file of paths.

Order is deterministic (sorted relative paths), hidden files and folders are
skipped, extensions are matched case-insensitively, and directory symlinks are
followed once (a link back up the tree is not walked again).
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
class Source:
    root: str
    images: list[ImageRef]
    labelled: bool

    @property
    def classes(self) -> list[str]:
        return sorted({i.label for i in self.images if i.label is not None})


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(top: str) -> list[str]:
    """Image files below `top`, recursively, sorted; symlinked folders followed once."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_name(f))
    return sorted(found)


def scan(images: str | Path) -> Source:
    """Read IMAGES as a class tree, a flat folder (unlabelled) or a file list."""
    images = str(images)
    if os.path.isfile(images):
        return _scan_list(images)
    if not os.path.isdir(images):
        raise SourceError(f"{images} does not exist; give a folder of images or a text "
                          "file with one image path per line")
    top_level = [e for e in os.scandir(images) if e.is_file() and is_image_name(e.name)]
    labelled = not top_level
    refs = []
    for path in walk_images(images):
        rel = Path(os.path.relpath(path, images)).as_posix()
        label = rel.split("/", 1)[0] if labelled else None
        refs.append(ImageRef(rel, path, label))
    return Source(os.path.abspath(images), refs, labelled)


def _scan_list(list_file: str) -> Source:
    root = os.path.dirname(os.path.abspath(list_file))
    refs, seen = [], set()
    try:
        lines = Path(list_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{list_file}: cannot read the file list ({exc}); give a UTF-8 "
                          "text file with one image path per line") from None
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = entry if os.path.isabs(entry) else os.path.join(root, entry)
        rel = Path(entry).as_posix() if not os.path.isabs(entry) else entry
        if rel not in seen:
            seen.add(rel)
            refs.append(ImageRef(rel, path, None))
    return Source(root, sorted(refs, key=lambda r: r.relpath), False)
