"""Training curves and bar charts for the report, as PNGs (matplotlib, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ray_updown import storage  # noqa: E402


def plot_curves(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
                ylabel: str, uri: str) -> None:
    """One line per named series of (x, y) points, saved as a PNG at `uri`."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    _save(fig, uri)


def plot_bars(groups: dict[str, dict[str, float]], title: str, ylabel: str, uri: str,
              rotate_labels: bool = False) -> None:
    """Grouped bars: {group: {bar: value}} (e.g. {"overall": {"up-down": 71.2, "grid 7x7": 60.1}});
    long group names are turned (`rotate_labels`); a zero line shows when a value is negative."""
    fig, ax = plt.subplots(figsize=(8, 4.2 if rotate_labels else 3.2), dpi=110)
    bars = list(dict.fromkeys(b for g in groups.values() for b in g))  # the tables' row order
    width = 0.8 / max(1, len(bars))
    for j, bar in enumerate(bars):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [groups[g].get(bar, 0.0) for g in groups], width=width, label=bar)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups),
                  rotation=20 if rotate_labels else 0, ha="right" if rotate_labels else "center",
                  fontsize=8 if rotate_labels else None)
    if any(v < 0 for g in groups.values() for v in g.values()):
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over a bar
    _save(fig, uri)


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
