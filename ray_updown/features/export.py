"""Exports of a region-feature store to the layouts other trainers read, and the HDF5 import.

self-critical (ruotianluo/self-critical.pytorch, scripts/make_bu_data.py; its dataloader reads
``np.load(<att>/<id>.npz)['feat']``, ``np.load(<fc>/<id>.npy)``, ``np.load(<box>/<id>.npy)``)::

    <out>/cocobu_att/<image_id>.npz   np.savez_compressed, key "feat": k x D float32
    <out>/cocobu_fc/<image_id>.npy    mean over the regions: D float32
    <out>/cocobu_box/<image_id>.npy   k x 4 float32 boxes x1 y1 x2 y2 (pixels)
    <out>/ray-updown-export.json      the store they come from and how its features were made

A re-run continues: a file already there is skipped only when it reads back as the array of
its row's shape, else rewritten; temporary files of an interrupted run are removed. A folder
exported from a store made differently (another detector, config, checkpoint, dimension or id
type) is refused, so one folder never mixes two stores' features.

hdf5: the bottom-up-attention-vqa layout (hdf5.py, which also imports it back; hdf5_export.py).

Exports decode one store row group at a time, so memory stays bounded.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
import zipfile
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.features.hdf5 import HDF5_LAYOUTS, require_h5py
from ray_updown.features.hdf5_export import export_hdf5
from ray_updown.features.parts import store_identity
from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import PLAN_FILE, PLAN_SETTINGS_KEY

FORMATS = ("self-critical", "hdf5")
SELF_CRITICAL_DIRS = {"att": "cocobu_att", "fc": "cocobu_fc", "box": "cocobu_box"}

# In `out`: which store the self-critical folders come from (see `_claim`).
EXPORT_MARKER = "ray-updown-export.json"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")  # storage.atomic_write's, of an interrupted export


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", mininterval=0.5, file=sys.stderr)


def _summary(line: str) -> None:
    """The last line on stderr, after the progress bar has closed."""
    print(line, file=sys.stderr, flush=True)


def export_store(store: str, fmt: str, out: str, name: str = "features", layout: str = "adaptive") -> dict:
    """Write the store at `store` under `out` in `fmt` ("self-critical" or "hdf5"); return a summary.

    hdf5: `out` is a folder (the file is `<out>/<name>.hdf5`) or ends in `.hdf5`/`.h5` (that
    file; the id maps take its stem). `layout`: "adaptive" (pos_boxes) or "fixed".
    A store whose parts were made differently (another detector, dimension or id type) is
    refused, as `inspect` warns of it.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    if layout not in HDF5_LAYOUTS:
        raise ConfigError(f"unknown HDF5 layout {layout!r}; expected one of {list(HDF5_LAYOUTS)}")
    if fmt == "hdf5":
        require_h5py()  # before opening the store: a missing extra is the one error to report
    fs = FeatureStore(store)
    made_by = _made_by(fs)
    if fmt == "self-critical":
        return export_self_critical(fs, out, made_by)
    return export_hdf5(fs, out, name=name, layout=layout)


def _made_by(store: FeatureStore) -> dict[str, Any]:
    """How the store's features were made; a DataError when its parts disagree."""
    made_by, disagreements = store_identity(store.uri)
    if disagreements:
        more = f" and {len(disagreements) - 1} more" if len(disagreements) > 1 else ""
        raise DataError(f"its parts were made differently ({disagreements[0]}{more}; `ray-updown "
                        "inspect` lists them): export a store of one detector", file=store.uri)
    settings = _extraction_settings(store.uri)
    return {**made_by, "extraction_settings": settings} if settings else made_by


def _extraction_settings(store_uri: str) -> dict | None:
    """The decode and model settings the extraction plan records, if the store has one."""
    uri = storage.join(store_uri, PLAN_FILE)
    if not storage.exists(uri):
        return None
    metadata = storage.open_parquet(uri).schema_arrow.metadata or {}
    saved = metadata.get(PLAN_SETTINGS_KEY)
    return json.loads(saved) if saved else None


# -- self-critical.pytorch ------------------------------------------------------------------

def _file_stem(image_id: Any, store: FeatureStore) -> str:
    stem = str(image_id)
    # The id becomes a file name: a separator or ".." would write outside the folder.
    if not _SAFE_NAME.match(stem) or stem in (".", ".."):
        raise DataError("image id cannot be a file name (only letters, digits, '.', '_', '-')",
                        file=store.locate(image_id)[0], record=f"image {image_id!r}")
    return stem


def _existing(folder: str) -> tuple[set[str], set[str]]:
    """Names of the files already in `folder` (one listing instead of one stat per image), and
    of the temporary files an interrupted export left there."""
    if not storage.exists(folder):
        return set(), set()
    names = {posixpath.basename(p.replace("\\", "/")) for p in storage.list_files(folder)}
    temporary = {n for n in names if _TEMPORARY.search(n)}
    return names - temporary, temporary


