"""The extraction plan of loose image files: every input image's shard, saved beside the store.

The plan is built by streaming the inputs (plan_build.py) and saved beside the output
(`extract_plan.parquet`) on the first run; it is the source of truth afterwards: a re-run
keeps every planned image in its shard and gives images that appeared since then new shards
after the last one, in input order, so a finished shard never changes meaning (and the plan
stays sorted by shard: a shard is a contiguous range of rows). An image whose URI repeats an
earlier row's, or whose id repeats an earlier accepted row's, becomes an error row (stage
"list"), not a silent duplicate; the first row in input order is kept. Each row's position
(`row`) identifies it through the pipeline.

Columns: image_id (int64 or string), uri, shard (int32), stage, reason, row (int64) and, when
boxes are given (a manifest's `boxes`, or `boxes_from` a store), given_boxes
(list<list<float32>>: per image a list of [x1, y1, x2, y2] in original pixels, null where the
detector chooses).

Workers read their shard's rows from the saved file (`PlanReader`), one row group at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.extraction.inputs import BOXES_TYPE, InputImage
from ray_updown.extraction.plan_build import (
    FILE_COLUMNS,
    PLAN_COLUMNS,
    PLAN_ROW_GROUP,
    SIZE_TYPE,
    BuiltPlan,
    Inputs,
    NewPlan,
    RangeBuilder,
    build_plan,
    id_kind,
    saved_batches,
)
from ray_updown.features.schema import PLAN_FILE


def plan_table(inputs: pa.Table, rows_per_shard: int, previous: pa.Table | None = None
               ) -> pa.Table:
    """The plan of `inputs` as a table (small uses and tests; runs stream: `make_plan`)."""
    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if previous is not None and previous.num_rows:
            pq.write_table(previous, os.path.join(folder, "previous.parquet"))
            saved = pq.ParquetFile(os.path.join(folder, "previous.parquet"))
        new = build_plan(lambda: [inputs], rows_per_shard, saved).new
        if new is None:
            return previous
        with new.folder:
            return pq.read_table(new.path)


def objects_to_table(plan: list[InputImage]) -> pa.Table:
    """A plan given as objects (small uses, tests) as the plan table."""
    kind = pa.string() if any(isinstance(p.image_id, str) for p in plan) else pa.int64()
    return pa.table({
        "image_id": pa.array([p.image_id for p in plan], type=kind),
        "uri": pa.array([p.uri for p in plan], type=pa.string()),
        "shard": pa.array([p.shard for p in plan], type=pa.int32()),
        "stage": pa.array([p.stage for p in plan], type=pa.string()),
        "reason": pa.array([p.reason for p in plan], type=pa.string()),
        "row": pa.array(range(len(plan)), type=pa.int64())})


def save_plan(out_uri: str, plan: pa.Table | list[InputImage] | NewPlan) -> None:
    """The plan beside the store, written atomically (a NewPlan's file is copied and removed)."""
    uri = storage.join(out_uri, PLAN_FILE)
    if isinstance(plan, NewPlan):
        with plan.folder, open(plan.path, "rb") as source, storage.atomic_write(uri, "wb") as f:
            shutil.copyfileobj(source, f, 1 << 22)
        return
    if isinstance(plan, list):
        plan = objects_to_table(plan)
    with storage.atomic_write(uri, "wb") as f:
        pq.write_table(plan, f, compression="zstd", row_group_size=PLAN_ROW_GROUP)


def open_plan_file(out_uri: str) -> pq.ParquetFile | None:
    """The store's saved plan, of any kind, opened (footer only); None when it has none."""
    uri = storage.join(out_uri, PLAN_FILE)
    if not storage.exists(uri):
        return None
    try:
        return storage.open_parquet(uri)
    except DataError as exc:
        raise DataError(f"unreadable extraction plan ({exc.problem}); delete it to re-plan",
                        file=uri) from None


def open_saved_plan(out_uri: str) -> pq.ParquetFile | None:
    """The store's saved plan of loose files, opened; None when it has none."""
    file = open_plan_file(out_uri)
    if file is None:
        return None
    names = file.schema_arrow.names
    if "source" in names:
        raise ConfigError("the output was planned from tar shards or tables; loose image files "
                          "go to a new output", file=out_uri)
    missing = [c for c in PLAN_COLUMNS[:5] if c not in names]
    if missing:
        raise DataError(f"extraction plan lacks column(s) {missing}; delete it to re-plan",
                        file=storage.join(out_uri, PLAN_FILE))
    return file


def load_plan(out_uri: str) -> pa.Table | None:
    """The saved plan of a store as a table (small uses and tests), or None."""
    file = open_saved_plan(out_uri)
    if file is None:
        return None
    table = pa.concat_tables(saved_batches(file, list(PLAN_COLUMNS[:5]) + ["given_boxes", *FILE_COLUMNS]))
    row = pa.array(np.arange(table.num_rows, dtype=np.int64))
    return table.append_column("row", row).select(
        list(PLAN_COLUMNS) + [c for c in ("given_boxes", *FILE_COLUMNS) if c in table.column_names])


def make_plan(out_uri: str, inputs: Inputs, rows_per_shard: int, settings: dict | None = None,
              redo_changed: bool = False) -> BuiltPlan:
    """`build_plan` of the inputs against the store's saved plan, if any (plan_build.py)."""
    return build_plan(inputs, rows_per_shard, open_saved_plan(out_uri), settings, redo_changed)


def shard_ranges(plan: pa.Table) -> pa.Table:
    """One row per shard: shard, first_row, num_rows (the plan is sorted by shard)."""
    ranges = RangeBuilder()
    ranges.add(plan.column("shard").to_numpy())
    return ranges.table()


class PlanReader:
    """A worker's view of the saved plan: the rows of one shard, reading only the row groups
    that hold them (the last ones read are kept: neighbouring shards share groups)."""

    def __init__(self, out_uri: str):
        self.uri = storage.join(out_uri, PLAN_FILE)
        pa_fs, path = storage.pyarrow_filesystem(self.uri)
        try:
            self.file = pq.ParquetFile(pa_fs.open_input_file(path))
        except FileNotFoundError:
            raise StorageError("no such file (the plan is written before any worker starts; "
                               "was the output deleted mid-run?)", file=self.uri) from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"cannot read the extraction plan ({exc})", file=self.uri) from None
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = np.r_[0, np.cumsum(sizes)]
        self.cached: dict[int, pa.Table] = {}

    def rows(self, first: int, count: int) -> pa.Table:
        end = first + count
        if end > self.starts[-1]:
            raise DataError(f"plan rows {first}..{end - 1} asked, the plan holds "
                            f"{self.starts[-1]} (was it re-planned mid-run?)", file=self.uri)
        groups = range(int(np.searchsorted(self.starts, first, "right")) - 1,
                       int(np.searchsorted(self.starts, end, "left")))
        tables = []
        for g in groups:
            if g not in self.cached:
                self.cached = {k: v for k, v in self.cached.items() if k >= g - 1}
                self.cached[g] = self.file.read_row_group(g)
            tables.append(self.cached[g])
        table = pa.concat_tables(tables).slice(first - int(self.starts[groups[0]]), count)
        rows = pa.array(np.arange(first, end, dtype=np.int64))
        if "row" not in table.column_names:  # (plans written before it was saved)
            return table.append_column("row", rows)
        return table.set_column(table.schema.get_field_index("row"), "row", rows)


