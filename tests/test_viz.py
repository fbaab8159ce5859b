"""Attention pictures and plots: the strongest region is red, low attention is darker, one
panel per word, and the PNGs hold what was drawn."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from ray_updown.viz.attention import (
    attention_map,
    attention_panel,
    caption_attention_figure,
    save_png,
    vqa_attention_figure,
)
from ray_updown.viz.plots import plot_bars, plot_curves

RED = (230, 20, 20)
LABEL_H = 18  # the white strip under each panel for its word
PAD = 4  # between panels of a caption figure


def _scene():
    image = np.full((64, 80, 3), 200, dtype=np.uint8)
    boxes = np.array([[0, 0, 20, 20], [40, 30, 70, 60], [10, 10, 30, 30]], dtype=np.float32)
    return image, boxes


def _is(panel: np.ndarray, colour) -> np.ndarray:
    return np.all(panel[..., :3] == np.asarray(colour, dtype=panel.dtype), axis=-1)


def _band(h: int, w: int, box, width: int) -> np.ndarray:
    """The pixels of PIL's rectangle outline [x1, y1, x2 - 1, y2 - 1] of the given width."""
    x1, y1, x2, y2 = (int(v) for v in box)
    outer = np.zeros((h, w), bool)
    outer[y1:y2, x1:x2] = True
    inner = np.zeros((h, w), bool)
    inner[y1 + width:y2 - width, x1 + width:x2 - width] = True
    return outer & ~inner


def test_attention_map_sums_overlaps_and_normalises():
    image, boxes = _scene()
    heat = attention_map(image.shape[:2], boxes, np.array([0.2, 0.5, 0.3]))
    assert heat.shape == (64, 80) and heat.max() == 1.0
    assert np.isclose(heat[15, 15], 1.0)  # covered by boxes 0 and 2: 0.5 of 0.5
    assert np.isclose(heat[5, 5], 0.4) and heat[63, 0] == 0.0
    assert np.isclose(heat[45, 55], 1.0) and np.isclose(heat[25, 25], 0.6)
    # Boxes past the border are clipped; no attention at all leaves the map at zero.
    clipped = attention_map((10, 10), np.array([[-5, -5, 4, 20]], np.float32), np.array([1.0]))
    assert clipped[:, :4].min() == 1.0 and clipped[:, 4:].max() == 0.0
    assert attention_map((10, 10), boxes, np.zeros(3)).max() == 0.0


def test_panel_shades_each_pixel_by_its_attention():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (64, 80, 3), dtype=np.uint8)
    _, boxes = _scene()
    weights = np.array([0.1, 0.8, 0.1])
    panel = np.asarray(attention_panel(image, boxes, weights, "dog"))
    assert panel.shape == (64 + LABEL_H, 80, 3)
    heat = attention_map(image.shape[:2], boxes, weights)
    expected = image.astype(np.float32) * (0.25 + 0.75 * heat[..., None])
    picture = panel[:64].astype(np.float32)
    outlines = _is(panel[:64], RED) | _is(panel[:64], (255, 255, 255))
    assert outlines.sum() < 0.2 * outlines.size
    np.testing.assert_allclose(picture[~outlines], expected[~outlines], atol=1.0)
    # Concretely: the attended box keeps its pixels, unattended background is at 25 %.
    assert np.array_equal(panel[45, 55], image[45, 55])
    np.testing.assert_allclose(panel[2, 75], image[2, 75] * 0.25, atol=1.0)
    # Two attention vectors, two pictures.
    other = np.asarray(attention_panel(image, boxes, np.array([0.8, 0.1, 0.1]), "dog"))
    assert not np.array_equal(panel, other)


