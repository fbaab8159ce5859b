"""Pictures of a region-feature store: histograms of boxes per image and of detection
confidences (`ray-updown inspect STORE --png`), counted by features/histograms.py one row
group at a time so that any store fits."""

from __future__ import annotations

import io

import numpy as np

from ray_updown import storage
from ray_updown.features.histograms import store_histograms

FIGURE_SIZE = (10.0, 4.0)
FIGURE_DPI = 100


def plot_store(uri: str, png_uri: str) -> str:
    """Histograms of boxes per image and detection confidences, written as a PNG to `png_uri`."""
    # Figure + Agg canvas, not pyplot: no global backend switch, nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    boxes, conf = store_histograms(uri)
    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    ax_boxes, ax_conf = fig.subplots(1, 2)
    n = sum(boxes.values())
    if n:
        values = np.array(sorted(boxes), dtype=np.int64)
        weights = np.array([boxes[v] for v in values], dtype=np.int64)
        span = int(values[-1] - values[0]) + 1
        # One bar per box count while that stays readable; otherwise 50 equal bins.
        edges = (np.arange(values[0], values[-1] + 2) - 0.5 if span <= 60
                 else np.linspace(values[0], values[-1] + 1, 51))
        ax_boxes.hist(values, bins=edges, weights=weights, color="tab:blue", rwidth=0.9)
    else:
        ax_boxes.text(0.5, 0.5, "no feature rows", ha="center", va="center", transform=ax_boxes.transAxes)
    ax_boxes.set_title(f"boxes per image ({n} images)")
    ax_boxes.set_xlabel("boxes")
    ax_boxes.set_ylabel("images")
    ax_conf.stairs(conf.counts, conf.edges, fill=True, color="tab:orange")
    outside = conf.below + conf.above + conf.nonfinite
    title = f"detection confidence ({int(conf.counts.sum())} boxes"
    ax_conf.set_title(title + (f", {outside} outside [0, 1])" if outside else ")"))
    ax_conf.set_xlabel("object_conf")
    ax_conf.set_ylabel("boxes")
    for ax in (ax_boxes, ax_conf):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(png_uri, buf.getvalue())
    return str(png_uri)
