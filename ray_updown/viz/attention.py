"""Attention pictures in the style of the paper's Figures 5-7.

Each panel shows the image darkened where attention is low: a pixel's brightness follows the
summed attention weight of the regions covering it (normalised to the strongest), the regions
are outlined with a line width that grows with their weight, and the strongest region is
outlined in red. A caption gets one panel per generated word; a question gets one panel with
the question and the answer underneath.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ray_updown import storage

_PANEL_LABEL_HEIGHT = 18


def attention_map(image_hw: tuple[int, int], boxes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-pixel attention in [0, 1]: the sum of the weights of the boxes covering each pixel."""
    h, w = image_hw
    heat = np.zeros((h, w), dtype=np.float32)
    for (x1, y1, x2, y2), a in zip(np.asarray(boxes, dtype=np.float32), np.asarray(weights, dtype=np.float32)):
        c1, r1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        c2, r2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if c2 > c1 and r2 > r1:
            heat[r1:r2, c1:c2] += a
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def attention_panel(image: np.ndarray, boxes: np.ndarray, weights: np.ndarray, label: str,
                    top_k: int = 5, floor: float = 0.25) -> Image.Image:
    """One picture: the image shaded by attention, the top-k regions outlined, the best in red."""
    image = np.asarray(image, dtype=np.uint8)
    heat = attention_map(image.shape[:2], boxes, weights)
    shade = floor + (1.0 - floor) * heat[..., None]
    shaded = (image.astype(np.float32) * shade).clip(0, 255).astype(np.uint8)
    h, w = shaded.shape[:2]
    canvas = Image.new("RGB", (w, h + _PANEL_LABEL_HEIGHT), "white")
    canvas.paste(Image.fromarray(shaded), (0, 0))
    draw = ImageDraw.Draw(canvas)
    weights = np.asarray(weights, dtype=np.float32)
    if len(weights):
        order = np.argsort(-weights)[:top_k]
        top = float(weights[order[0]]) or 1.0
        for rank, i in reversed(list(enumerate(order))):
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            width = 1 + int(round(2 * float(weights[i]) / top))
            colour = (230, 20, 20) if rank == 0 else (255, 255, 255)
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=width)
    draw.text((3, h + 3), label, fill=(0, 0, 0), font=ImageFont.load_default())
    return canvas


def caption_attention_figure(image: np.ndarray, boxes: np.ndarray, words: list[str],
                             attention: np.ndarray, columns: int = 6) -> Image.Image:
    """Figure 5/7 style: a panel per generated word; `attention` is [len(words), k]."""
    panels = [attention_panel(image, boxes, attention[t], word) for t, word in enumerate(words)]
    return _grid(panels, columns)


def vqa_attention_figure(image: np.ndarray, boxes: np.ndarray, question: str, answer: str,
                         attention: np.ndarray) -> Image.Image:
    """Figure 6 style: the image shaded by the question's attention, with Q and A beneath."""
    panel = attention_panel(image, boxes, attention, f"A: {answer}")
    canvas = Image.new("RGB", (max(panel.width, 8 * len(question)), panel.height + _PANEL_LABEL_HEIGHT), "white")
    canvas.paste(panel, (0, 0))
    ImageDraw.Draw(canvas).text((3, panel.height + 2), f"Q: {question}", fill=(0, 0, 0),
                                font=ImageFont.load_default())
    return canvas


def _grid(panels: list[Image.Image], columns: int) -> Image.Image:
    if not panels:
        raise ValueError("no panels to draw")
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    pw, ph = max(p.width for p in panels), max(p.height for p in panels)
    pad = 4
    canvas = Image.new("RGB", (columns * (pw + pad) + pad, rows * (ph + pad) + pad), "white")
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        canvas.paste(p, (pad + c * (pw + pad), pad + r * (ph + pad)))
    return canvas


def save_png(picture: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
