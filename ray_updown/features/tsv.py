"""Import and export of the released bottom-up-attention feature TSVs.

Two layouts, both tab-separated, one image a line, no header, arrays as base64 of the raw
little-endian bytes (numpy `tobytes`):

original (bottom-up-attention generate_tsv.py):
    image_id  image_w  image_h  num_boxes  boxes(float32 k*4)  features(float32 k*D)
lxmert (airsplay/lxmert, src/utils.py FIELDNAMES; note h before w):
    img_id  img_h  img_w  objects_id(int64 k)  objects_conf(float32 k)  attrs_id(int64 k)
    attrs_conf(float32 k)  num_boxes  boxes(float32 k*4)  features(float32 k*D)

In the LXMERT files (Caffe's generate_tsv: `argmax(cls_prob[:, 1:])`) objects_id and attrs_id
count from 0 over the 1600 objects and 400 attributes; our stores keep background and "no
attribute" at 0 (vocabulary line i -> id i + 1), so ids shift by one each way. A region
labelled 0 (background, or a store without labels such as the grid baseline) has no LXMERT id
and is refused on export.

Lines are split on tabs directly rather than with the csv module, so no process-wide
`csv.field_size_limit` is needed for the multi-megabyte feature fields. Both import and
export stream: one line and one shard at a time.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Iterator

import numpy as np

from ray_updown import storage
from ray_updown.errors import DataError
from ray_updown.features.reader import FeatureStore, build_index
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard

ORIGINAL_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                 "attrs_conf", "num_boxes", "boxes", "features")
VARIANTS = {"original": ORIGINAL_FIELDS, "lxmert": LXMERT_FIELDS}

# (TSV field, record attribute, dtype in the file, our id minus the file's)
_LXMERT_LABELS = (("objects_id", "object_ids", np.int64, 1), ("objects_conf", "object_conf", np.float32, 0),
                  ("attrs_id", "attr_ids", np.int64, 1), ("attrs_conf", "attr_conf", np.float32, 0))


def _fields(variant: str) -> tuple[str, ...]:
    if variant not in VARIANTS:
        raise DataError(f"unknown TSV variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _b64(array: np.ndarray, dtype: Any) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def format_tsv_line(record: FeatureRecord, variant: str = "original") -> str:
    """One record as a TSV line (with the trailing newline); features written as float32."""
    _fields(variant)
    common = [str(record.num_boxes), _b64(record.boxes, np.float32), _b64(record.features, np.float32)]
    if variant == "original":
        parts = [str(record.image_id), str(record.image_w), str(record.image_h)] + common
    else:
        labels = [_b64(_lxmert_ids(record, attr) if shift else getattr(record, attr), dtype)
                  for _, attr, dtype, shift in _LXMERT_LABELS]
        parts = [str(record.image_id), str(record.image_h), str(record.image_w)] + labels + common
    return "\t".join(parts) + "\n"


def _lxmert_ids(record: FeatureRecord, attr: str) -> np.ndarray:
    ids = np.asarray(getattr(record, attr), dtype=np.int64)
    if (ids < 1).any():
        raise DataError(f"{attr} holds {int(ids.min())} (background, no attribute, or no label), "
                        "which the LXMERT layout cannot write: export the 'original' variant",
                        record=f"image {record.image_id}")
    return ids - 1


def _decode(field: str, value: str, dtype: Any, width: int | None, k: int, where: dict) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"field {field} is not valid base64", **where) from None
    item = np.dtype(dtype).itemsize
    per_row = item * (width or 1)
    if width == -1:  # features: D is whatever the bytes say
        if k == 0:
            return np.zeros((0, 0), dtype=dtype)
        if len(raw) % (item * k):
            raise DataError(f"field {field} has {len(raw)} bytes, not a multiple of "
                            f"{k} boxes x {item} bytes", **where)
        return np.frombuffer(raw, dtype=dtype).reshape(k, -1)
    if len(raw) != per_row * k:
        raise DataError(f"field {field} has {len(raw)} bytes, expected {per_row * k} "
                        f"({k} x {width or 1} x {item})", **where)
    arr = np.frombuffer(raw, dtype=dtype)
    return arr.reshape(k, width) if width else arr


def _int_field(field: str, value: str, where: dict) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"field {field} is not an integer: {value[:40]!r}", **where) from None


def parse_tsv_line(line: str, variant: str = "original", file: str | None = None,
                   line_no: int | None = None, image_id_type: str = "auto") -> FeatureRecord:
    """One TSV line -> FeatureRecord; any problem is a DataError naming file and line."""
    names = _fields(variant)
    where = {"file": file, "record": f"line {line_no}" if line_no is not None else None}
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != len(names):
        raise DataError(f"expected {len(names)} tab-separated fields ({variant} layout), "
                        f"found {len(parts)}", **where)
    row = dict(zip(names, parts))
    raw_id = row[names[0]]
    if image_id_type == "int64" or (image_id_type == "auto" and raw_id.isdigit()):
        image_id: int | str = _int_field(names[0], raw_id, where)
    elif raw_id:
        image_id = raw_id
    else:
        raise DataError("empty image id", **where)
    w_key, h_key = ("image_w", "image_h") if variant == "original" else ("img_w", "img_h")
    image_w = _int_field(w_key, row[w_key], where)
    image_h = _int_field(h_key, row[h_key], where)
    k = _int_field("num_boxes", row["num_boxes"], where)
    if k < 0:
        raise DataError(f"num_boxes is negative ({k})", **where)
    arrays = {"boxes": _decode("boxes", row["boxes"], np.float32, 4, k, where),
              "features": _decode("features", row["features"], np.float32, -1, k, where)}
    if variant == "lxmert":
        for tsv_name, attr, dtype, shift in _LXMERT_LABELS:
            arrays[attr] = _decode(tsv_name, row[tsv_name], dtype, None, k, where) + shift
            if shift and (arrays[attr] < shift).any():
                raise DataError(f"field {tsv_name} holds a negative id", **where)
    if k == 0:
        raise DataError("num_boxes is 0: a feature row needs at least one box", **where)
    try:
        return FeatureRecord(image_id=image_id, image_w=image_w, image_h=image_h, **arrays)
    except DataError as exc:
        raise DataError(exc.problem, **where) from None


def iter_tsv(tsv_uri: str, variant: str = "original", image_id_type: str = "auto"
             ) -> Iterator[FeatureRecord]:
    """Stream the records of a TSV file. With "auto", the first line decides the id type."""
    with storage.open_uri(tsv_uri, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("ascii")
            except UnicodeDecodeError:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"not UTF-8 text (byte {exc.start})", file=tsv_uri,
                                    record=f"line {line_no}") from None
            if not line.strip():
                continue
            record = parse_tsv_line(line, variant, tsv_uri, line_no, image_id_type)
            if image_id_type == "auto":
                image_id_type = "string" if isinstance(record.image_id, str) else "int64"
            yield record


def import_tsv(tsv_uri: str, store_uri: str, variant: str = "original", rows_per_shard: int = 1000,
               image_id_type: str = "auto", detector: str = "bottom-up-attention (imported TSV)",
               first_shard: int = 0) -> int:
    """TSV -> feature shards part-{first_shard..}.parquet under store_uri, then the index.

    Returns the number of images imported. The TSV's float32 features are stored as float16.
    """
    _fields(variant)
    if rows_per_shard <= 0:
        raise DataError(f"rows_per_shard must be positive, got {rows_per_shard}")
    meta: StoreMeta | None = None
    shard, count, batch = first_shard, 0, []

    def flush() -> None:
        nonlocal shard
        write_feature_shard(batch, feature_shard_uri(store_uri, shard), meta)
        shard += 1
        batch.clear()

    for record in iter_tsv(tsv_uri, variant, image_id_type):
        if meta is None:
            meta = StoreMeta(feature_dim=record.feature_dim,
                             image_id_type="string" if isinstance(record.image_id, str) else "int64",
                             detector=detector,
                             detector_config={"source": tsv_uri, "tsv_variant": variant})
        elif record.feature_dim != meta.feature_dim:
            raise DataError(f"feature dim {record.feature_dim} differs from the first line's "
                            f"{meta.feature_dim}", file=tsv_uri, record=f"image {record.image_id}")
        batch.append(record)
        count += 1
        if len(batch) >= rows_per_shard:
            flush()
    if meta is None:
        raise DataError("no feature lines", file=tsv_uri)
    if batch:
        flush()
    build_index(store_uri)
    return count


def export_tsv(store_uri: str, tsv_uri: str, variant: str = "original") -> int:
    """Store -> one TSV file (atomic), in store order. Returns the number of lines."""
    _fields(variant)
    store = FeatureStore(store_uri)
    count = 0
    with storage.atomic_write(tsv_uri, "w") as f:
        for record in store.iter_records():
            f.write(format_tsv_line(record, variant))
            count += 1
    return count