def boxes_of_store(store_uri: str) -> pa.Table:
    """image_id, boxes of every feature row of the store at `store_uri` (`boxes_from`)."""
    from ray_updown.features.schema import FEATURES_DIR, list_shards

    folder = storage.join(store_uri, FEATURES_DIR)
    files = [part.uri for part in list_shards(store_uri, FEATURES_DIR)]
    if not files:
        raise DataError("no feature shards to take boxes from", file=folder)
    parts = []
    for uri in files:
        pa_fs, path = storage.pyarrow_filesystem(uri)
        try:
            part = pq.read_table(path, filesystem=pa_fs,
                                 columns=["image_id", "boxes", "image_w", "image_h"])
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise DataError(f"cannot read image_id, boxes and image size ({exc})", file=uri) from None
        size = _sizes(part)
        parts.append(pa.table({"image_id": part.column("image_id"),
                               "boxes": pc.cast(part.column("boxes"), BOXES_TYPE), "size": size}))
    return pa.concat_tables(parts)


def _sizes(part: pa.Table) -> pa.Array:
    """[w, h] per row (list<int32>)."""
    w = part.column("image_w").to_numpy().astype(np.int32)
    h = part.column("image_h").to_numpy().astype(np.int32)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.stack([w, h], 1).reshape(-1)), 2).cast(SIZE_TYPE)


def join_boxes(inputs: pa.Table, source: pa.Table, store_uri: str, fallback: bool = False
               ) -> tuple[pa.Table, int]:
    """(`inputs` with given_boxes: each image's `boxes` in `source` (boxes_of_store), the
    number of images the store has no row for). Those are error rows (a `reason` column,
    stage "boxes" in the plan) unless `fallback`: then their given_boxes are null and the
    detector chooses."""
    if id_kind(source.column("image_id")) != id_kind(inputs.column("image_id")):
        raise DataError(f"the store's image ids are {id_kind(source.column('image_id'))}, the "
                        f"inputs' {id_kind(inputs.column('image_id'))}", file=store_uri)
    if "given_boxes" in inputs.column_names:
        raise ConfigError("the manifest gives boxes (its boxes column) and boxes_from gives "
                          "others: use one of them", file=store_uri, record="boxes_from")
    where = pc.index_in(inputs.column("image_id"), value_set=source.column("image_id"))
    missing = int(where.null_count)
    inputs = inputs.append_column("given_boxes", source.column("boxes").take(where))
    inputs = inputs.append_column("given_size", source.column("size").take(where))
    if missing and not fallback:
        reason = pc.if_else(pc.is_null(where), f"no boxes for this id in {store_uri} "
                            "(boxes_fallback=true lets the detector choose)", "")
        inputs = inputs.append_column("reason", reason)
    return inputs, missing
