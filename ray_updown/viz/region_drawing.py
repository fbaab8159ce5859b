"""Regions drawn on an image as in the paper's Figure 2 (regions.py picks the store row, the
image and the names): each box in its own colour with the label "attribute object
0.91/0.78" (object / attribute confidence) on a filled background above it.

    region_label, label_text   the names of a region's ids, and the text drawn
    top_regions, region_colour the regions drawn (best first) and their colours
    draw_regions               the boxes and labels on a copy of the image
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ray_updown.errors import DataError

# At most this share of a picture is under labels; labels beyond it are left out.
MAX_LABEL_COVER = 0.25


# ----------------------------------------------------------------------------- labels
def region_label(object_id: int, attr_id: int, object_vocab: Sequence[str],
                 attribute_vocab: Sequence[str]) -> str:
    """The label of a region's ids: "attribute object" (e.g. "red circle"), the object alone
    when the region has no attribute (id 0) or there are no attribute names. Ids index the
    vocabularies directly (entry 0 = background / no attribute). DataError for an id the
    vocabulary has no name for (a store labelled by another detector)."""
    object_id, attr_id = int(object_id), int(attr_id)
    if not 0 <= object_id < len(object_vocab):
        raise DataError(f"object id {object_id} has no name in the object vocabulary "
                        f"({len(object_vocab)} entries, id 0 = background)")
    name = "background" if object_id == 0 else object_vocab[object_id]
    if attr_id == 0 or not attribute_vocab:
        return name
    if not 0 < attr_id < len(attribute_vocab):
        raise DataError(f"attribute id {attr_id} has no name in the attribute vocabulary "
                        f"({len(attribute_vocab)} entries, id 0 = no attribute)")
    return f"{attribute_vocab[attr_id]} {name}"


def label_text(label: str, object_conf: float, attr_conf: float | None) -> str:
    """The drawn text: the label, then the object / attribute confidences."""
    if attr_conf is None:
        return f"{label}  {float(object_conf):.2f}"
    return f"{label}  {float(object_conf):.2f}/{float(attr_conf):.2f}"


def top_regions(object_conf: np.ndarray, top: int) -> np.ndarray:
    """Row indices of the `top` most confident regions, best first (ties keep store order)."""
    return np.argsort(-np.asarray(object_conf, dtype=np.float64), kind="stable")[:max(0, int(top))]


def region_colour(rank: int) -> tuple[int, int, int]:
    """A saturated colour per rank; golden-ratio steps around the hue circle keep the first
    dozen far apart from each other."""
    hue = (rank * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


# ---------------------------------------------------------------------------- drawing
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _pixel_box(box: Sequence[float], zoom: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A box in the drawn picture's pixels, inside it, with x1 >= x0 and y1 >= y0."""
    x1, y1, x2, y2 = (int(round(float(v) * zoom)) for v in box)
    x1, x2 = sorted((min(max(x1, 0), width - 1), min(max(x2, 0), width - 1)))
    y1, y2 = sorted((min(max(y1, 0), height - 1), min(max(y2, 0), height - 1)))
    return x1, y1, x2, y2


def _label_places(sizes: Sequence[tuple[int, int] | None], boxes: Sequence[tuple[int, int, int, int]],
                  width: int, height: int) -> list[tuple[int, int, int, int] | None]:
    """Where each label goes, best region first: above its box's top-left corner (inside the
    box when there is no room). A label that would overlap one placed before, or put more
    than MAX_LABEL_COVER of the picture under labels, is left out (None), as is one without
    text (size None); its box is drawn."""
    places: list[tuple[int, int, int, int] | None] = []
    covered = 0
    for size, (x1, y1, _, _) in zip(sizes, boxes):
        if size is None:
            places.append(None)
            continue
        lw, lh = size
        lx = min(x1, max(0, width - lw))
        ly = y1 - lh if y1 - lh >= 0 else min(y1, max(0, height - lh))
        rect = (lx, ly, lx + lw, ly + lh)
        overlaps = any(p is not None and rect[0] < p[2] and p[0] < rect[2] and rect[1] < p[3]
                       and p[1] < rect[3] for p in places)
        if overlaps or lw > width or covered + lw * lh > MAX_LABEL_COVER * width * height:
            places.append(None)
            continue
        places.append(rect)
        covered += lw * lh
    return places


def draw_regions(image: Image.Image, boxes: Sequence[Sequence[float]], texts: Sequence[str],
                 colours: Sequence[tuple[int, int, int]], zoom: int = 1
                 ) -> tuple[Image.Image, list[tuple[int, int, int, int] | None]]:
    """A copy of `image` (enlarged `zoom` times) with each box outlined in its colour and its
    text on a filled label of that colour above it (inside the box when there is no room),
    and where each label went (x0, y0, x1, y1; None for a text left out or empty: see
    `_label_places`). Boxes and texts come best first."""
    canvas = image.convert("RGB")
    if zoom != 1:
        canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.BILINEAR)
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(w, h) / 250))
    font = _font(max(10, round(min(w, h) / 36)))
    pad = 2
    placed = [_pixel_box(b, zoom, w, h) for b in boxes]
    bounds = [draw.textbbox((0, 0), text, font=font) for text in texts]
    sizes = [(r - left + 2 * pad, b - top + 2 * pad) if text else None
             for (left, top, r, b), text in zip(bounds, texts)]
    places = _label_places(sizes, placed, w, h)
    # Least confident first, so the best boxes end up on top.
    for (x1, y1, x2, y2), colour in reversed(list(zip(placed, colours))):
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
    for place, (left, top, _, _), text, colour in zip(places, bounds, texts, colours):
        if place is not None:
            draw.rectangle([place[0], place[1], place[2] - 1, place[3] - 1], fill=colour)
            draw.text((place[0] + pad - left, place[1] + pad - top), text,
                      fill=_text_colour(colour), font=font)
    return canvas, places
