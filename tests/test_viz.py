"""Attention pictures and plots: the strongest region is red, low attention is darker."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ray_updown.viz.attention import (attention_map, attention_panel, caption_attention_figure,
                                      save_png, vqa_attention_figure)
from ray_updown.viz.plots import plot_bars, plot_curves


def _scene():
    image = np.full((64, 80, 3), 200, dtype=np.uint8)
    boxes = np.array([[0, 0, 20, 20], [40, 30, 70, 60], [10, 10, 30, 30]], dtype=np.float32)
    return image, boxes


def test_attention_map_sums_overlaps_and_normalises():
    image, boxes = _scene()
    heat = attention_map(image.shape[:2], boxes, np.array([0.2, 0.5, 0.3]))
    assert heat.max() == 1.0
    assert np.isclose(heat[15, 15], 1.0)  # covered by boxes 0 and 2: 0.5 of 0.5
    assert np.isclose(heat[5, 5], 0.4) and heat[63, 0] == 0.0


def test_panel_outlines_strongest_in_red_and_darkens_the_rest():
    image, boxes = _scene()
    panel = np.asarray(attention_panel(image, boxes, np.array([0.1, 0.8, 0.1]), "dog"))
    assert tuple(panel[30, 50]) == (230, 20, 20)  # top edge of the strongest box
    assert panel[45, 55].mean() > panel[2, 75].mean()  # inside attended box brighter than outside


def test_figures_and_png(tmp_path):
    image, boxes = _scene()
    att = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    fig = caption_attention_figure(image, boxes, ["a", "dog"], att)
    assert fig.width > 2 * image.shape[1]
    save_png(fig, str(tmp_path / "cap.png"))
    save_png(vqa_attention_figure(image, boxes, "what is it?", "dog", att[0]), str(tmp_path / "q.png"))
    assert Image.open(tmp_path / "cap.png").format == "PNG"
    plot_curves({"xe": [(0, 3.0), (1, 2.0)], "scst": [(1, 2.0), (2, 1.5)]}, "loss", "epoch", "loss",
                str(tmp_path / "c.png"))
    plot_bars({"overall": {"up-down": 70.0, "grid": 60.0}}, "acc", "%", str(tmp_path / "b.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
