"""Building the plan of loose image files in memory that does not depend on how many there are.

`build_plan` streams the inputs (a listing or a manifest, as Arrow batches) twice and writes
the plan to a local file as it goes; the driver never holds more than one batch, the shard
bookkeeping (one row per shard) and a bit per input row:

1. Spilling: every row's URI and id go to spill buckets (dedupe.py). Then, bucket by bucket:
   an input whose URI a row of the previous plan holds is already planned (dropped); one
   whose URI an earlier input holds is a duplicate (an error row naming the row it repeats);
   among the rows still accepted, a repeated id is an error row naming the kept row (the
   first in input order) and its file.
2. Writing: the previous plan's rows unchanged, then the new rows in input order, numbered
   on and cut into new shards of `rows_per_shard` after its last shard.

A re-run of the same inputs (the same URIs in the same order, the common resume) is seen in
one streamed comparison and changes nothing.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown.errors import ConfigError, DataError
from ray_updown.extraction.dedupe import Buckets, row_prints
from ray_updown.extraction.inputs import BOXES_TYPE
from ray_updown.extraction.plan_settings import check_settings, settings_metadata

PLAN_ROW_GROUP = 8192  # rows a worker reads to get its shard's rows
PLAN_COLUMNS = ("image_id", "uri", "shard", "stage", "reason", "row")
Inputs = Callable[[], Iterable[pa.Table]]  # a fresh stream of input batches at each call


@dataclass
class NewPlan:
    """A plan `build_plan` wrote to a local file (saved beside the store by plan.save_plan)."""

    path: str
    folder: tempfile.TemporaryDirectory


def id_kind(column: pa.ChunkedArray | pa.Array | pa.Field | pa.DataType) -> str:
    kind = column if isinstance(column, pa.DataType) else column.type
    return "string" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else "int64"


class RangeBuilder:
    """One row per shard (shard, first_row, num_rows) from a shard column seen in pieces."""

    def __init__(self):
        self.shards: list[int] = []
        self.firsts: list[int] = []
        self.counts: list[int] = []
        self.rows = 0

    def add(self, shards: np.ndarray) -> None:
        if not len(shards):
            return
        if (self.shards and shards[0] < self.shards[-1]) or (np.diff(shards) < 0).any():
            raise DataError("the extraction plan is not in shard order; delete it to re-plan")
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        counts = np.diff(np.r_[starts, len(shards)])
        for start, count in zip(starts.tolist(), counts.tolist()):
            shard = int(shards[start])
            if self.shards and self.shards[-1] == shard:
                self.counts[-1] += count
            else:
                self.shards.append(shard)
                self.firsts.append(self.rows + start)
                self.counts.append(count)
        self.rows += len(shards)

    def table(self) -> pa.Table:
        return pa.table({"shard": pa.array(self.shards, pa.int32()),
                         "first_row": pa.array(self.firsts, pa.int64()),
                         "num_rows": pa.array(self.counts, pa.int64())})


def saved_batches(previous: pq.ParquetFile | None, columns: list[str]) -> Iterator[pa.Table]:
    if previous is None:
        return
    names = previous.schema_arrow.names
    for g in range(previous.num_row_groups):
        yield previous.read_row_group(g, columns=[c for c in columns if c in names], use_threads=False)


@dataclass
class BuiltPlan:
    """What `build_plan` gives: the new plan (None when the saved one stands), one row per
    shard, the plan's rows, the id type, and the shards to redo (their rows or the settings
    changed since they were written; redo_changed)."""

    new: NewPlan | None
    ranges: pa.Table
    rows: int
    kind: str
    redo_shards: np.ndarray


def build_plan(inputs: Inputs, rows_per_shard: int, previous: pq.ParquetFile | None = None,
               settings: dict | None = None, redo_changed: bool = False) -> BuiltPlan:
    """See the module docstring. `settings`: the decode and model settings the features
    depend on, kept in the plan; a re-run with others, or whose inputs changed for rows
    already planned, is refused unless `redo_changed`."""
    if rows_per_shard < 1:
        raise ConfigError(f"must be >= 1, got {rows_per_shard}", record="rows_per_shard")
    n_prev = previous.metadata.num_rows if previous is not None else 0
    new_settings = check_settings(previous.schema_arrow.metadata if n_prev else None, settings,
                                  redo_changed)
    file_columns = _file_columns(inputs, previous)
    if n_prev and not new_settings and _same_inputs(previous, inputs(), file_columns):
        ranges = _saved_ranges(previous)
        return BuiltPlan(None, ranges.table(), ranges.rows,
                         id_kind(previous.schema_arrow.field("image_id")), np.zeros(0, np.int64))
    folder = tempfile.TemporaryDirectory(prefix="ray-updown-plan-")
    kind = id_kind(previous.schema_arrow.field("image_id")) if n_prev else None
    uris, ids = Buckets(folder.name, "uri"), Buckets(folder.name, "id")
    rows, kind, boxes = _spill(inputs, previous, uris, ids, kind, ("image_id", "given_boxes") + file_columns)
    dropped, uri_firsts, changed = _split_repeats(uris.repeats(), n_prev)
    replacements = _replacements(inputs, changed, n_prev, redo_changed)
    excluded = np.zeros(rows - n_prev, bool)  # a bit per input row: dropped or a repeated URI
    excluded[dropped - n_prev] = True
    dropped = excluded.copy()
    excluded[np.fromiter(uri_firsts, np.int64, len(uri_firsts)) - n_prev] = True
    id_rows, id_firsts, _ = ids.repeats(excluded, n_prev)
    keep = id_rows >= n_prev
    id_repeats = dict(zip(id_rows[keep].tolist(), id_firsts[keep].tolist()))
    boxes = boxes or (previous is not None and "given_boxes" in previous.schema_arrow.names)
    path = os.path.join(folder.name, "plan.parquet")
    schema = _plan_schema(kind, boxes, file_columns, settings)
    ranges, redo = _write(path, schema, inputs, previous, rows_per_shard, dropped, uri_firsts,
                          id_repeats, replacements)
    if new_settings:
        redo = np.array(_saved_ranges(previous).shards, np.int64)
    return BuiltPlan(NewPlan(path, folder), ranges.table(), ranges.rows, kind, redo)


FILE_COLUMNS = ("size", "version")  # what a listing says of a file: replaced files differ
SIZE_TYPE = pa.list_(pa.int32())  # given_size: [w, h] of the image in the boxes_from store


def _file_columns(inputs: Inputs, previous: pq.ParquetFile | None) -> tuple[str, ...]:
    """FILE_COLUMNS where both the inputs (a listing) and the saved plan hold them: a manifest,
    or a plan written before they were kept, says nothing of the files."""
    first = next(iter(inputs()), None)
    have = set(first.column_names) if first is not None else set()
    if previous is not None:
        have &= set(previous.schema_arrow.names)
    return FILE_COLUMNS if set(FILE_COLUMNS) <= have else ()


def _saved_ranges(previous: pq.ParquetFile) -> RangeBuilder:
    """The shards of a saved plan, from its shard column a row group at a time."""
    ranges = RangeBuilder()
    for part in saved_batches(previous, ["shard"]):
        ranges.add(part.column("shard").to_numpy())
    return ranges


def _same_inputs(previous: pq.ParquetFile, batches: Iterable[pa.Table],
                 file_columns: tuple[str, ...]) -> bool:
    """Whether the inputs are the saved plan's rows in the same order: the same URIs (and
    sizes and versions, where both have them), and no boxes."""
    if "given_boxes" in previous.schema_arrow.names:
        return False
    saved = saved_batches(previous, ["uri", *file_columns])
    pending: pa.Table | None = None
    for batch in batches:
        if "given_boxes" in batch.column_names or "reason" in batch.column_names:
            return False
        names = ["uri"] + [c for c in file_columns if c in batch.column_names]
        while pending is None or pending.num_rows < batch.num_rows:
            part = next(saved, None)
            if part is None:
                return False
            pending = part if pending is None else pa.concat_tables([pending, part])
        for name in names:
            if not pc.all(pc.equal(pending.column(name).slice(0, batch.num_rows),
                                   batch.column(name))).as_py():
                return False
        pending = pending.slice(batch.num_rows)
    return (pending is None or pending.num_rows == 0) and next(saved, None) is None


def _check_kind(batch: pa.Table, kind: str | None) -> str:
    mine = id_kind(batch.column("image_id"))
    if kind is not None and mine != kind:
        raise DataError("image ids mix integers and strings (the store was started with one "
                        "kind, the inputs give the other); use a manifest or a new output")
    return mine


def _spill(inputs: Inputs, previous, uris: Buckets, ids: Buckets, kind: str | None,
           print_columns: tuple[str, ...]) -> tuple[int, str, bool]:
    """Pass 1: every row's URI (with a print of what else determines its features) and id
    into the spill buckets (of the previous plan's rows, only the accepted ones' ids).
    (rows, id kind, whether any input gives boxes)."""
    row, boxes = 0, False
    for part in saved_batches(previous, ["uri", "reason", *print_columns]):
        numbers = np.arange(row, row + part.num_rows)
        uris.add(numbers, part.column("uri"), row_prints(part, print_columns))
        accepted = pc.equal(part.column("reason"), "").to_numpy(zero_copy_only=False)
        ids.add(numbers[accepted], part.column("image_id").filter(pa.array(accepted)))
        row += part.num_rows
    for batch in inputs():
        kind = _check_kind(batch, kind)
        boxes = boxes or "given_boxes" in batch.column_names
        numbers = np.arange(row, row + batch.num_rows)
        uris.add(numbers, batch.column("uri"), row_prints(batch, print_columns))
        ids.add(numbers, batch.column("image_id"))
        row += batch.num_rows
    return row, kind or "int64", boxes


def _split_repeats(repeats, n_prev: int) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """(input rows already in the previous plan, {duplicate input row: the row it repeats},
    {previous row: the input row that changes it}: same URI, another id, boxes or file)."""
    rows, firsts, differs = repeats
    new = rows >= n_prev
    rows, firsts, differs = rows[new], firsts[new], differs[new]
    planned = firsts < n_prev
    changed = planned & differs
    # The first input naming a changed row changes it (a later one repeats a planned row).
    prev, first_input = np.unique(firsts[changed], return_index=True)
    return (rows[planned], dict(zip(rows[~planned].tolist(), firsts[~planned].tolist())),
            dict(zip(prev.tolist(), rows[changed][first_input].tolist())))


def _replacements(inputs: Inputs, changed: dict[int, int], n_prev: int, redo: bool
                  ) -> dict[int, dict]:
    """{previous row: the input row's values} for the changed rows; without `redo`, the one
    line that refuses them."""
    if not changed:
        return {}
    wanted = changed if redo else dict(sorted(changed.items(), key=lambda kv: kv[1])[:5])
    by_input = {i: p for p, i in wanted.items()}
    found, row = {}, n_prev
    for batch in inputs():
        numbers = np.arange(row, row + batch.num_rows)
        hit = np.flatnonzero(np.isin(numbers, np.fromiter(by_input, np.int64, len(by_input))))
        for i, values in zip(hit.tolist(), batch.take(pa.array(hit)).to_pylist()):
            found[by_input[int(numbers[i])]] = values
        row += batch.num_rows
    if not redo:
        ids = ", ".join(repr(v["image_id"]) for v in found.values())
        raise ConfigError(
            f"{len(changed)} image(s) this store already planned changed since (another id, "
            f"other boxes, or the file replaced: size or version differ), e.g. ids {ids}: write "
            "to a new --out, or re-run with redo_changed=true to redo exactly the shards that "
            "hold them")
    return found


def _plan_schema(kind: str, boxes: bool, file_columns: tuple[str, ...],
                 settings: dict | None) -> pa.Schema:
    fields = [("image_id", pa.string() if kind == "string" else pa.int64()), ("uri", pa.string()),
              ("shard", pa.int32()), ("stage", pa.string()), ("reason", pa.string()),
              ("row", pa.int64())]
    fields += [("given_boxes", BOXES_TYPE), ("given_size", SIZE_TYPE)] if boxes else []
    fields += [(c, pa.int64() if c == "size" else pa.string()) for c in file_columns]
    return pa.schema(fields, metadata=settings_metadata(settings))


def _write(path: str, schema: pa.Schema, inputs: Inputs, previous, rows_per_shard: int,
           dropped: np.ndarray, uri_firsts: dict[int, int], id_firsts: dict[int, int],
           replacements: dict[int, dict]) -> tuple[RangeBuilder, np.ndarray]:
    """Pass 2: the previous rows (those in `replacements` with their new values), then the
    new ones, into the plan file. (shards, the shards whose rows were replaced)."""
    ranges = RangeBuilder()
    kept = _Kept(set(uri_firsts.values()) | set(id_firsts.values()), set(uri_firsts) | set(id_firsts))
    n_prev = previous.metadata.num_rows if previous is not None else 0
    redo: set[int] = set()
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        row = 0
        for part in saved_batches(previous, list(schema.names)):
            part = _conform(part, schema, np.arange(row, row + part.num_rows), replacements, redo)
            kept.note(part, row)
            ranges.add(part.column("shard").to_numpy())
            writer.write_table(part, row_group_size=PLAN_ROW_GROUP)
            row += part.num_rows
        first_shard = (ranges.shards[-1] + 1) if ranges.shards else 0
        source_row, written = n_prev, n_prev
        for batch in inputs():
            rows = np.arange(source_row, source_row + batch.num_rows)
            keep = ~dropped[source_row - n_prev: source_row - n_prev + batch.num_rows]
            batch, rows = batch.filter(pa.array(keep)), rows[keep]
            kept.note(batch, source_row, rows)  # (a kept row may be in this batch)
            stage, reason = _reasons(batch, rows, kept, uri_firsts, id_firsts, n_prev)
            numbers = np.arange(written, written + batch.num_rows)
            shards = (first_shard + (numbers - n_prev) // rows_per_shard).astype(np.int32)
            columns = {"shard": pa.array(shards), "stage": stage, "reason": reason,
                       "row": pa.array(numbers, pa.int64())}
            table = pa.table({name: columns[name] if name in columns else (
                batch.column(name) if name in batch.column_names else pa.nulls(batch.num_rows, f.type))
                for name, f in zip(schema.names, schema)}).cast(schema)
            ranges.add(shards)
            writer.write_table(table, row_group_size=PLAN_ROW_GROUP)
            source_row += len(keep)
            written += batch.num_rows
    return ranges, np.array(sorted(redo), np.int64)


def _conform(part: pa.Table, schema: pa.Schema, rows: np.ndarray, replacements: dict[int, dict],
             redo: set[int]) -> pa.Table:
    """A saved plan's rows in the schema of the plan being written, the replaced ones with
    their new values (and their shards noted in `redo`)."""
    columns = {name: part.column(name) if name in part.column_names else pa.nulls(part.num_rows, f.type)
               for name, f in zip(schema.names, schema)}
    columns["row"] = pa.array(rows, pa.int64())
    table = pa.table(columns).cast(schema)
    hits = [i for i, r in enumerate(rows.tolist()) if r in replacements]
    if not hits:
        return table
    records = table.to_pylist()
    for i in hits:
        new = replacements[int(rows[i])]
        records[i].update({k: new.get(k) for k in ("image_id", "given_boxes", *FILE_COLUMNS)
                           if k in schema.names}, stage="", reason="")
        redo.add(records[i]["shard"])
    return pa.Table.from_pylist(records, schema=schema)


class _Kept:
    """The id and URI of each row another row repeats (kept rows come before their repeats,
    so they are noted as the rows stream by)."""

    def __init__(self, wanted: set[int], repeats: set[int]):
        self.wanted = np.array(sorted(wanted), np.int64)
        self.repeats = np.array(sorted(repeats), np.int64)  # the rows that repeat one of them
        self.values: dict[int, tuple] = {}

    def note(self, table: pa.Table, first: int, rows: np.ndarray | None = None) -> None:
        rows = np.arange(first, first + table.num_rows) if rows is None else rows
        hit = np.flatnonzero(np.isin(rows, self.wanted))
        if len(hit):
            ids = table.column("image_id").take(pa.array(hit)).to_pylist()
            uris = table.column("uri").take(pa.array(hit)).to_pylist()
            self.values.update(zip(rows[hit].tolist(), zip(ids, uris)))


def _where(row: int, n_prev: int) -> str:
    return f"input row {row - n_prev + 1}" if row >= n_prev else "planned by an earlier run"


def _reasons(batch: pa.Table, rows: np.ndarray, kept: _Kept, uri_firsts: dict[int, int],
             id_firsts: dict[int, int], n_prev: int) -> tuple[pa.Array, pa.Array]:
    """Stage and reason of each new row: "" but for duplicates ("list") and the reasons the
    inputs give (stage "boxes": an image boxes_from has no boxes for)."""
    if "reason" in batch.column_names:
        reason = batch.column("reason").combine_chunks().cast(pa.string())
        stage = pc.if_else(pc.equal(reason, ""), "", "boxes")
    else:
        reason = stage = pa.repeat(pa.scalar("", pa.string()), len(rows))
    hits = np.flatnonzero(np.isin(rows, kept.repeats)) if len(kept.repeats) else []
    if not len(hits):
        return stage, reason
    texts = []
    for i in hits:
        row = int(rows[i])
        if row in uri_firsts:
            first = uri_firsts[row]
            image_id = kept.values.get(first, (None, None))[0]
            texts.append(f"duplicate uri (already listed as image id {image_id!r}, {_where(first, n_prev)})")
        else:
            first = id_firsts[row]
            uri = kept.values.get(first, (None, None))[1]
            texts.append(f"duplicate image id {batch.column('image_id')[int(i)].as_py()!r} (the "
                         f"first, {_where(first, n_prev)}, is kept: {uri})")
    mask = np.zeros(len(rows), bool)
    mask[hits] = True
    mask = pa.array(mask)
    return (pc.replace_with_mask(stage, mask, pa.repeat(pa.scalar("list"), len(hits))),
            pc.replace_with_mask(reason, mask, pa.array(texts, pa.string())))
