"""Streaming image pipeline: read -> hash -> decode -> resize, in parallel, bounded.

Decoding uses Pillow because it reads every format users have (JPEG incl.
CMYK and EXIF orientation, PNG incl. 16-bit and palettes, GIF, BMP, WebP,
TIFF) and tells us *why* a file is bad; its decoders release the GIL, so a
thread pool decodes in parallel. Each image is resized in the same thread
by `resize_image` (Pillow/NumPy, no TensorFlow), which gives the pixels of
`resize_for_backbone`, the TensorFlow resize inside exported models.

Memory is bounded by the in-flight window, not by the number of images.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # a 100-megapixel cap stops decompression bombs
Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit before decoding


class DecodeError(ValueError):
    """A file that cannot become an image; the message is the reason stored."""


def jpeg_scale(width: int, height: int, min_side: int) -> int:
    """The largest libjpeg DCT downscale (1, 2, 4 or 8) keeping the short side >= min_side.

    Decoding a 12-megapixel JPEG at 1/8 scale costs a fraction of a full
    decode and loses nothing the resize to ~256 pixels would keep. The export
    computes the same rule in TensorFlow (export.decode_for_export); libjpeg
    gives identical pixels in Pillow and TensorFlow for the same scale.
    """
    short = min(width, height)
    return max([1] + [s for s in (2, 4, 8) if -(-short // s) >= min_side])


def min_decode_side(size: int, crop_fraction: float) -> int:
    """The short side resize_for_backbone scales to: decoding below it loses detail."""
    return math.ceil(size / crop_fraction) if crop_fraction < 1.0 else size


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, upright, transparency on white.

    With min_side, a large JPEG is decoded at the DCT scale jpeg_scale picks.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except Exception as exc:
        raise DecodeError(f"unreadable image header ({exc})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(f"image is {width}x{height} = {width * height} pixels, over the "
                          f"limit of {max_pixels} (raise it with --max-pixels)")
    if width == 0 or height == 0:
        raise DecodeError("image has no pixels")
    if min_side and img.format == "JPEG":
        scale = jpeg_scale(width, height, min_side)
        if scale > 1:  # Pillow picks the scale from the size asked for
            img.draft(None, (width // scale, height // scale))
    try:
        # loads the first frame, honours orientation
        return _to_rgb(ImageOps.exif_transpose(img))
    except DecodeError:
        raise
    except Exception as exc:  # truncated, corrupt data, unsupported variants
        raise DecodeError(f"corrupt or truncated image data ({exc})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "F" and a.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            peak = max(1.0, float(a.max(initial=1.0)))
        gray = np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_for_backbone(image, size: int, crop_fraction: float):
    """(..., H, W, 3) uint8 -> (..., size, size, 3) float32 pixels in [0, 255].

    crop_fraction 1.0 squashes the whole image to size x size; below 1 it
    resizes the shorter side to size / crop_fraction and crops the centre
    (torchvision's Resize(256) + CenterCrop(224) for 0.875). Bilinear,
    antialiased when shrinking (antialiasing an enlargement only costs time).
    Works on one image or a batch of same-sized images, eagerly or inside a
    tf.function or SavedModel, with identical results either way.
    """
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    shape = tf.cast(tf.shape(image)[-3:-1], tf.float32)
    if crop_fraction >= 1.0:
        new = tf.constant([size, size])
        shrinking = tf.reduce_min(shape) > size
    else:
        scale = (size / crop_fraction) / tf.reduce_min(shape)
        new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
        shrinking = scale < 1.0
    image = tf.cond(shrinking,
                    lambda: tf.image.resize(image, new, antialias=True),
                    lambda: tf.image.resize(image, new))
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    return image[..., top:top + size, left:left + size, :]


def resize_image(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """resize_for_backbone on one (H, W, 3) uint8 image, in Pillow and NumPy, without TensorFlow.

    Equal to resize_for_backbone to ~4e-3 on the [0, 255] scale (tests/test_runtime.py
    checks many sizes, shrinking and enlarging): shrinking uses Pillow's
    antialiased bilinear (the same triangle filter TensorFlow's antialias uses)
    in float mode, so no rounding to uint8; enlarging is Pillow's plain bilinear
    with half-pixel centres, as tf.image.resize. Only the centre crop is computed.
    The result may be a read-only view (a grey image is resized once, for all
    three channels).
    """
    h, w = image.shape[:2]
    if crop_fraction >= 1.0:
        new_h, new_w = size, size
        shrinking = min(h, w) > size
    else:
        scale = (size / crop_fraction) / min(h, w)
        new_h, new_w = max(round(h * scale), size), max(round(w * scale), size)
        shrinking = scale < 1.0
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if not shrinking and (new_h < h or new_w < w):
        # an axis shrinks, but TensorFlow antialiases neither (crop_fraction 1 squashing a
        # long side): plain bilinear gathers. Gathers, not a matrix product: BLAS threads
        # fight the inference threads
        lo, hi, lerp = _bilinear_taps(h, new_h, top, size)
        x = image[lo].astype(np.float32)
        x += (image[hi] - x) * lerp[:, None, None]
        lo, hi, lerp = _bilinear_taps(w, new_w, left, size)
        y = x[:, lo]
        y += (x[:, hi] - y) * lerp[None, :, None]
        return y
    # Pillow's bilinear is TensorFlow's: antialiased when shrinking (the triangle filter
    # widened), the plain half-pixel bilinear when enlarging (3x faster than gathers)
    sy, sx = h / new_h, w / new_w
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    grey = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0],
                                                                           image[..., 2])
    channels = 1 if grey else 3  # a grey image (scans, Fashion-MNIST): one plane, not three
    planes = np.ascontiguousarray(image[..., :channels].transpose(2, 0, 1), dtype=np.float32)
    out = np.empty((channels, size, size), np.float32)
    for c in range(channels):  # Pillow resamples float ("F") images one plane at a time
        plane = Image.frombuffer("F", (w, h), planes[c], "raw", "F", 0, 1)
        out[c] = np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return np.broadcast_to(out[0, ..., None], (size, size, 3)) if grey else out.transpose(1, 2, 0)


def _bilinear_taps(n_in: int, n_out: int, start: int, count: int):
    """Source indices and weights of outputs start..start+count, as tf.image.resize
    bilinear (half-pixel centres, edges clamped)."""
    x = (np.arange(start, start + count) + 0.5) * (n_in / n_out) - 0.5
    x0 = np.floor(x)
    lo = np.clip(x0, 0, n_in - 1).astype(np.intp)
    hi = np.clip(x0 + 1, 0, n_in - 1).astype(np.intp)
    return lo, hi, (x - x0).astype(np.float32)


class Resizer:
    """The backbone's resize policy, applied per image as soon as it is decoded.

    Resizing in the decode threads keeps the in-flight window small (224 px
    floats, not photos) and runs in parallel with inference (Pillow releases
    the GIL); it needs no TensorFlow.
    """

    def __init__(self, size: int, crop_fraction: float):
        self.size, self.crop_fraction = size, crop_fraction
        self.min_side = min_decode_side(size, crop_fraction)

    def early(self, image: np.ndarray) -> np.ndarray:
        """A decoded uint8 image -> (S, S, 3) float32 pixels in [0, 255]."""
        return resize_image(image, self.size, self.crop_fraction)

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded uint8 images (or already-resized float ones) -> (B, S, S, 3) float32."""
        out = np.empty((len(images), self.size, self.size, 3), np.float32)
        for i, img in enumerate(images):
            out[i] = img if img.dtype == np.float32 else self.early(img)
        return out


STAGES = ("read", "hash", "decode", "resize")


@dataclass
class Loaded:
    """One file after the pipeline: pixels to embed, known content, or a failure."""

    index: int
    sha256: str | None = None
    image: np.ndarray | None = None  # resized (S, S, 3) float32 pixels, when new
    error: str | None = None  # the reason when the file failed
    seconds: dict = field(default_factory=dict)  # stage -> seconds spent on this file


def load_file(path: str, resizer: Resizer, skip: Callable[[str], bool],
              max_pixels: int = DEFAULT_MAX_PIXELS, index: int = 0) -> Loaded:
    """Read, hash, and (unless `skip(sha)` says it is known) decode and resize."""
    clock = _StageClock()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return Loaded(index, error=f"unreadable file ({exc.strerror or exc})",
                      seconds=clock.lap("read"))
    clock.lap("read")
    sha = hashlib.sha256(data).hexdigest()
    clock.lap("hash")
    if skip(sha):
        return Loaded(index, sha, seconds=clock.seconds)
    try:
        image = decode_image(data, max_pixels, resizer.min_side)
        clock.lap("decode")
        return Loaded(index, sha, image=resizer.early(image), seconds=clock.lap("resize"))
    except DecodeError as exc:
        return Loaded(index, sha, error=str(exc), seconds=clock.lap("decode"))
    except Exception as exc:  # e.g. a resize of a degenerate 1-pixel image
        return Loaded(index, sha, error=f"cannot resize image ({type(exc).__name__}: {exc})",
                      seconds=clock.lap("resize"))


class _StageClock:
    """Seconds per stage of one file, taken as laps of one monotonic clock."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> dict[str, float]:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now
        return self.seconds


def stream(paths: Iterable[str], resizer: Resizer, skip: Callable[[str], bool] = lambda s: False,
           max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
           window: int = 128) -> Iterator[Loaded]:
    """Load files in parallel, yielding results in input order.

    At most `window` files are in flight, so memory does not grow with the
    number of images; decoding runs ahead of the consumer (the prefetch).
    """
    # one thread per core: more only add GIL hand-offs that the inference threads pay for
    # (bench/bench_decode_split.py); raise it to overlap slow storage
    workers = workers or os.cpu_count() or 2
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        for i, path in enumerate(paths):
            pending.append(pool.submit(load_file, path, resizer, skip, max_pixels, i))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
