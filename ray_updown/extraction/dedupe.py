"""Repeated values among any number of rows, in memory that does not grow with them.

The planner must find, among up to hundreds of millions of rows, the URIs and ids that an
earlier row already holds. Holding every value (or a hash table of them) would cost memory
linear in the rows; instead each row's number and value go to one of `buckets` Arrow spill
files on local disk, chosen by the value's hash, as the rows stream by, and `repeats` then
reads one bucket at a time: equal values have equal hashes, so they meet in one bucket, where
a sort by (value, row) puts every repeat right after the first row of its value. The values
themselves are compared, so a hash collision costs nothing but balance.

`value_hashes` hashes an Arrow string column with numpy alone (a few 8-byte words of each
value through a 64-bit mixer); integer ids are mixed directly.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit."""
    h = h.copy()
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _string_hashes(values: pa.Array) -> np.ndarray:
    """A hash of each string's length and four 8-byte words of it: its last three and one at
    its middle. Equal strings read the same words, so they hash alike; the values themselves
    are compared later, so the hash needs only to spread them over the buckets (URIs differ
    at their end: the number, then the suffix)."""
    values = values.cast(pa.large_string())
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], np.int64)[values.offset: values.offset + n + 1]
    data = values.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    empty = lengths == 0
    last = np.where(empty, 0, ends - 1)
    first = np.where(empty, 0, starts)
    h = lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for anchor in (ends - 8, ends - 16, ends - 24, starts + lengths // 2 - 4):
        word = np.zeros(n, np.uint64)
        for k in range(8):
            byte = data[np.clip(anchor + k, first, last)] if len(data) else np.zeros(n, np.uint8)
            word |= byte.astype(np.uint64) << np.uint64(8 * k)
        h = _mix(h ^ np.where(empty, np.uint64(0), word))
    return h


def value_hashes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 per value: equal values, equal hashes (strings or integers; no nulls)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(values.type):
        return _mix(values.to_numpy().astype(np.int64).view(np.uint64))
    return _string_hashes(values)


class Buckets:
    """Rows (their number and value) spilled to `buckets` Arrow files by the value's hash,
    for `repeats` to read back one bucket at a time."""

    def __init__(self, folder: str, name: str, buckets: int = 64):
        self.buckets = buckets
        self.paths = [os.path.join(folder, f"{name}-{b:03d}.arrow") for b in range(buckets)]
        self.writers: list = [None] * buckets

    def add(self, rows: np.ndarray, values: pa.Array | pa.ChunkedArray,
            prints: np.ndarray | None = None) -> None:
        """Spill rows with their values (and, optionally, a uint64 print of what else the row
        holds: `repeats` says where a repeat's print differs from its first row's)."""
        if not len(rows):
            return
        which = (value_hashes(values) >> np.uint64(58)) % np.uint64(self.buckets)
        order = np.argsort(which, kind="stable")
        prints = np.zeros(len(rows), np.uint64) if prints is None else prints
        table = pa.table({"row": pa.array(rows, pa.int64()), "value": values,
                          "print": pa.array(prints, pa.uint64())}).take(pa.array(order))
        bounds = np.searchsorted(which[order], np.arange(self.buckets + 1, dtype=np.uint64))
        for b in range(self.buckets):
            if bounds[b + 1] > bounds[b]:
                if self.writers[b] is None:
                    self.writers[b] = pa.ipc.new_file(self.paths[b], table.schema)
                self.writers[b].write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))

    def repeats(self, excluded: np.ndarray | None = None, offset: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, first rows, differs): every row whose value a row before it holds, the first
        row of that value, and whether their prints differ; sorted by row. Rows r >= offset
        with excluded[r - offset] take no part."""
        rows, firsts, differs = [], [], []
        excluding = excluded is not None and bool(excluded.any())
        for b, writer in enumerate(self.writers):
            if writer is None:
                continue
            writer.close()
            with pa.memory_map(self.paths[b]) as source:
                table = pa.ipc.open_file(source).read_all()
            if excluding:
                numbers = table.column("row").to_numpy()
                mine = numbers >= offset
                drop = np.zeros(len(numbers), bool)
                drop[mine] = excluded[numbers[mine] - offset]
                table = table.filter(pa.array(~drop))
            found = _repeats_in(table)
            del table
            os.remove(self.paths[b])
            rows.append(found[0])
            firsts.append(found[1])
            differs.append(found[2])
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
        rows, firsts, differs = np.concatenate(rows), np.concatenate(firsts), np.concatenate(differs)
        order = np.argsort(rows)
        return rows[order], firsts[order], differs[order]


def _repeats_in(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    none = np.zeros(0, np.int64)
    if table.num_rows < 2:
        return none, none, np.zeros(0, bool)
    table = table.sort_by([("value", "ascending"), ("row", "ascending")])
    values = table.column("value").combine_chunks()
    same = np.zeros(table.num_rows, bool)
    same[1:] = pc.equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return none, none, np.zeros(0, bool)
    rows, prints = table.column("row").to_numpy(), table.column("print").to_numpy()
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(same))))
    return rows[same], rows[first[same]], prints[same] != prints[first[same]]


def row_prints(table: pa.Table, columns: tuple[str, ...]) -> np.ndarray:
    """A uint64 per row over `columns` of `table` (a column it lacks counts as nulls): equal
    rows, equal prints. given_boxes: a list of boxes per row (null and [] alike)."""
    h = np.zeros(table.num_rows, np.uint64)
    for i, name in enumerate(columns):
        if name not in table.column_names:
            part = np.zeros(table.num_rows, np.uint64)
        elif name == "given_boxes":
            part = _boxes_hashes(table.column(name).combine_chunks())
        else:  # a null counts as the column's absence: 0
            column = table.column(name)
            filler = pa.scalar(-1 if pa.types.is_integer(column.type) else "", column.type)
            part = value_hashes(pc.fill_null(column, filler))
            part[pc.is_null(column).to_numpy(zero_copy_only=False)] = 0
        h = _mix(h ^ part ^ np.uint64(0x9E3779B1 * (i + 1)))
    return h


def _boxes_hashes(column: pa.ListArray) -> np.ndarray:
    """Per row, a hash of its boxes' coordinates in order (a row without boxes: 0)."""
    out = np.zeros(len(column), np.uint64)
    boxes = column.flatten()
    if not len(boxes):
        return out
    box_row = pc.list_parent_indices(column).to_numpy()
    coords = boxes.flatten()
    coord_row = box_row[pc.list_parent_indices(boxes).to_numpy()]
    bits = pc.fill_null(coords, float("nan")).to_numpy(zero_copy_only=False).astype(np.float32).view(np.uint32)
    position = np.arange(len(coord_row)) - np.searchsorted(coord_row, coord_row, "left")
    terms = _mix(bits.astype(np.uint64) ^ (position.astype(np.uint64) << np.uint64(32)))
    np.add.at(out, coord_row, terms)
    return out
