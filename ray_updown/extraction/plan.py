"""The extraction plan: every input image's shard, as one Arrow table (never an object per image).

`plan_table` sorts new inputs by URI and cuts them into shards of `rows_per_shard`. The plan is
saved beside the output (`extract_plan.parquet`) on the first run and is the source of truth
afterwards: a re-run keeps every planned image in its shard and gives images that appeared
since then new shards after the last one, so a finished shard never changes meaning (and the
plan stays sorted by shard: a shard is a contiguous range of rows). An image whose URI repeats
an earlier row's, or whose id repeats an earlier accepted row's, becomes an error row (stage
"list"), not a silent duplicate. Each row's position (`row`) identifies it through the pipeline.

Columns: image_id (int64 or string), uri, shard (int32), stage, reason, row (int64) and, when
boxes are given (a manifest's `boxes`, or `boxes_from` a store), given_boxes
(list<list<float32>>: per image a list of [x1, y1, x2, y2] in original pixels, null where the
detector chooses).

Everything is vectorised (Arrow and numpy): duplicates are found by sorting, not by hashing
Python objects, so ten million rows plan in seconds and in about the table's own size.
Workers read their shard's rows from the saved file (`PlanReader`), one row group at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.extraction.inputs import BOXES_TYPE, InputImage, read_parquet_lean
from ray_updown.features.schema import PLAN_FILE

PLAN_ROW_GROUP = 8192  # rows a worker reads to get its shard's rows
_COLUMNS = ("image_id", "uri", "shard", "stage", "reason", "row")


def _id_kind(column: pa.ChunkedArray | pa.Array | pa.Field) -> str:
    return "string" if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) \
        else "int64"


def _strings(n: int) -> pa.Array:
    return pa.repeat(pa.scalar("", pa.string()), n)


def _with_boxes(table: pa.Table, boxes: bool) -> pa.Table:
    if boxes and "given_boxes" not in table.column_names:
        return table.append_column("given_boxes", pa.nulls(table.num_rows, BOXES_TYPE))
    return table


def _run_starts(equal_to_previous: np.ndarray) -> np.ndarray:
    """For sorted values, the index of the first element of each element's run."""
    index = np.arange(len(equal_to_previous))
    return np.maximum.accumulate(np.where(equal_to_previous, 0, index)) if len(index) else index


