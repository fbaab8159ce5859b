"""The bottom-up-attention-vqa HDF5 layout, and its import into a store (`import_hdf5`;
hdf5_export.py writes a store in it).

hdf5 (bottom-up-attention-vqa, tools/detection_features_converter.py, and its 10-100 adaptive
boxes version, tools/adaptive_detection_features_converter.py in jnhwkim/ban-vqa, which the
VQA loaders read with ``adaptive=True``)::

    <name>.hdf5  image_features    total_boxes x D float32
                 image_bb          total_boxes x 4 float32 (x1 y1 x2 y2 pixels)
                 spatial_features  total_boxes x 6 float32 (x1/w y1/h x2/w y2/h bw/w bh/h)
                 pos_boxes         images x 2 int32 (start, end row of each image's boxes)
                 image_size        images x 2 int32 (w, h)  -- ours; other loaders ignore it
    <name>_imgid2idx.json  {"<image_id>": row of pos_boxes}
    <name>_imgid2idx.pkl   the same as a plain dict (int ids stay int), pickle protocol 2,
                           the file their loaders open; we write it and never load pickles

With ``layout="fixed"`` (every image has the same k, e.g. 36) the three box datasets are
images x k x ... and there is no pos_boxes, as in the original detection_features_converter.py
(``train36.hdf5``). File attributes ``image_id_type`` and ``store_metadata`` (JSON) let the
import restore the id type and detector metadata; files written by the converters lack them.

`import_hdf5` reads either layout back. Those files hold no image size: it takes ``image_size``
when present, otherwise derives w = x2 / (x2/w) and h = y2 / (y2/h) from image_bb and
spatial_features (the largest box, checked against every box). They hold no labels either:
object/attribute ids and scores come back as 0.

Both directions stream: the export writes resizable datasets in ~16 MiB batches; the
import reads slabs of images and writes one shard at a time.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError
from ray_updown.features.reader import build_index
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard

HDF5_LAYOUTS = ("adaptive", "fixed")
REQUIRED_DATASETS = ("image_features", "image_bb")
BATCH_BYTES = 16 << 20      # float32 features per HDF5 append (export) or slab read (import)
_SHARD_BYTES = 128 << 20    # float16 features of one imported shard


def require_h5py():
    try:
        import h5py
    except ImportError:
        raise ConfigError("the HDF5 layout needs h5py: pip install 'ray-updown[hdf5]'") from None
    return h5py


def progress_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", mininterval=0.5, file=sys.stderr)


def print_summary(line: str) -> None:
    """The last line on stderr, after the progress bar has closed."""
    print(line, file=sys.stderr, flush=True)


def default_ids_uri(hdf5: str) -> str:
    """The JSON id map beside an HDF5 file: `<stem>_imgid2idx.json`."""
    base = hdf5.rsplit(".", 1)[0] if hdf5.lower().endswith((".hdf5", ".h5")) else hdf5
    return base + "_imgid2idx.json"


def _load_id_map(ids_uri: str, hdf5_uri: str) -> dict[str, int]:
    if not storage.exists(ids_uri):
        pkl = ids_uri[:-len(".json")] + ".pkl" if ids_uri.endswith(".json") else None
        hint = ""
        if pkl and storage.exists(pkl):
            # Unpickling runs arbitrary code, so a downloaded map is never loaded.
            hint = (f"; only {pkl} exists, and pickles are not loaded (they can run code): convert "
                    f"it where you trust it with python -c \"import pickle,json,sys; "
                    f"json.dump({{str(k): int(v) for k, v in pickle.load(open(sys.argv[1], 'rb')).items()}}, "
                    f"open(sys.argv[2], 'w'))\" {pkl} {ids_uri}")
        raise DataError(f"no image-id map {ids_uri}{hint}", file=hdf5_uri)
    raw = storage.read_json(ids_uri)
    if not isinstance(raw, dict) or not raw:
        raise DataError("expected a non-empty JSON object {image_id: row}", file=ids_uri)
    for key, row in raw.items():
        if isinstance(row, bool) or not isinstance(row, int) or row < 0:
            raise DataError(f"row must be a non-negative integer, got {row!r}", file=ids_uri,
                            record=f"image {key!r}")
    return raw


def _typed_ids(raw: dict[str, int], id_type: str | None) -> dict[Any, int]:
    """JSON keys are strings: ints come back as ints when the file says so or all keys are ints."""
    canonical = all(re.fullmatch(r"-?(0|[1-9][0-9]*)", k) for k in raw)
    if id_type is None:
        id_type = "int64" if canonical else "string"
    if id_type == "int64":
        if not canonical:
            bad = next(k for k in raw if not re.fullmatch(r"-?(0|[1-9][0-9]*)", k))
            raise DataError("the HDF5 file says image ids are integers", record=f"image {bad!r}")
        return {int(k): v for k, v in raw.items()}
    return dict(raw)


def _derive_size(bb: np.ndarray, spatial: np.ndarray | None, col: int, what: str) -> int:
    """Image width (col 2) or height (col 3) from pixel x2/y2 over the normalised x2/y2."""
    if spatial is None:
        raise DataError(f"no image_size or spatial_features dataset to take the image {what} from")
    px, rel = bb[:, col].astype(np.float64), spatial[:, col].astype(np.float64)
    ok = (px > 0) & (rel > 1e-6)
    if not ok.any():
        raise DataError(f"cannot derive the image {what}: no box with a positive x2/y2")
    estimates = px[ok] / rel[ok]
    best = int(round(estimates[np.argmax(px[ok])]))
    # Float32 rounding of the ratios leaves ~1e-6 relative error; more means another image size.
    if best <= 0 or np.abs(estimates - best).max() > max(0.5, 1e-4 * best):
        raise DataError(f"spatial_features and image_bb disagree on the image {what} "
                        f"({estimates.min():.2f} .. {estimates.max():.2f})")
    return best


class _H5Source:
    """Validated view of a bottom-up-attention-vqa HDF5 file: box ranges and sizes per row."""

    def __init__(self, h5, uri: str):
        self.uri = uri
        missing = [d for d in REQUIRED_DATASETS if d not in h5]
        if missing:
            raise DataError(f"missing dataset(s) {', '.join(missing)} (not a bottom-up-attention-vqa "
                            f"feature file)", file=uri)
        self.features, self.bb = h5["image_features"], h5["image_bb"]
        self.spatial = h5["spatial_features"] if "spatial_features" in h5 else None
        f_shape = self.features.shape
        if len(f_shape) == 3:  # fixed: images x k x D
            self.layout, self.k, self.dim = "fixed", f_shape[1], f_shape[2]
            self.images = f_shape[0]
            box_shape = (self.images, self.k)
        elif len(f_shape) == 2:
            if "pos_boxes" not in h5:
                raise DataError("image_features is 2-D (adaptive boxes) but there is no pos_boxes "
                                "dataset", file=uri)
            self.layout, self.k, self.dim = "adaptive", None, f_shape[1]
            pos = h5["pos_boxes"]
            if pos.ndim != 2 or pos.shape[1] != 2 or not np.issubdtype(pos.dtype, np.integer):
                raise DataError(f"pos_boxes has shape {pos.shape} ({pos.dtype}), expected images x 2 "
                                f"integers", file=uri)
            self.pos = pos[()].astype(np.int64)  # images x 2: small, read once
            self.images = self.pos.shape[0]
            box_shape = (f_shape[0],)
        else:
            raise DataError(f"image_features has shape {f_shape}, expected boxes x D or images x k x D",
                            file=uri)
        if self.dim <= 0 or self.k == 0:
            raise DataError(f"image_features has shape {f_shape}: no boxes or no feature dimension", file=uri)
        for name, ds, width in (("image_bb", self.bb, 4), ("spatial_features", self.spatial, 6)):
            if ds is not None and ds.shape != box_shape + (width,):
                raise DataError(f"{name} has shape {ds.shape}, expected {box_shape + (width,)} to match "
                                f"image_features {f_shape}", file=uri)
        self.sizes = None
        if "image_size" in h5:
            sizes = h5["image_size"]
            if sizes.shape != (self.images, 2):
                raise DataError(f"image_size has shape {sizes.shape}, expected ({self.images}, 2)", file=uri)
            self.sizes = sizes[()].astype(np.int64)

    def span(self, row: int, image_id: Any) -> tuple[int, int]:
        """Box rows [start, end) of the image at `row`."""
        where = {"file": self.uri, "record": f"image {image_id!r} (row {row})"}
        if row >= self.images:
            raise DataError(f"the id map points at row {row}, but the file has {self.images} images",
                            **where)
        if self.layout == "fixed":
            return row * self.k, (row + 1) * self.k
        start, end = (int(v) for v in self.pos[row])
        if not 0 <= start <= end <= self.features.shape[0]:
            raise DataError(f"pos_boxes [{start}, {end}) is outside the {self.features.shape[0]} "
                            f"rows of image_features", **where)
        return start, end

    def read(self, ds, start: int, end: int) -> np.ndarray:
        """Box rows [start, end) of a box dataset as a 2-D array."""
        try:
            if self.layout == "fixed":
                return ds[start // self.k:end // self.k].reshape(-1, ds.shape[-1])
            return ds[start:end]
        except OSError as exc:  # a corrupt or truncated chunk
            raise DataError(f"cannot read {ds.name} rows {start}..{end} ({exc})", file=self.uri) from None


def _plan(rows: list[tuple[Any, int, int, int]], max_boxes: int) -> Iterator[list[tuple[Any, int, int, int]]]:
    """Group (id, row, start, end) into runs of contiguous boxes: one slab read per run."""
    run: list[tuple[Any, int, int, int]] = []
    boxes = 0
    for item in rows:
        if run and (item[2] != run[-1][3] or boxes >= max_boxes):
            yield run
            run, boxes = [], 0
        run.append(item)
        boxes += item[3] - item[2]
    if run:
        yield run


def import_hdf5(hdf5: str, store: str, ids: str | None = None, rows_per_shard: int = 1000,
                first_shard: int = 0) -> dict:
    """A bottom-up-attention-vqa HDF5 file -> feature shards under `store`, then the index.

    `ids`: the JSON {image_id: row} map (default `<stem>_imgid2idx.json` beside the file).
    Rows of pos_boxes that no id points at (the converters size it by a folder listing) are
    skipped and counted. Features are stored as float16; labels as 0 (the file has none).
    """
    h5py = require_h5py()
    if rows_per_shard <= 0:
        raise ConfigError(f"rows_per_shard must be positive, got {rows_per_shard}")
    ids_uri = ids or default_ids_uri(hdf5)
    raw_ids = _load_id_map(ids_uri, hdf5)
    with storage.open_uri(hdf5, "rb") as f:
        try:
            h5 = h5py.File(f, "r")
        except OSError as exc:
            raise DataError(f"not a readable HDF5 file ({exc})", file=hdf5) from None
        with h5:
            return _import_open(h5, hdf5, ids_uri, raw_ids, store, rows_per_shard, first_shard)


def _saved_meta(h5, hdf5: str, layout: str) -> dict[str, Any]:
    """StoreMeta fields our export saved in the file (detector, vocabularies...), else a description."""
    try:
        saved = json.loads(h5.attrs.get("store_metadata", "{}"))
    except (TypeError, json.JSONDecodeError):
        saved = {}  # foreign or damaged attribute: describe the import instead
    if not isinstance(saved, dict) or not isinstance(saved.get("detector"), str):
        return {"detector": "bottom-up-attention (imported HDF5)",
                "detector_config": {"source": hdf5, "layout": layout}}
    # The id type and dimension come from the file itself; the schema version is this reader's.
    fields = {f.name for f in dataclasses.fields(StoreMeta)} - {"feature_dim", "image_id_type", "schema_version"}
    return {k: v for k, v in saved.items() if k in fields}


def _image_rows(h5, raw_ids: dict[str, int], ids_uri: str) -> dict[Any, int]:
    """{image_id: row} with the ids typed as the file says; DataError when two ids share a row."""
    attr_type = h5.attrs.get("image_id_type")
    attr_type = attr_type if attr_type in ("int64", "string") else None
    try:
        id_rows = _typed_ids(raw_ids, attr_type)
    except DataError as exc:
        raise DataError(exc.problem, file=ids_uri, record=exc.record) from None
    by_row: dict[int, Any] = {}
    for image_id, row in id_rows.items():
        if row in by_row:
            raise DataError(f"row {row} is claimed by images {by_row[row]!r} and {image_id!r}",
                            file=ids_uri, record=f"image {image_id!r}")
        by_row[row] = image_id
    return id_rows


class _ShardSink:
    """Imported records gathered into feature shards of at most `rows_per_shard` images or
    _SHARD_BYTES of features, numbered from `first_shard`."""

    def __init__(self, store: str, meta: StoreMeta, hdf5: str, rows_per_shard: int,
                 first_shard: int):
        self.store, self.meta, self.hdf5, self.rows_per_shard = store, meta, hdf5, rows_per_shard
        self.shard, self.batch, self.batch_bytes, self.boxes = first_shard, [], 0, 0
        self.shards: list[str] = []

    def add(self, record: FeatureRecord) -> None:
        self.batch.append(record)
        self.batch_bytes += record.features.nbytes
        self.boxes += record.num_boxes
        if len(self.batch) >= self.rows_per_shard or self.batch_bytes >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        uri = feature_shard_uri(self.store, self.shard)
        try:
            write_feature_shard(self.batch, uri, self.meta)
        except DataError as exc:  # e.g. a feature beyond float16: name the HDF5 file too
            raise DataError(exc.problem, file=self.hdf5, record=exc.record) from None
        self.shards.append(uri)
        self.shard += 1
        self.batch, self.batch_bytes = [], 0


def _slab_records(src: _H5Source, run: list[tuple[Any, int, int, int]]) -> Iterator[FeatureRecord]:
    """The records of one run of contiguous images, read as one slab; each image's size from
    image_size, else derived from its boxes."""
    lo, hi = run[0][2], run[-1][3]
    feats = src.read(src.features, lo, hi).astype(np.float16)  # the store's dtype, half the RAM
    bb = src.read(src.bb, lo, hi).astype(np.float32)
    spatial = src.read(src.spatial, lo, hi) if src.spatial is not None and src.sizes is None else None
    for image_id, row, start, end in run:
        a, b = start - lo, end - lo
        try:
            if src.sizes is not None:
                w, h = (int(v) for v in src.sizes[row])
            else:
                sp = spatial[a:b] if spatial is not None else None
                w = _derive_size(bb[a:b], sp, 2, "width")
                h = _derive_size(bb[a:b], sp, 3, "height")
            record = FeatureRecord(image_id=image_id, image_w=w, image_h=h, boxes=bb[a:b],
                                   features=feats[a:b])
        except DataError as exc:
            raise DataError(exc.problem, file=src.uri,
                            record=f"image {image_id!r} (row {row})") from None
        yield record


def _import_open(h5, hdf5: str, ids_uri: str, raw_ids: dict[str, int], store: str,
                 rows_per_shard: int, first_shard: int) -> dict:
    try:
        src = _H5Source(h5, hdf5)
    except OSError as exc:  # h5py reports corrupt or truncated data as OSError
        raise DataError(f"cannot read ({exc})", file=hdf5) from None
    id_rows = _image_rows(h5, raw_ids, ids_uri)
    plan = sorted(((image_id, row) + src.span(row, image_id) for image_id, row in id_rows.items()),
                  key=lambda t: t[2])
    meta = StoreMeta(feature_dim=int(src.dim),
                     image_id_type="string" if any(isinstance(i, str) for i in id_rows) else "int64",
                     **_saved_meta(h5, hdf5, src.layout))
    sink = _ShardSink(store, meta, hdf5, rows_per_shard, first_shard)
    with progress_bar(len(plan), "import hdf5") as bar:
        for run in _plan(plan, max(1, BATCH_BYTES // (4 * src.dim))):
            for record in _slab_records(src, run):
                sink.add(record)
            bar.update(len(run))
        sink.flush()
    build_index(store)
    unmapped = src.images - len(plan)
    print_summary(f"import hdf5: {len(plan)} images, {sink.boxes} boxes ({src.layout}) into "
                  f"{len(sink.shards)} shard(s) of {store}"
                  + (f"; {unmapped} rows without an id skipped" if unmapped else ""))
    return {"hdf5": hdf5, "ids": ids_uri, "store": store, "layout": src.layout, "images": len(plan),
            "boxes": sink.boxes, "feature_dim": int(src.dim), "shards": len(sink.shards),
            "rows_without_id": unmapped,
            "image_sizes": "image_size dataset" if src.sizes is not None else "derived from spatial_features"}
