"""Exports of a region-feature store to the layouts other trainers read, and the HDF5 import.

self-critical (ruotianluo/self-critical.pytorch, scripts/make_bu_data.py; its dataloader reads
``np.load(<att>/<id>.npz)['feat']``, ``np.load(<fc>/<id>.npy)``, ``np.load(<box>/<id>.npy)``)::

    <out>/cocobu_att/<image_id>.npz   np.savez_compressed, key "feat": k x D float32
    <out>/cocobu_fc/<image_id>.npy    mean over the regions: D float32
    <out>/cocobu_box/<image_id>.npy   k x 4 float32 boxes x1 y1 x2 y2 (pixels)

hdf5: the bottom-up-attention-vqa layout and its import back, see hdf5.py.

Exports decode one store row group at a time, so memory stays bounded.
"""

from __future__ import annotations

import posixpath
import re
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError
from ray_updown.features.hdf5 import HDF5_LAYOUTS, export_hdf5, require_h5py
from ray_updown.features.reader import FeatureStore

FORMATS = ("self-critical", "hdf5")
SELF_CRITICAL_DIRS = {"att": "cocobu_att", "fc": "cocobu_fc", "box": "cocobu_box"}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", mininterval=0.5, file=sys.stderr)


def _summary(line: str) -> None:
    """The last line on stderr, after the progress bar has closed."""
    print(line, file=sys.stderr, flush=True)


def export_store(store: str, fmt: str, out: str, name: str = "features", layout: str = "adaptive") -> dict:
    """Write the store at `store` under `out` in `fmt` ("self-critical" or "hdf5"); return a summary.

    hdf5: `out` is a folder (the file is `<out>/<name>.hdf5`) or ends in `.hdf5`/`.h5` (that
    file; the id maps take its stem). `layout`: "adaptive" (pos_boxes) or "fixed".
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    if layout not in HDF5_LAYOUTS:
        raise ConfigError(f"unknown HDF5 layout {layout!r}; expected one of {list(HDF5_LAYOUTS)}")
    if fmt == "hdf5":
        require_h5py()  # before opening the store: a missing extra is the one error to report
    fs = FeatureStore(store)
    if fmt == "self-critical":
        return export_self_critical(fs, out)
    return export_hdf5(fs, out, name=name, layout=layout)


# -- self-critical.pytorch ------------------------------------------------------------------

def _file_stem(image_id: Any, store: FeatureStore) -> str:
    stem = str(image_id)
    # The id becomes a file name: a separator or ".." would write outside the folder.
    if not _SAFE_NAME.match(stem) or stem in (".", ".."):
        raise DataError("image id cannot be a file name (only letters, digits, '.', '_', '-')",
                        file=store.locate(image_id)[0], record=f"image {image_id!r}")
    return stem


def _existing(folder: str) -> set[str]:
    """Names of the files already in `folder`: one listing instead of one stat per image."""
    if not storage.exists(folder):
        return set()
    return {posixpath.basename(p.replace("\\", "/")) for p in storage.list_files(folder)}


def _save(uri: str, kind: str, array: np.ndarray) -> None:
    with storage.atomic_write(uri, "wb") as f:
        if kind == "att":
            np.savez_compressed(f, feat=array)
        else:
            np.save(f, array)


def export_self_critical(store: FeatureStore, out: str) -> dict:
    """The three make_bu_data.py folders under `out`; files already present are skipped."""
    folders = {kind: storage.join(out, d) for kind, d in SELF_CRITICAL_DIRS.items()}
    ext = {"att": ".npz", "fc": ".npy", "box": ".npy"}
    present = {kind: _existing(folder) for kind, folder in folders.items()}
    written = skipped = files = boxes = 0
    with _progress(len(store), "export self-critical") as bar:
        for record in store.iter_records():
            stem = _file_stem(record.image_id, store)
            todo = [kind for kind in folders if stem + ext[kind] not in present[kind]]
            if not todo:
                skipped += 1
                bar.update(1)
                continue
            feats = record.features.astype(np.float32)
            arrays = {"att": feats, "box": record.boxes.astype(np.float32),
                      # An image without regions gets a zero mean rather than NaN.
                      "fc": feats.mean(0) if record.num_boxes else np.zeros(feats.shape[1], np.float32)}
            for kind in todo:
                _save(storage.join(folders[kind], stem + ext[kind]), kind, arrays[kind])
            written += 1
            files += len(todo)
            boxes += record.num_boxes
            bar.update(1)
    _summary(f"self-critical: {written} images written ({files} files), {skipped} already present, "
             f"under {out}")
    return {"format": "self-critical", "store": store.uri, "out": out, "images": written + skipped,
            "written": written, "skipped": skipped, "files_written": files, "boxes_written": boxes,
            "folders": folders}


# -- bottom-up-attention-vqa HDF5 ----------------------------------------------------------