def _adjacent_equal(values: pa.Array) -> np.ndarray:
    """equal[i]: values[i] == values[i - 1] (values sorted)."""
    n = len(values)
    out = np.zeros(n, dtype=bool)
    if n > 1:
        out[1:] = pc.equal(values.slice(1), values.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return out


def plan_table(inputs: pa.Table, rows_per_shard: int, previous: pa.Table | None = None
               ) -> pa.Table:
    """Shard assignment: the previous plan unchanged, then new URIs (sorted) in new shards."""
    if rows_per_shard < 1:
        raise ConfigError(f"must be >= 1, got {rows_per_shard}", record="rows_per_shard")
    if previous is None or previous.num_rows == 0:
        previous = None
    elif _id_kind(previous.column("image_id")) != _id_kind(inputs.column("image_id")):
        raise DataError("image ids mix integers and strings (the store was started with one "
                        "kind, the inputs give the other); use a manifest or a new output")
    fresh = inputs if previous is None else _not_planned(inputs, previous)
    if not _is_sorted(fresh.column("uri")):  # (listings and most manifests are)
        # Stable: rows of a manifest naming one file twice keep their order.
        fresh = fresh.take(pc.sort_indices(fresh.column("uri")))
    n_prev = previous.num_rows if previous is not None else 0
    first_new = int(pc.max(previous.column("shard")).as_py()) + 1 if previous is not None else 0
    count = fresh.num_rows
    uris = fresh.column("uri")
    # A URI repeated among the new rows: every repeat after the first is an error row.
    dup_uri = _adjacent_equal(uris)
    columns = {
        "image_id": fresh.column("image_id").combine_chunks(), "uri": uris,
        "shard": pa.array(np.arange(count, dtype=np.int32) // np.int32(rows_per_shard)
                          + np.int32(first_new)),
        "stage": _strings(count), "reason": _strings(count),
        "row": pa.array(np.arange(n_prev, n_prev + count, dtype=np.int64))}
    has_boxes = "given_boxes" in fresh.column_names or (
        previous is not None and "given_boxes" in previous.column_names)
    if "given_boxes" in fresh.column_names:
        columns["given_boxes"] = fresh.column("given_boxes").combine_chunks()
    new = _with_boxes(pa.table(columns), has_boxes)
    if dup_uri.any():
        first = _run_starts(dup_uri)
        where = np.flatnonzero(dup_uri)
        ids = new.column("image_id").take(pa.array(first[where])).to_pylist()
        new = _set_reasons(new, where, [f"duplicate uri (already listed as image id {i!r})"
                                        for i in ids])
    plan = new if previous is None else pa.concat_tables(
        [_with_boxes(previous.select(list(_COLUMNS) + (["given_boxes"] if "given_boxes" in
                                                         previous.column_names else [])),
                     has_boxes).cast(new.schema), new])
    return _mark_duplicate_ids(plan)


def _is_sorted(values: pa.ChunkedArray) -> bool:
    n = len(values)
    return n < 2 or not pc.any(pc.less(values.slice(1), values.slice(0, n - 1))).as_py()


def _not_planned(inputs: pa.Table, previous: pa.Table, chunk: int = 1 << 20) -> pa.Table:
    """The inputs whose URI the previous plan does not hold. A re-run of the same inputs is
    recognised without hashing; otherwise the previous URIs are hashed a chunk at a time, so
    the hash table stays small however large the plan."""
    uris, known = inputs.column("uri"), previous.column("uri")
    if len(uris) == len(known) and _is_sorted(uris) and pc.all(pc.equal(uris, known)).as_py():
        return inputs.slice(0, 0)
    planned = np.zeros(len(uris), dtype=bool)
    for start in range(0, len(known), chunk):
        part = known.slice(start, chunk).combine_chunks()
        planned |= pc.is_in(uris, value_set=part).to_numpy(zero_copy_only=False)
    return inputs.filter(pa.array(~planned))


def _set_reasons(table: pa.Table, where: np.ndarray, reasons: list[str]) -> pa.Table:
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[where] = True
    mask = pa.array(mask)
    stage = pc.replace_with_mask(table.column("stage").combine_chunks(), mask,
                                 pa.repeat(pa.scalar("list"), len(where)))
    reason = pc.replace_with_mask(table.column("reason").combine_chunks(), mask,
                                  pa.array(reasons, pa.string()))
    table = table.set_column(table.schema.get_field_index("stage"), "stage", stage)
    return table.set_column(table.schema.get_field_index("reason"), "reason", reason)


def _mark_duplicate_ids(plan: pa.Table) -> pa.Table:
    """An id that an earlier accepted row holds: an error row naming that row's file."""
    accepted = np.flatnonzero(pc.equal(plan.column("reason"), "").to_numpy(zero_copy_only=False))
    if not len(accepted):
        return plan
    ids = plan.column("image_id").combine_chunks()
    if len(accepted) < len(ids):
        ids = ids.take(pa.array(accepted))
    if _id_kind(ids) == "int64":
        values = ids.to_numpy(zero_copy_only=False)
        if len(values) < 2 or (np.diff(values) > 0).all():
            return plan  # increasing: no id twice (COCO and VG file names sort so)
        order = np.argsort(values, kind="stable")
    else:
        order = pc.sort_indices(ids).to_numpy()
    dup = _adjacent_equal(ids.take(pa.array(order)))
    if not dup.any():
        return plan
    first = _run_starts(dup)
    where = np.flatnonzero(dup)
    rows, firsts = accepted[order[where]], accepted[order[first[where]]]
    dup_ids = plan.column("image_id").take(pa.array(rows)).to_pylist()
    first_uris = plan.column("uri").take(pa.array(firsts)).to_pylist()
    return _set_reasons(plan, rows, [f"duplicate image id {i!r} (first at {u})"
                                     for i, u in zip(dup_ids, first_uris)])


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


def save_plan(out_uri: str, plan: pa.Table | list[InputImage]) -> None:
    if isinstance(plan, list):
        plan = objects_to_table(plan)
    with storage.atomic_write(storage.join(out_uri, PLAN_FILE), "wb") as f:
        pq.write_table(plan, f, compression="zstd", row_group_size=PLAN_ROW_GROUP)


def load_plan(out_uri: str) -> pa.Table | None:
    """The saved plan of a store, or None when the store has none yet."""
    uri = storage.join(out_uri, PLAN_FILE)
    if not storage.exists(uri):
        return None
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        table = read_parquet_lean(pa_fs.open_input_file(path),
                                  list(_COLUMNS[:5]) + ["given_boxes", "source"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"unreadable extraction plan ({exc}); delete it to re-plan", file=uri) from None
    if "source" in table.column_names:
        raise ConfigError("the output was planned from tar shards or tables; loose image files "
                          "go to a new output", file=out_uri)
    missing = [c for c in _COLUMNS[:5] if c not in table.column_names]
    if missing:
        raise DataError(f"extraction plan lacks column(s) {missing}; delete it to re-plan", file=uri)
    row = pa.array(np.arange(table.num_rows, dtype=np.int64))
    return table.append_column("row", row).select(
        list(_COLUMNS) + (["given_boxes"] if "given_boxes" in table.column_names else []))


def make_plan(out_uri: str, inputs: pa.Table, rows_per_shard: int
              ) -> tuple[pa.Table | None, pa.Table, int, str]:
    """(the new plan to save, or None when the saved one stands; shard ranges; rows; id type).

    A re-run of the inputs the saved plan was made from (same URIs in the same order: the
    common resume) is recognised by streaming the saved URIs a row group at a time, so the
    driver never holds the saved plan beside the inputs."""
    uri = storage.join(out_uri, PLAN_FILE)
    if storage.exists(uri) and "given_boxes" not in inputs.column_names:
        pa_fs, path = storage.pyarrow_filesystem(uri)
        try:
            file = pq.ParquetFile(pa_fs.open_input_file(path), pre_buffer=False)
            same = _same_uris(file, inputs.column("uri"))
        except (pa.ArrowInvalid, OSError, KeyError):
            same = False  # load_plan below names the problem
        if same:
            shards = pa.concat_tables([file.read_row_group(i, columns=["shard"], use_threads=False)
                                       for i in range(file.num_row_groups)])
            return (None, shard_ranges(shards), shards.num_rows,
                    _id_kind(file.schema_arrow.field("image_id")))
    plan = plan_table(inputs, rows_per_shard, load_plan(out_uri))
    return plan, shard_ranges(plan), plan.num_rows, _id_kind(plan.column("image_id"))


def _same_uris(file: pq.ParquetFile, uris: pa.ChunkedArray) -> bool:
    if file.metadata.num_rows != len(uris) or "given_boxes" in file.schema_arrow.names:
        return False
    start = 0
    for i in range(file.num_row_groups):
        saved = file.read_row_group(i, columns=["uri"], use_threads=False).column("uri")
        if not pc.all(pc.equal(saved, uris.slice(start, len(saved)))).as_py():
            return False
        start += len(saved)
    return True


def shard_ranges(plan: pa.Table) -> pa.Table:
    """One row per shard: shard, first_row, num_rows (the plan is sorted by shard)."""
    shards = plan.column("shard").to_numpy()
    if len(shards) > 1 and (np.diff(shards) < 0).any():
        raise DataError("the extraction plan is not in shard order; delete it to re-plan")
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else \
        np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(shards)])
    return pa.table({"shard": pa.array(shards[starts], pa.int32()),
                     "first_row": pa.array(starts, pa.int64()),
                     "num_rows": pa.array(counts, pa.int64())})


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
        return table.drop_columns(["row"]).append_column(
            "row", pa.array(np.arange(first, end, dtype=np.int64)))


