"""One image's regions as the store holds them, and the conversions between them and Arrow:
`FeatureRecord` (one image, for producers and small uses), `records_to_table`, and
`DecodedRows` (a read table's zero-copy per-image views, for readers). The layout is
documented in `schema.py`; writer.py writes the tables, reader.py reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from ray_updown.errors import DataError
from ray_updown.features.schema import PER_BOX_COLUMNS, StoreMeta, feature_schema


def _as_image_id(image_id: Any) -> int | str:
    if isinstance(image_id, (bool, np.bool_)):
        raise DataError(f"image_id must be an int or a string, got a bool ({image_id})")
    if isinstance(image_id, (int, np.integer)):
        return int(image_id)
    if isinstance(image_id, str) and image_id:
        return image_id
    raise DataError(f"image_id must be an int or a non-empty string, got {image_id!r}")


def _per_box(name: str, value: Any, k: int, dtype: Any, image_id: Any, default: float) -> np.ndarray:
    if value is None:  # e.g. grid features or a TSV without labels: class 0 / score 0
        return np.full((k,), default, dtype=dtype)
    arr = np.asarray(value)
    if arr.shape != (k,):
        raise DataError(f"{name} has shape {arr.shape}, expected ({k},) for {k} boxes",
                        record=f"image {image_id}")
    return arr.astype(dtype, copy=False)


@dataclass
class FeatureRecord:
    """One image's regions. `num_boxes` is derived from `boxes`.

    boxes: [k, 4] float32 x1, y1, x2, y2 in original pixels; features: [k, D] (any float
    dtype; stored as float16, read back as float16); object_ids/attr_ids: [k] int32 (0 =
    background / no attribute, the default when the producer has no labels); *_conf: [k]
    float32 scores (default 0).
    """

    image_id: int | str
    image_w: int
    image_h: int
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray | None = None
    object_conf: np.ndarray | None = None
    attr_ids: np.ndarray | None = None
    attr_conf: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_id = _as_image_id(self.image_id)
        where = f"image {self.image_id}"
        try:
            self.image_w, self.image_h = int(self.image_w), int(self.image_h)
        except (TypeError, ValueError):
            raise DataError(f"image size must be integers, got {self.image_w!r}x{self.image_h!r}",
                            record=where) from None
        if self.image_w <= 0 or self.image_h <= 0:
            raise DataError(f"image size must be positive, got {self.image_w}x{self.image_h}",
                            record=where)
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise DataError(f"boxes has shape {boxes.shape}, expected (k, 4)", record=where)
        k = boxes.shape[0]
        features = np.asarray(self.features)
        if features.ndim != 2 or features.shape[0] != k or features.shape[1] == 0:
            raise DataError(f"features has shape {features.shape}, expected ({k}, D) for {k} boxes",
                            record=where)
        if not np.issubdtype(features.dtype, np.floating):
            features = features.astype(np.float32)
        self.boxes, self.features = boxes, features
        self.object_ids = _per_box("object_ids", self.object_ids, k, np.int32, self.image_id, 0)
        self.object_conf = _per_box("object_conf", self.object_conf, k, np.float32, self.image_id, 0.0)
        self.attr_ids = _per_box("attr_ids", self.attr_ids, k, np.int32, self.image_id, 0)
        self.attr_conf = _per_box("attr_conf", self.attr_conf, k, np.float32, self.image_id, 0.0)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def infer_image_id_type(image_ids: Iterable[Any]) -> str:
    """"int64" when every id is an int, "string" when every id is a string; mixed is an error."""
    kinds = {type(_as_image_id(i)).__name__ for i in image_ids}
    if kinds == {"int", "str"}:
        raise DataError("image ids mix integers and strings; a store holds one id type")
    return "string" if kinds == {"str"} else "int64"


def _list_array(values: pa.Array, counts: np.ndarray, width: int | None = None) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def records_to_table(records: Sequence[FeatureRecord], meta: StoreMeta) -> pa.Table:
    """Arrow table with `feature_schema(meta)`; checks D and the id type against `meta`."""
    schema = feature_schema(meta)
    dim = int(meta.feature_dim)
    for r in records:
        if r.feature_dim != dim:
            raise DataError(f"feature dim {r.feature_dim} differs from the store's {dim}",
                            record=f"image {r.image_id}")
        is_str = isinstance(r.image_id, str)
        if is_str != (meta.image_id_type == "string"):
            raise DataError(f"image id {r.image_id!r} does not match the store's id type "
                            f"{meta.image_id_type}", record=f"image {r.image_id}")
    counts = np.array([r.num_boxes for r in records], dtype=np.int64)
    with np.errstate(over="ignore"):  # overflow is reported below, naming the image
        feats = (np.concatenate([r.features for r in records]) if records
                 else np.zeros((0, dim), np.float32)).astype(np.float16)
        finite = bool(np.isfinite(feats).all())
        bad = None if finite else next(r.image_id for r in records
                                       if not np.isfinite(r.features.astype(np.float16)).all())
    if not finite:
        raise DataError("features are not finite in float16 (NaN, inf or beyond +-65504)",
                        record=f"image {bad}")

    def cat(name: str, dtype: Any, tail: tuple[int, ...] = ()) -> np.ndarray:
        if not records:
            return np.zeros((0,) + tail, dtype=dtype)
        return np.concatenate([getattr(r, name) for r in records]).astype(dtype, copy=False)

    columns = {
        "image_id": pa.array([r.image_id for r in records], type=schema.field("image_id").type),
        "image_w": pa.array([r.image_w for r in records], type=pa.int32()),
        "image_h": pa.array([r.image_h for r in records], type=pa.int32()),
        "num_boxes": pa.array(counts.astype(np.int32), type=pa.int32()),
        "boxes": _list_array(pa.array(cat("boxes", np.float32, (4,)).ravel()), counts, 4),
        "features": _list_array(pa.array(feats.ravel(), type=pa.float16()), counts, dim),
        "object_ids": _list_array(pa.array(cat("object_ids", np.int32)), counts),
        "object_conf": _list_array(pa.array(cat("object_conf", np.float32)), counts),
        "attr_ids": _list_array(pa.array(cat("attr_ids", np.int32)), counts),
        "attr_conf": _list_array(pa.array(cat("attr_conf", np.float32)), counts),
    }
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


class DecodedRows:
    """A feature table (or one row group of it) as flat numpy arrays plus box offsets.

    Used by the reader to decode exactly one row group and hand out single records.
    """

    def __init__(self, table: pa.Table, file: str | None = None):
        self.file = file
        self.feature_dim = int(table.schema.field("features").type.value_type.list_size)
        self.image_ids = table.column("image_id").to_pylist()
        self.image_w = table.column("image_w").to_numpy()
        self.image_h = table.column("image_h").to_numpy()
        self.num_boxes = table.column("num_boxes").to_numpy().astype(np.int64)
        self.offsets = np.zeros(len(self.num_boxes) + 1, dtype=np.int64)
        np.cumsum(self.num_boxes, out=self.offsets[1:])
        self.values: dict[str, np.ndarray] = {}
        for name in PER_BOX_COLUMNS:
            col = table.column(name)
            arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
            offs = np.asarray(arr.offsets, dtype=np.int64)
            counts = np.diff(offs)
            if not np.array_equal(counts, self.num_boxes) or arr.null_count:
                i = int(np.flatnonzero(counts != self.num_boxes)[0]) if len(counts) else 0
                raise DataError(f"column {name} has {counts[i] if len(counts) else 0} entries "
                                f"but num_boxes is {self.num_boxes[i]}", file=file,
                                record=f"image {self.image_ids[i]}")
            child = arr.values  # may start before this row group's first list
            if isinstance(child, pa.FixedSizeListArray):
                width = child.type.list_size
                flat = child.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            else:
                flat = child.to_numpy(zero_copy_only=False)
            self.values[name] = flat[offs[0]:offs[-1]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, i: int) -> FeatureRecord:
        """Row i as a record. Arrays are copies so a cached group is not kept alive by them."""
        a, b = self.offsets[i], self.offsets[i + 1]
        v = {name: self.values[name][a:b].copy() for name in PER_BOX_COLUMNS}
        return FeatureRecord(image_id=self.image_ids[i], image_w=int(self.image_w[i]),
                             image_h=int(self.image_h[i]), **v)

    @property
    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.values.values()))


def table_to_records(table: pa.Table, file: str | None = None) -> list[FeatureRecord]:
    """Inverse of `records_to_table` (features come back float16)."""
    rows = DecodedRows(table, file=file)
    return [rows.record(i) for i in range(len(rows))]
