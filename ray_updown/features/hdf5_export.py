"""A feature store written in the bottom-up-attention-vqa HDF5 layout (hdf5.py describes it)
with its id maps: `export_hdf5`.

The export streams: resizable datasets appended in ~16 MiB batches of images. The `.hdf5` is
written under a temporary name and renamed last, after both id maps.
"""

from __future__ import annotations

import json
import pickle
import re
from typing import Any

import numpy as np

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError
from ray_updown.features.hdf5 import BATCH_BYTES, HDF5_LAYOUTS, print_summary, progress_bar, require_h5py
from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord
from ray_updown.features.spatial import spatial_features

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # an output file name, not a path
_CHUNK_BYTES = 1 << 20      # HDF5 chunk size: h5py's guidance is 10 KiB - 1 MiB


def _hdf5_paths(out: str, name: str) -> tuple[str, str, str]:
    """(hdf5, json map, pickle map) URIs for an export to `out`."""
    if out.lower().endswith((".hdf5", ".h5")):
        base = out.rsplit(".", 1)[0]
        return out, base + "_imgid2idx.json", base + "_imgid2idx.pkl"
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"HDF5 name {name!r} must be a plain file name")
    base = storage.join(out, name)
    return base + ".hdf5", base + "_imgid2idx.json", base + "_imgid2idx.pkl"


def vqa_spatial(boxes: np.ndarray, image_w: np.ndarray, image_h: np.ndarray) -> np.ndarray:
    """[n, 4] boxes with per-box image sizes -> [n, 6] x1/w y1/h x2/w y2/h bw/w bh/h (float32)."""
    # spatial.py's first six columns are exactly this encoding; the seventh (area) is dropped.
    return np.ascontiguousarray(spatial_features(boxes[:, None, :], image_w, image_h)[:, 0, :6],
                                dtype=np.float32)


class _H5Appender:
    """Resizable datasets of one HDF5 file, appended to in batches of images."""

    def __init__(self, h5, dim: int, fixed_k: int | None):
        self.dim, self.fixed_k = dim, fixed_k
        lead = () if fixed_k is None else (fixed_k,)
        row_bytes = dim * 4 * (fixed_k or 1)
        rows = max(1, _CHUNK_BYTES // row_bytes)

        def make(name: str, width: int, dtype: str, chunk_rows: int = rows):
            shape = (0,) + lead + (width,)
            return h5.create_dataset(name, shape, dtype, maxshape=(None,) + shape[1:],
                                     chunks=(chunk_rows,) + shape[1:])

        self.features = make("image_features", dim, "f4")
        self.bb = make("image_bb", 4, "f4", max(rows, 1024))
        self.spatial = make("spatial_features", 6, "f4", max(rows, 1024))
        self.pos = None if fixed_k is not None else h5.create_dataset(
            "pos_boxes", (0, 2), "i4", maxshape=(None, 2), chunks=(4096, 2))
        self.size = h5.create_dataset("image_size", (0, 2), "i4", maxshape=(None, 2), chunks=(4096, 2))
        self.images = self.boxes = 0

    def append(self, batch: list[FeatureRecord]) -> None:
        counts = np.array([r.num_boxes for r in batch], np.int64)
        n, nb = len(batch), int(counts.sum())
        feats = np.concatenate([r.features for r in batch]).astype(np.float32)
        boxes = np.concatenate([r.boxes for r in batch]).astype(np.float32)
        w = np.repeat(np.array([r.image_w for r in batch], np.float32), counts)
        h = np.repeat(np.array([r.image_h for r in batch], np.float32), counts)
        spatial = vqa_spatial(boxes, w, h)
        if self.fixed_k is not None:  # images x k x ...: one row per image
            feats, boxes, spatial = (a.reshape(n, self.fixed_k, -1) for a in (feats, boxes, spatial))
            start, stop = self.images, self.images + n
        else:
            start, stop = self.boxes, self.boxes + nb
        if stop > start:
            for ds, values in ((self.features, feats), (self.bb, boxes), (self.spatial, spatial)):
                ds.resize(stop, axis=0)
                ds[start:stop] = values
        if self.pos is not None:
            ends = self.boxes + np.cumsum(counts)
            if ends[-1] > np.iinfo(np.int32).max:
                raise DataError("more than 2^31 boxes do not fit pos_boxes (int32)",
                                record=f"image {batch[-1].image_id}")
            self.pos.resize(self.images + n, axis=0)
            self.pos[self.images:] = np.stack([ends - counts, ends], 1).astype(np.int32)
        self.size.resize(self.images + n, axis=0)
        self.size[self.images:] = np.array([[r.image_w, r.image_h] for r in batch], np.int32)
        self.images += n
        self.boxes += nb


def export_hdf5(store: FeatureStore, out: str, name: str = "features", layout: str = "adaptive") -> dict:
    """The bottom-up-attention-vqa HDF5 file plus its id maps (JSON and pickle).

    The file is written under a temporary name and renamed last, after both maps, so a
    complete-looking `.hdf5` always has its maps; a re-run rewrites all three.
    """
    h5py = require_h5py()
    if layout not in HDF5_LAYOUTS:
        raise ConfigError(f"unknown HDF5 layout {layout!r}; expected one of {list(HDF5_LAYOUTS)}")
    dim = store.feature_dim
    hdf5_uri, json_uri, pkl_uri = _hdf5_paths(out, name)
    meta = store.metadata
    id2idx: dict[Any, int] = {}
    with progress_bar(len(store), f"export hdf5 ({layout})") as bar:
        with storage.atomic_write(hdf5_uri, "w+b") as f:
            with h5py.File(f, "w") as h5:
                h5.attrs["image_id_type"] = meta.get("image_id_type", "int64")
                h5.attrs["store_metadata"] = json.dumps(meta, sort_keys=True)
                h5.attrs["layout"] = layout
                appender: _H5Appender | None = None
                batch: list[FeatureRecord] = []
                batch_bytes = 0
                for record in store.iter_records():
                    if appender is None:
                        appender = _H5Appender(h5, dim, record.num_boxes if layout == "fixed" else None)
                    if layout == "fixed" and record.num_boxes != appender.fixed_k:
                        raise DataError(f"has {record.num_boxes} boxes, but the fixed layout needs "
                                        f"{appender.fixed_k} for every image (export with --layout adaptive)",
                                        file=store.locate(record.image_id)[0],
                                        record=f"image {record.image_id}")
                    id2idx[record.image_id] = len(id2idx)
                    batch.append(record)
                    batch_bytes += record.num_boxes * dim * 4
                    if batch_bytes >= BATCH_BYTES:
                        appender.append(batch)
                        bar.update(len(batch))
                        batch, batch_bytes = [], 0
                if batch:
                    appender.append(batch)
                    bar.update(len(batch))
                total_boxes = appender.boxes if appender is not None else 0
            storage.write_json(json_uri, {str(k): v for k, v in id2idx.items()})
            # Protocol 2 loads in the Python 2 original and in the Python 3 forks alike.
            storage.write_bytes(pkl_uri, pickle.dumps(dict(id2idx), protocol=2))
    print_summary(f"hdf5: {len(id2idx)} images, {total_boxes} boxes ({layout}) -> {hdf5_uri}")
    return {"format": "hdf5", "layout": layout, "store": store.uri, "out": out, "hdf5": hdf5_uri,
            "ids_json": json_uri, "ids_pickle": pkl_uri, "images": len(id2idx), "boxes": total_boxes,
            "feature_dim": dim}