def join_boxes_from(inputs: pa.Table, store_uri: str) -> pa.Table:
    """`inputs` with given_boxes: each image's `boxes` in the feature store at `store_uri`
    (null where the store has no row for the image: the detector chooses there)."""
    from ray_updown.features.schema import FEATURES_DIR, list_shards

    folder = storage.join(store_uri, FEATURES_DIR)
    files = [part.uri for part in list_shards(store_uri, FEATURES_DIR)]
    if not files:
        raise DataError("no feature shards to take boxes from", file=folder)
    parts = []
    for uri in files:
        pa_fs, path = storage.pyarrow_filesystem(uri)
        try:
            part = pq.read_table(path, filesystem=pa_fs, columns=["image_id", "boxes"])
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise DataError(f"cannot read image_id and boxes ({exc})", file=uri) from None
        parts.append(pa.table({"image_id": part.column("image_id"),
                               "boxes": pc.cast(part.column("boxes"), BOXES_TYPE)}))
    source = pa.concat_tables(parts)
    if _id_kind(source.column("image_id")) != _id_kind(inputs.column("image_id")):
        raise DataError(f"the store's image ids are {_id_kind(source.column('image_id'))}, the "
                        f"inputs' {_id_kind(inputs.column('image_id'))}", file=store_uri)
    where = pc.index_in(inputs.column("image_id"), value_set=source.column("image_id"))
    boxes = source.column("boxes").take(where)
    if "given_boxes" in inputs.column_names:
        inputs = inputs.drop_columns(["given_boxes"])
    return inputs.append_column("given_boxes", boxes)
