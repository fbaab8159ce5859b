"""Histograms of a region-feature store for `ray-updown inspect STORE --png`
(viz/store_plots.py): boxes per image and the detection confidence of every box.

Memory stays bounded however large the store: the `num_boxes` and `object_conf` columns are
read one row group at a time, and confidences go into fixed bins (`Histogram`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ray_updown import storage
from ray_updown.features.inspect import numbered_shards, store_files
from ray_updown.features.parts import check_columns, open_part, read_row_group
from ray_updown.features.schema import FEATURES_DIR

CONFIDENCE_BINS = 50


class Histogram:
    """Counts in fixed bins over [lo, hi], accumulated chunk by chunk: memory is the bins only.

    The last bin includes `hi` (as numpy.histogram). Values outside the range and NaN/inf are
    counted separately rather than dropped silently.
    """

    def __init__(self, lo: float = 0.0, hi: float = 1.0, bins: int = CONFIDENCE_BINS):
        if not hi > lo or bins < 1:
            raise ValueError(f"need lo < hi and bins >= 1, got {lo}, {hi}, {bins}")
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.below = self.above = self.nonfinite = 0

    def add(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(v)
        self.nonfinite += int(v.size - finite.sum())
        v = v[finite]
        lo, hi = self.edges[0], self.edges[-1]
        self.below += int((v < lo).sum())
        self.above += int((v > hi).sum())
        self.counts += np.histogram(v[(v >= lo) & (v <= hi)], bins=self.edges)[0]

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.below + self.above + self.nonfinite


def store_histograms(uri: str, bins: int = CONFIDENCE_BINS) -> tuple[Counter, Histogram]:
    """{num_boxes: images} and the object_conf histogram of every box, one row group at a time."""
    store = str(uri).rstrip("/") or str(uri)
    files = store_files(store)
    features, _ = numbered_shards(files, FEATURES_DIR)
    boxes: Counter = Counter()
    conf = Histogram(0.0, 1.0, bins)
    for _, (name, _) in sorted(features.items()):
        file_uri = storage.join(store, FEATURES_DIR, name)
        with open_part(file_uri) as pf:
            check_columns(pf, ("num_boxes", "object_conf"), file_uri)
            for rg in range(pf.num_row_groups):
                table = read_row_group(pf, rg, ["num_boxes", "object_conf"], file_uri)
                values, counts = np.unique(table.column("num_boxes").to_numpy(), return_counts=True)
                boxes.update(dict(zip(values.tolist(), counts.tolist())))
                # list_flatten honours the offsets (a row group's lists may share a buffer).
                conf.add(pc.list_flatten(table.column("object_conf")).to_numpy())
    return boxes, conf
