"""Decoding every format users have, and refusing bad files with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedstore.pipeline import DecodeError, Resizer, decode_image, resize_for_backbone
from embedstore.sources import SourceError, scan
from tests.conftest import photo


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _mean_abs(a, b) -> float:
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("fmt, kw, tolerance", [
    ("PNG", {}, 0), ("BMP", {}, 0), ("TIFF", {}, 0), ("WEBP", {"lossless": True}, 0),
    ("JPEG", {"quality": 95}, 2.0), ("WEBP", {"quality": 90}, 4.0), ("GIF", {}, 8.0),
])
def test_decodes_common_formats_to_their_pixels(fmt, kw, tolerance):
    img = photo(1)
    out = decode_image(_encode(img, fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (64, 96, 3)
    if tolerance == 0:
        assert np.array_equal(out, np.asarray(img))
    else:  # lossy or palette formats: close to the source, far from another image
        assert _mean_abs(out, img) <= tolerance < _mean_abs(out, photo(2))


def test_cmyk_and_grayscale_jpeg():
    rgb = photo(2)
    cmyk = decode_image(_encode(rgb.convert("CMYK"), "JPEG", quality=95))
    gray = decode_image(_encode(rgb.convert("L"), "JPEG", quality=95))
    assert cmyk.shape == gray.shape == (64, 96, 3)
    assert _mean_abs(cmyk, rgb) < 3  # back to the same colours, not inverted ones
    assert np.array_equal(gray[..., 0], gray[..., 2])
    assert _mean_abs(gray[..., 0], rgb.convert("L")) < 2


# what a viewer shows for each EXIF orientation, from the pixels as stored
UPRIGHT = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1),
           8: lambda a: np.rot90(a, 1), 2: lambda a: a[:, ::-1]}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_turns_the_image_upright(orientation):
    stored = np.asarray(photo(3))  # 96 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(_encode(Image.fromarray(stored), "PNG", exif=exif))
    want = UPRIGHT[orientation](stored)
    assert out.shape == want.shape and np.array_equal(out, want)
    if orientation in (6, 8):  # the other rotation would have the same shape: not it
        wrong = UPRIGHT[14 - orientation](stored)
        assert not np.array_equal(out, wrong)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_image(_encode(rgba, "PNG"))
    assert tuple(out[4, 4]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)
    pal = photo(4).convert("P", palette=Image.Palette.ADAPTIVE)
    index = np.asarray(pal)
    out = decode_image(_encode(pal, "PNG", transparency=int(index[0, 0])))
    clear = index == index[0, 0]
    assert out.shape == (64, 96, 3) and (out[clear] == 255).all()
    opaque = np.asarray(pal.convert("RGB"))[~clear]
    assert np.array_equal(out[~clear], opaque)


def test_sixteen_bit_png_keeps_its_range():
    a = (np.linspace(0, 65535, 64 * 96).reshape(64, 96)).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(a), "PNG"))
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0


@pytest.mark.tf
def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    import tensorflow as tf

    rgb16 = np.random.default_rng(0).integers(0, 65535, (20, 30, 3)).astype(np.uint16)
    out = decode_image(tf.io.encode_png(rgb16).numpy())  # Pillow cannot write 48-bit PNG
    assert np.array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_gif_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out[5, 5, 0] > 200 and out[5, 5, 1] < 50


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "unreadable|corrupt|not an image"),
])
def test_bad_bytes_fail_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg_fails():
    data = _encode(photo(5, (400, 300)), "JPEG")
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 3])


def test_pixel_limit_refuses_bombs_before_decoding():
    data = _encode(photo(6), "PNG")
    with pytest.raises(DecodeError, match="over the limit of 1000"):
        decode_image(data, max_pixels=1000)


@pytest.mark.tf
def test_batched_resize_equals_single_resize():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 255, (700, 600, 3), dtype=np.uint8))  # resized early
    r = Resizer(224, 0.875)
    batch = r.batch([r.early(images[0]), *images[1:]])
    single = np.stack([resize_for_backbone(i, 224, 0.875).numpy() for i in images])
    assert batch.shape == (4, 224, 224, 3) and batch.dtype == np.float32
    # Pillow/NumPy against TensorFlow: float32 rounding only (tests/test_runtime.py)
    np.testing.assert_allclose(batch, single, atol=5e-3)


def test_scan_class_tree_is_sorted_and_skips_hidden_and_non_images(tmp_path):
    for rel in ["b/2.png", "b/1.JPG", "a/x/3.webp", "a/.hidden.png", ".git/4.png", "a/notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")  # a cycle: walked once
    src = scan(tmp_path)
    assert src.labelled and src.classes == ["a", "b"]
    assert [r.relpath for r in src.images] == ["a/x/3.webp", "b/1.JPG", "b/2.png"]


def test_scan_flat_folder_and_file_list(tmp_path):
    (tmp_path / "one.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.png").write_bytes(b"x")
    flat = scan(tmp_path)
    assert not flat.labelled and [r.label for r in flat.images] == [None, None]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nsub/two.png\n\none.png\nsub/two.png\n")
    assert [r.relpath for r in scan(lst).images] == ["one.png", "sub/two.png"]
    with pytest.raises(SourceError, match="does not exist"):
        scan(tmp_path / "missing")


def test_jpeg_scale_keeps_the_short_side_above_the_target():
    from embedstore.pipeline import jpeg_scale, min_decode_side

    assert min_decode_side(224, 0.875) == 256 and min_decode_side(224, 1.0) == 224
    assert jpeg_scale(640, 427, 256) == 1
    assert jpeg_scale(1280, 854, 256) == 2
    assert jpeg_scale(4032, 3024, 256) == 8
    # ceil(2040 / 8) = 255 < 256
    assert jpeg_scale(2047, 2047, 256) == 8 and jpeg_scale(2040, 2040, 256) == 4


@pytest.mark.tf
def test_scaled_jpeg_decode_is_pixel_identical_to_tensorflow(china_path):
    """Pillow's DCT-scaled decode equals TensorFlow's accurate one: export relies on it."""
    import tensorflow as tf

    big = io.BytesIO()
    Image.open(china_path).resize((1280, 854)).save(big, "JPEG", quality=92)
    data = big.getvalue()
    ours = decode_image(data, min_side=256)
    assert ours.shape == (427, 640, 3)  # decoded at half size, short side still >= 256
    theirs = tf.io.decode_jpeg(data, channels=3, ratio=2, dct_method="INTEGER_ACCURATE")
    assert np.array_equal(ours, theirs.numpy())
    assert decode_image(data).shape == (854, 1280, 3)  # without a target: full size
