"""Robust image decoding for extraction: encoded bytes -> HxWx3 uint8 RGB numpy, or a reason.

Every file a crawl can hold either decodes to the picture a viewer shows or fails with a
one-line reason; nothing raises out of `decode_image` except `ImageDecodeError`:

- EXIF orientation is applied (a phone photo stored sideways comes out upright), so image_w,
  image_h and boxes are in the frame a viewer shows.
- Grayscale, 1-bit, palette, CMYK (including Adobe's inverted CMYK JPEGs), YCbCr, LAB and HSV
  become RGB; alpha (RGBA, LA, PA, palette transparency) is composited over white, the way a
  page with a white background shows it, instead of exposing whatever colour hides under
  transparent pixels.
- 16-bit and 32-bit integer images are scaled to 8 bits (Pillow's own conversion clips them);
  float images are clipped to [0, 255] (or scaled from [0, 1]).
- Decompression-bomb guard: the pixel count is read from the header and checked against
  `max_image_pixels` before any pixel is decoded. That limit decides, not Pillow's own
  (about 179 MP), and the reason quotes it.
- Extreme aspect ratios: an image longer than `max_aspect_ratio` times its width (or wider
  than that times its height; 1000 by default) is refused with its size. Under that limit
  every image is accepted: the detector scales the long side to its cap and pads a short side
  that ends up thinner than its minimum (detector/transform.py).
- Very large images are decoded reduced (JPEG DCT scaling) and downscaled to the size the
  detector would resize them to anyway (`target_size`), so blocks stay small; the original
  size is kept so boxes map back to original pixels (`boxes_to_original`).
- Animated and multi-page files give their first frame.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ray_updown.errors import DataError

# EXIF orientations 5-8 swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Pillow's bomb limit is a module global; it is lifted only to read a refused file's header.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(DataError):
    """An image that cannot become pixels; `problem` is the one-line reason."""


@dataclass(frozen=True)
class DecodeLimits:
    """What the decode stage accepts and how far it shrinks.

    min_side / max_side: the detector's input scale (shorter side, longer-side cap; 600/1000 in
    the paper). Larger images are downscaled to exactly that scale here, never below it, so
    the detector's own resize is then ~1.0. 0 disables the downscale.
    max_image_pixels: decompression-bomb guard (width * height from the header).
    min_image_side: smaller images are rejected (a 1x1 image has no regions to speak of).
    max_aspect_ratio: images whose longer side exceeds this many times the shorter are
    rejected. 1000 (the paper's longer-side cap in pixels) is where the shorter side would
    shrink below one pixel at the detector's scale: a line, not a picture. 0 disables.
    """

    min_side: int = 600
    max_side: int = 1000
    max_image_pixels: int = 100_000_000
    min_image_side: int = 2
    max_aspect_ratio: float = 1000.0


@dataclass
class DecodedImage:
    """Decoded pixels plus the original (viewer-frame) size they were reduced from."""

    pixels: np.ndarray  # (h, w, 3) uint8 RGB, possibly downscaled
    width: int  # original width after EXIF rotation
    height: int

    @property
    def scale_x(self) -> float:
        return self.pixels.shape[1] / self.width

    @property
    def scale_y(self) -> float:
        return self.pixels.shape[0] / self.height


def target_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int]:
    """(w, h) after the detector's test scale (shorter side min_side, longer side <= max_side),
    but never enlarged: small images are left for the detector to upsample."""
    if min_side <= 0 or max_side <= 0:
        return width, height
    short, long = min(width, height), max(width, height)
    scale = min_side / short
    if round(scale * long) > max_side:
        scale = max_side / long
    if scale >= 1.0:
        return width, height
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def _upright(img: Image.Image, stored_w: int, stored_h: int) -> tuple[Image.Image, int, int]:
    """Apply the EXIF orientation of a loaded image; (image, original w, h as displayed)."""
    try:
        orientation = int(img.getexif().get(0x0112, 1))
        if orientation in range(2, 9):
            img = ImageOps.exif_transpose(img)
    except Exception:  # corrupt EXIF must not lose the picture: show it as stored
        orientation = 1
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return img, stored_h, stored_w
    return img, stored_w, stored_h


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB as a viewer would show it (see the module docstring)."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # palette / key-colour transparency becomes alpha
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return np.clip(np.round(arr), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    top = int(arr.max()) if arr.size else 0
    if arr.size and int(arr.min()) >= 0 and top <= 255:
        return arr.astype(np.uint8)  # an 8-bit image stored in a wide mode
    if top <= 65535:  # 16-bit data (also 16-bit PNGs that Pillow opens as mode I)
        return (np.clip(arr, 0, 65535) // 257).astype(np.uint8)
    lo = int(arr.min())
    return ((arr - lo) * 255 // max(top - lo, 1)).astype(np.uint8)


def _open(data: bytes) -> Image.Image:
    """Image.open, header only. Our `max_image_pixels` guard decides, so a file over Pillow's
    own bomb limit is opened again with that limit lifted, just to read its size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            pass
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Bytes of any Pillow-readable format -> `DecodedImage`; ImageDecodeError with the reason."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = _open(data)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes, "
                               f"starting {data[:8]!r})") from None
    except Exception as exc:  # corrupt headers raise all sorts of things inside Pillow
        raise ImageDecodeError(f"unreadable image header ({type(exc).__name__}: {exc})") from None

    stored_w, stored_h = img.size
    if stored_w * stored_h > limits.max_image_pixels:
        raise ImageDecodeError(f"decompression-bomb guard: {stored_w}x{stored_h} = "
                               f"{stored_w * stored_h} pixels exceeds max_image_pixels "
                               f"{limits.max_image_pixels}")
    if min(stored_w, stored_h) < limits.min_image_side:
        raise ImageDecodeError(f"image is {stored_w}x{stored_h} pixels; the smallest accepted "
                               f"side is {limits.min_image_side}")
    ratio = max(stored_w, stored_h) / max(min(stored_w, stored_h), 1)
    if limits.max_aspect_ratio > 0 and ratio > limits.max_aspect_ratio:
        raise ImageDecodeError(f"image is {stored_w}x{stored_h} pixels: aspect ratio 1:{ratio:.6g} "
                               f"is beyond max_aspect_ratio 1:{limits.max_aspect_ratio:g}")
    try:
        if img.format in ("JPEG", "MPO"):
            # DCT-domain reduction: decodes a 1/2, 1/4 or 1/8 image no smaller than the
            # detector's scale (the scale does not depend on the orientation).
            want = target_size(stored_w, stored_h, limits.min_side, limits.max_side)
            if want != (stored_w, stored_h):
                img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else None, want)
        img.load()
        # Only now: Pillow reads a PNG's EXIF by loading, which would hide load errors.
        img, width, height = _upright(img, stored_w, stored_h)
        img = _to_rgb(img)
        want_w, want_h = target_size(width, height, limits.min_side, limits.max_side)
        if img.size != (want_w, want_h):
            # Pillow's bilinear filter widens its support when shrinking (antialiased).
            img = img.resize((want_w, want_h), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as exc:  # truncated streams, bad Huffman tables, zlib errors, ...
        raise ImageDecodeError(f"corrupt or truncated image data ({type(exc).__name__}: "
                               f"{exc})") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"decoded to shape {pixels.shape}, expected (h, w, 3)")
    return DecodedImage(np.ascontiguousarray(pixels), width=width, height=height)


def boxes_to_original(boxes: np.ndarray, scale_x: float, scale_y: float, width: int,
                      height: int) -> np.ndarray:
    """Boxes in decoded (possibly downscaled) pixels -> original pixels, clipped to the image."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    if scale_x != 1.0 or scale_y != 1.0:
        out[:, [0, 2]] /= np.float32(scale_x)
        out[:, [1, 3]] /= np.float32(scale_y)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out