def _claim(out: str, store: FeatureStore, made_by: dict[str, Any], holds_files: bool) -> None:
    """Record in `out` which store its files come from, or refuse a folder made from another."""
    marker = storage.join(out, EXPORT_MARKER)
    if not storage.exists(marker):
        if holds_files:
            raise DataError(f"holds exported files but no {EXPORT_MARKER} saying which store they "
                            "come from: export into a new folder (or empty this one)", file=out)
        storage.write_json(marker, {"format": "self-critical", "store": store.uri,
                                    "made_by": made_by}, indent=2)
        return
    theirs = storage.read_json(marker)
    theirs = theirs if isinstance(theirs, dict) else {}
    made = theirs.get("made_by") if isinstance(theirs.get("made_by"), dict) else {}
    if made != made_by:
        diff = sorted(k for k in set(made) | set(made_by) if made.get(k) != made_by.get(k))
        raise DataError(f"holds an export of another store ({theirs.get('store')}: other "
                        f"{', '.join(diff)}); export {store.uri} into a new folder", file=out)


def _complete(uri: str, kind: str, shape: tuple[int, ...]) -> bool:
    """Whether the file reads back as the float32 array of `shape` this export writes: its .npy
    header says so and the whole data follows it (for .npz: in the zip's directory, which a
    zip gets last, the member "feat.npy" of that size)."""
    try:
        with storage.open_uri(uri, "rb") as f:
            if kind != "att":
                size = f.seek(0, 2)
                f.seek(0)
                return _npy_complete(f, shape, size)
            with zipfile.ZipFile(f) as z, z.open("feat.npy") as member:
                return _npy_complete(member, shape, z.getinfo("feat.npy").file_size)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, StorageError):
        return False


def _npy_complete(f: IO, shape: tuple[int, ...], size: int) -> bool:
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    found, fortran, dtype = read_header(f)
    return (tuple(found) == shape and dtype == np.float32 and not fortran
            and size == f.tell() + int(np.prod(shape)) * 4)


def _arrays(record: FeatureRecord) -> dict[str, np.ndarray]:
    feats = record.features.astype(np.float32)
    # An image without regions gets a zero mean rather than NaN.
    fc = feats.mean(0) if record.num_boxes else np.zeros(feats.shape[1], np.float32)
    return {"att": feats, "box": record.boxes.astype(np.float32), "fc": fc}


def _save(uri: str, kind: str, array: np.ndarray) -> None:
    with storage.atomic_write(uri, "wb") as f:
        if kind == "att":
            np.savez_compressed(f, feat=array)
        else:
            np.save(f, array)


def export_self_critical(store: FeatureStore, out: str, made_by: dict[str, Any]) -> dict:
    """The three make_bu_data.py folders under `out`, marked with the store they come from
    (`made_by`); a file already present is skipped when it is complete, else rewritten."""
    folders = {kind: storage.join(out, d) for kind, d in SELF_CRITICAL_DIRS.items()}
    ext = {"att": ".npz", "fc": ".npy", "box": ".npy"}
    listed = {kind: _existing(folder) for kind, folder in folders.items()}
    present = {kind: names for kind, (names, _) in listed.items()}
    _claim(out, store, made_by, any(present.values()))
    for kind, (_, temporary) in listed.items():  # only once the folder is known to be ours
        for name in temporary:
            storage.remove(storage.join(folders[kind], name))
    written = skipped = files = rewritten = boxes = 0
    with _progress(len(store), "export self-critical") as bar:
        for record in store.iter_records():
            stem = _file_stem(record.image_id, store)
            k, dim = record.num_boxes, record.feature_dim
            shapes = {"att": (k, dim), "fc": (dim,), "box": (k, 4)}
            uris = {kind: storage.join(folders[kind], stem + ext[kind]) for kind in folders}
            there = [kind for kind in folders if stem + ext[kind] in present[kind]]
            todo = [kind for kind in folders
                    if kind not in there or not _complete(uris[kind], kind, shapes[kind])]
            if todo:
                arrays = _arrays(record)
                for kind in todo:
                    _save(uris[kind], kind, arrays[kind])
                written, files, boxes = written + 1, files + len(todo), boxes + k
                rewritten += len(set(todo) & set(there))
            else:
                skipped += 1
            bar.update(1)
    removed = sum(len(temporary) for _, temporary in listed.values())
    _summary(f"self-critical: {written} images written ({files} files, {rewritten} of them "
             f"incomplete before), {skipped} already complete, {removed} temporary files "
             f"removed, under {out}")
    return {"format": "self-critical", "store": store.uri, "out": out, "images": written + skipped,
            "written": written, "skipped": skipped, "files_written": files,
            "files_rewritten": rewritten, "temporary_files_removed": removed,
            "boxes_written": boxes, "folders": folders}


# -- bottom-up-attention-vqa HDF5 ----------------------------------------------------------