@pytest.mark.parametrize("strongest", [0, 1, 2])
def test_panel_outlines_strongest_in_red_and_the_rest_in_white(strongest):
    image, boxes = _scene()
    weights = np.full(3, 0.1)
    weights[strongest] = 0.8
    panel = np.asarray(attention_panel(image, boxes, weights, "dog"))[:64]
    # The red pixels are exactly the strongest box's outline, 3 px wide (1 + 2 * w / top).
    red_band = _band(64, 80, boxes[strongest], 3)
    red = _is(panel, RED)
    assert red.sum() > 0
    # Weaker outlines are drawn first, so the red band is complete and nothing else is red.
    np.testing.assert_array_equal(red, red_band)
    # The others are outlined in white, 1 px wide (1 + round(2 * 0.1 / 0.8)), outside the red.
    white = _is(panel, (255, 255, 255))
    white_bands = np.zeros_like(white)
    for i in range(3):
        if i != strongest:
            white_bands |= _band(64, 80, boxes[i], 1)
    np.testing.assert_array_equal(white, white_bands & ~red_band)
    # Only the top_k regions are outlined.
    top1 = np.asarray(attention_panel(image, boxes, weights, "dog", top_k=1))[:64]
    assert not _is(top1, (255, 255, 255)).any()
    np.testing.assert_array_equal(_is(top1, RED), red_band)


def test_panel_writes_its_label_under_the_image():
    image, boxes = _scene()
    weights = np.array([0.1, 0.8, 0.1])
    labelled = np.asarray(attention_panel(image, boxes, weights, "dog"))
    blank = np.asarray(attention_panel(image, boxes, weights, ""))
    assert (labelled[64:].mean(axis=-1) < 128).sum() > 10  # dark glyphs on white
    assert (blank[64:] == 255).all()
    assert np.array_equal(labelled[:64], blank[:64])


def _panel_at(figure: np.ndarray, i: int, columns: int, pw: int = 80, ph: int = 64 + LABEL_H):
    r, c = divmod(i, columns)
    top, left = PAD + r * (ph + PAD), PAD + c * (pw + PAD)
    return figure[top:top + ph, left:left + pw]


def test_caption_figure_has_one_panel_per_word_in_order():
    image, boxes = _scene()
    words = ["a", "dog", "on", "a", "red", "mat", "near", "it"]
    attention = np.full((len(words), 3), 0.1)
    strongest = [0, 1, 2, 0, 1, 2, 0, 1]
    attention[np.arange(len(words)), strongest] = 0.8
    figure = caption_attention_figure(image, boxes, words, attention, columns=6)
    # 8 panels in rows of 6: two rows, six columns.
    assert figure.size == (PAD + 6 * (80 + PAD), PAD + 2 * (64 + LABEL_H + PAD))
    pixels = np.asarray(figure)
    for i, (word, best) in enumerate(zip(words, strongest)):
        panel = _panel_at(pixels, i, 6)
        np.testing.assert_array_equal(panel, np.asarray(attention_panel(image, boxes, attention[i], word)))
        red = np.nonzero(_is(panel[:64], RED))
        x1, y1, x2, y2 = (int(v) for v in boxes[best])
        assert (red[1].min(), red[0].min(), red[1].max(), red[0].max()) == (x1, y1, x2 - 1, y2 - 1)
    # The unused cells of the last row stay white.
    assert (_panel_at(pixels, 8, 6) == 255).all() and (_panel_at(pixels, 11, 6) == 255).all()
    # Fewer words than columns: one row of exactly that many panels.
    two = caption_attention_figure(image, boxes, words[:2], attention[:2], columns=6)
    assert two.size == (PAD + 2 * (80 + PAD), PAD + 64 + LABEL_H + PAD)
    with pytest.raises(ValueError):
        caption_attention_figure(image, boxes, [], attention[:0])


def test_vqa_figure_is_the_panel_with_the_question_beneath():
    image, boxes = _scene()
    weights = np.array([0.1, 0.8, 0.1])
    short = vqa_attention_figure(image, boxes, "what?", "dog", weights)
    panel = np.asarray(attention_panel(image, boxes, weights, "A: dog"))
    pixels = np.asarray(short)
    assert short.size == (80, 64 + 2 * LABEL_H)
    np.testing.assert_array_equal(pixels[:64 + LABEL_H], panel)  # panel as drawn, top-left
    assert (pixels[64 + LABEL_H:].mean(axis=-1) < 128).sum() > 10  # the question is written
    long_question = "what colour is the big square on the left?"
    wide = vqa_attention_figure(image, boxes, long_question, "dog", weights)
    assert wide.size == (8 * len(long_question), 64 + 2 * LABEL_H)
    np.testing.assert_array_equal(np.asarray(wide)[:64 + LABEL_H, :80], panel)
    assert (np.asarray(wide)[:64 + LABEL_H, 80:] == 255).all()
    other = vqa_attention_figure(image, boxes, "what?", "dog", np.array([0.8, 0.1, 0.1]))
    assert not np.array_equal(np.asarray(other), pixels)


