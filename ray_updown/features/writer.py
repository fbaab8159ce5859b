"""Writing region features and errors as atomic Parquet shards.

A producer (the extraction actors, the TSV importer) builds one `FeatureRecord` per image
(records.py) and hands a shard's worth to `write_feature_shard(records,
feature_shard_uri(store, n), meta)`, or an Arrow table to `write_feature_table`. The layout
is documented in `schema.py`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import DataError
from ray_updown.features.records import DecodedRows, FeatureRecord, records_to_table
from ray_updown.features.schema import (
    ERRORS_DIR,
    FEATURES_DIR,
    StoreMeta,
    error_schema,
    feature_schema,
    shard_name,
)

# A row group is the unit a random-access read decodes: ~1 MiB of raw features keeps a
# lookup cheap (D=2048, 50 boxes -> 5 images a group) while tiny rows still batch up to 64.
DEFAULT_ROW_GROUP_BYTES = 1 << 20
MAX_ROW_GROUP_ROWS = 64


def feature_shard_uri(store_uri: str, shard: int) -> str:
    return storage.join(store_uri, FEATURES_DIR, shard_name(shard))


def error_shard_uri(store_uri: str, shard: int) -> str:
    return storage.join(store_uri, ERRORS_DIR, shard_name(shard))


def _row_group_rows(num_boxes: np.ndarray, feature_dim: int,
                    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> int:
    """Rows per Parquet row group so that one group holds ~row_group_bytes of raw features."""
    if not len(num_boxes):
        return MAX_ROW_GROUP_ROWS
    mean_bytes = float(np.mean(num_boxes)) * feature_dim * 2 + 64
    return int(np.clip(row_group_bytes // max(mean_bytes, 1), 1, MAX_ROW_GROUP_ROWS))


def _write_parquet_atomic(table: pa.Table, uri: str, row_group_rows: int) -> None:
    with storage.atomic_write(uri, "wb") as f:
        # No dictionaries (floats do not repeat), zstd (~2x on ReLU-sparse halfs),
        # statistics only where a reader could prune by them.
        pq.write_table(table, f, row_group_size=max(1, row_group_rows), compression="zstd",
                       use_dictionary=False, write_statistics=["image_id", "num_boxes"])


def write_feature_shard(records: Sequence[FeatureRecord], uri: str, meta: StoreMeta,
                        row_group_rows: int | None = None,
                        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> int:
    """Write one feature shard of records atomically (write_feature_table, the one path).
    `uri` is the shard file, normally `feature_shard_uri(store, n)`. Returns the row count."""
    return write_feature_table(records_to_table(records, meta), uri, meta, row_group_bytes,
                               row_group_rows)


def write_feature_table(table: pa.Table, uri: str, meta: StoreMeta,
                        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
                        row_group_rows: int | None = None) -> int:
    """Write one feature shard atomically (the file appears only when complete) from an Arrow
    table with the store's columns (as `records_to_table` makes them; nullability aside).
    Checks the schema and that every per-box column has num_boxes entries. Row groups hold
    ~row_group_bytes of features unless `row_group_rows` is given. Returns the row count."""
    schema = feature_schema(meta)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise DataError(f"feature table lacks column(s) {missing}", file=uri)
    try:
        table = pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema],
                                     schema=schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"feature table does not fit the store's schema ({exc})", file=uri) from None
    if table.num_rows:
        DecodedRows(table.slice(0, min(table.num_rows, 64)), file=uri)  # per-box counts agree
    counts = table.column("num_boxes").to_numpy() if table.num_rows else np.zeros(0)
    _write_parquet_atomic(table, uri, row_group_rows or _row_group_rows(counts, meta.feature_dim,
                                                                        row_group_bytes))
    return table.num_rows


ERROR_FIELDS = ("image_id", "uri", "stage", "reason")


SHARD_SAMPLES_KEY = b"shard_samples"  # samples a container shard held (its plan cannot say)
SHARD_SKIPPED_KEY = b"shard_skipped"  # of them, skipped as failed downloads


def write_error_table(table: pa.Table, uri: str, image_id_type: str,
                      samples: int | None = None, skipped: int = 0) -> int:
    """Write one errors shard atomically from an Arrow table (image_id, uri, stage, reason).
    `samples` and `skipped` (a container's shard: a tar or row groups) go into its footer,
    where the driver's accounting reads them (extraction/shards.py)."""
    schema = error_schema(image_id_type)
    if samples is not None:
        schema = schema.with_metadata({**schema.metadata, SHARD_SAMPLES_KEY: str(samples).encode(),
                                       SHARD_SKIPPED_KEY: str(skipped).encode()})
    try:
        table = pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema],
                                     schema=schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"error table does not fit the errors schema ({exc})", file=uri) from None
    _write_parquet_atomic(table, uri, 4096)
    return table.num_rows


def write_error_shard(rows: Sequence[Mapping[str, Any]], uri: str,
                      image_id_type: str | None = None) -> int:
    """Write one errors shard atomically from rows of image_id (may be None), uri, stage and
    reason (write_error_table, the one path); the id type is inferred when not given."""
    for n, row in enumerate(rows):
        missing = [k for k in ERROR_FIELDS if k not in row]
        if missing:
            raise DataError(f"error row lacks {', '.join(missing)}", file=uri, record=f"row {n}")
    ids = [row["image_id"] for row in rows]
    if image_id_type is None:
        image_id_type = "string" if any(isinstance(i, str) for i in ids) else "int64"
    if image_id_type == "string":
        ids = [None if i is None else str(i) for i in ids]
    columns = {"image_id": pa.array(ids, type=error_schema(image_id_type).field("image_id").type)}
    columns.update({k: pa.array([None if row[k] is None else str(row[k]) for row in rows],
                                type=pa.string()) for k in ERROR_FIELDS[1:]})
    return write_error_table(pa.table(columns), uri, image_id_type)
