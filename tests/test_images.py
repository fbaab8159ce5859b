"""Image decoding for extraction: every odd file becomes the viewer's picture or a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ray_updown.data.images import DecodeLimits, ImageDecodeError, boxes_to_original, decode_image, target_size


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunks(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def with_orientation(img: Image.Image, orientation: int, quality: int = 95) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=quality)


def halves(width: int, height: int, top: tuple, bottom: tuple) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height // 2] = top
    arr[height // 2:] = bottom
    return Image.fromarray(arr)


RED, BLUE = (230, 20, 20), (20, 20, 230)


def close(pixel: np.ndarray, colour: tuple, tol: int = 40) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(colour)).max() <= tol)


def test_rgb_png_is_exact():
    arr = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.pixels.dtype == np.uint8 and out.pixels.flags.c_contiguous
    np.testing.assert_array_equal(out.pixels, arr)
    assert (out.width, out.height, out.scale_x, out.scale_y) == (50, 30, 1.0, 1.0)


def test_grayscale_one_bit_and_palette_become_rgb():
    gray = decode_image(encode(Image.new("L", (8, 6), 100), "PNG")).pixels
    assert gray.shape == (6, 8, 3) and (gray == 100).all()
    bits = decode_image(encode(Image.new("1", (8, 6), 1), "PNG")).pixels
    assert (bits == 255).all()
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (decode_image(encode(pal, "PNG")).pixels == (10, 200, 30)).all()


def test_alpha_is_composited_over_white():
    arr = np.zeros((4, 8, 4), np.uint8)  # transparent black on the left
    arr[:, 4:] = (200, 0, 0, 255)  # opaque red on the right
    out = decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG")).pixels
    assert (out[:, :4] == 255).all() and (out[:, 4:] == (200, 0, 0)).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    pal.paste(1, (2, 0, 4, 4))
    out = decode_image(encode(pal, "PNG", transparency=0)).pixels
    assert (out[:, :2] == 255).all() and (out[:, 2:] == (50, 60, 70)).all()
    la = Image.merge("LA", [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)])
    assert (decode_image(encode(la, "PNG")).pixels == 255).all()


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red in ink
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    assert out.pixels.shape == (24, 32, 3)
    assert close(out.pixels[12, 16], (255, 0, 0), tol=30)


def test_sixteen_bit_images_are_scaled_not_clipped():
    gray16 = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(gray16), "PNG"), DecodeLimits(min_image_side=1)).pixels
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 128])
    # 16-bit RGB (colour type 2): big-endian samples, filter byte 0 per row.
    rgb16 = np.array([[[65535, 0, 257 * 50], [257 * 200, 257 * 10, 0]]], dtype=">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    data = png_chunks(2, 1, 16, 2, zlib.compress(rows))
    out = decode_image(data, DecodeLimits(min_image_side=1)).pixels
    np.testing.assert_array_equal(out[0], [[255, 0, 50], [200, 10, 0]])
    floats = np.full((3, 3), 0.5, np.float32)
    assert (decode_image(encode(Image.fromarray(floats, "F"), "TIFF")).pixels == 128).all()


@pytest.mark.parametrize("orientation, size, left, right, top, bottom", [
    (1, (40, 20), None, None, RED, BLUE),
    (3, (40, 20), None, None, BLUE, RED),   # rotated 180
    (6, (20, 40), BLUE, RED, None, None),   # rotate 90 clockwise to view: top -> right
    (8, (20, 40), RED, BLUE, None, None),   # rotate 90 counter-clockwise: top -> left
])
def test_exif_orientation_is_applied(orientation, size, left, right, top, bottom):
    out = decode_image(with_orientation(halves(40, 20, RED, BLUE), orientation))
    assert (out.width, out.height) == size
    assert out.pixels.shape == (size[1], size[0], 3)
    h, w = out.pixels.shape[:2]
    if left is not None:
        assert close(out.pixels[h // 2, 2], left) and close(out.pixels[h // 2, w - 3], right)
    else:
        assert close(out.pixels[2, w // 2], top) and close(out.pixels[h - 3, w // 2], bottom)


def test_large_rotated_jpeg_is_reduced_to_the_detector_scale():
    stored = halves(1800, 2400, RED, BLUE)  # stored portrait, shown landscape (orientation 6)
    out = decode_image(with_orientation(stored, 6, quality=80))
    assert (out.width, out.height) == (2400, 1800)
    assert out.pixels.shape == (600, 800, 3)  # shorter side 600, as the detector would
    assert out.scale_x == pytest.approx(1 / 3) and out.scale_y == pytest.approx(1 / 3)
    assert close(out.pixels[300, 700], RED) and close(out.pixels[300, 100], BLUE)
    # Without a downscale limit the full image comes back.
    full = decode_image(encode(Image.new("RGB", (1200, 100)), "PNG"), DecodeLimits(0, 0))
    assert full.pixels.shape == (100, 1200, 3)
    assert target_size(1200, 100, 600, 1000) == (1000, 83)
    assert target_size(300, 200, 600, 1000) == (300, 200)  # never enlarged


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert close(decode_image(data).pixels[3, 3], (255, 0, 0), tol=5)


def _truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3),
                                                                    dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 80, 3),
                                                                    dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


@pytest.mark.parametrize("make, words", [
    (lambda: b"", "empty file"),
    (_truncated_jpeg, "truncated"),
    (_truncated_png, "truncated"),
    (lambda: png_chunks(8, 8, 8, 2, b"this is not zlib data"), "corrupt"),
    (lambda: b"<html><body>404 Not Found</body></html>", "not a recognised image"),
    (lambda: encode(Image.new("RGB", (60, 60)), "JPEG")[:30], "header"),
    (lambda: png_chunks(100_000, 100_000, 8, 2, zlib.compress(b"")), "decompression-bomb"),
    (lambda: encode(Image.new("RGB", (1, 1)), "PNG"), "1x1"),
])
def test_bad_files_give_one_line_reasons(make, words):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(make())
    reason = info.value.problem
    assert words in reason and "\n" not in reason


def test_bomb_guard_reads_only_the_header():
    data = png_chunks(4000, 3000, 8, 2, zlib.compress(b""))  # 12 MP claimed, no pixels
    with pytest.raises(ImageDecodeError, match="12000000 pixels exceeds max_image_pixels 1000000"):
        decode_image(data, DecodeLimits(max_image_pixels=1_000_000))
    ok = decode_image(encode(Image.new("RGB", (400, 300)), "PNG"), DecodeLimits(max_image_pixels=120_000))
    assert ok.pixels.shape == (300, 400, 3)


def test_boxes_map_back_to_original_pixels_and_clip():
    boxes = np.array([[10, 20, 100, 60], [-5, -5, 900, 900]], np.float32)
    out = boxes_to_original(boxes, 0.5, 0.25, 300, 200)
    np.testing.assert_allclose(out, [[20, 80, 200, 200], [0, 0, 300, 200]])
    assert out.dtype == np.float32