def test_save_png_keeps_every_pixel(tmp_path):
    image, boxes = _scene()
    att = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    fig = caption_attention_figure(image, boxes, ["a", "dog"], att)
    save_png(fig, str(tmp_path / "cap.png"))
    with Image.open(tmp_path / "cap.png") as loaded:
        assert loaded.format == "PNG" and loaded.size == fig.size
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), np.asarray(fig))


def _cycle(i: int) -> tuple[int, int, int]:
    colour = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][i]
    return tuple(int(round(255 * v)) for v in matplotlib.colors.to_rgb(colour))


def _mask(pixels: np.ndarray, colour) -> np.ndarray:
    return np.all(np.abs(pixels[..., :3].astype(int) - np.asarray(colour)) <= 2, axis=-1)


def _load(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_plot_curves_draws_each_series_where_its_points_are(tmp_path):
    rising, falling = tmp_path / "up.png", tmp_path / "down.png"
    plot_curves({"xe": [(0, 0.0), (1, 1.0), (2, 2.0)]}, "loss", "epoch", "loss", str(rising))
    plot_curves({"xe": [(0, 2.0), (1, 1.0), (2, 0.0)]}, "loss", "epoch", "loss", str(falling))
    up, down = _load(rising), _load(falling)
    assert up.shape == (352, 550, 3)  # figsize (5, 3.2) at 110 dpi
    for pixels, sign in ((up, -1), (down, 1)):  # image rows grow downwards
        ys, xs = np.nonzero(_mask(pixels, _cycle(0)))
        assert len(xs) > 100
        assert sign * np.corrcoef(xs, ys)[0, 1] > 0.95
    # Two series: both colours drawn (plus a legend); the picture differs from one series.
    both = tmp_path / "both.png"
    plot_curves({"xe": [(0, 3.0), (1, 2.0)], "scst": [(1, 2.0), (2, 1.5)]}, "loss", "epoch",
                "loss", str(both))
    pixels = _load(both)
    assert _mask(pixels, _cycle(0)).sum() > 50 and _mask(pixels, _cycle(1)).sum() > 50
    assert _mask(up, _cycle(1)).sum() == 0


def test_plot_bars_heights_follow_the_values(tmp_path):
    def tallest(path, groups):
        plot_bars(groups, "acc", "%", str(path))
        pixels = _load(path)
        assert pixels.shape == (352, 880, 3)  # figsize (8, 3.2) at 110 dpi
        return [int(_mask(pixels, _cycle(j)).sum(axis=0).max()) for j in range(2)]

    first, second = tallest(tmp_path / "b.png", {"overall": {"up-down": 70.0, "grid": 60.0}})
    assert first / second == pytest.approx(70 / 60, rel=0.03)  # bars start at 0
    first, second = tallest(tmp_path / "c.png", {"overall": {"up-down": 30.0, "grid": 60.0}})
    assert first / second == pytest.approx(30 / 60, rel=0.03)
    # A bar missing from a group is drawn as 0: the first colour has two bars, the second one.
    plot_bars({"overall": {"up-down": 70.0, "grid": 60.0}, "number": {"up-down": 50.0}},
              "acc", "%", str(tmp_path / "d.png"))
    pixels = _load(tmp_path / "d.png")
    bar_columns = [int((_mask(pixels, _cycle(j)).sum(axis=0) > 30).sum()) for j in range(2)]
    assert bar_columns[1] > 10 and bar_columns[0] / bar_columns[1] == pytest.approx(2, rel=0.1)
