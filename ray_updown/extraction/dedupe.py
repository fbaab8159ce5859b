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
import tempfile

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

    def add(self, rows: np.ndarray, values: pa.Array | pa.ChunkedArray) -> None:
        if not len(rows):
            return
        which = (value_hashes(values) >> np.uint64(58)) % np.uint64(self.buckets)
        order = np.argsort(which, kind="stable")
        table = pa.table({"row": pa.array(rows, pa.int64()), "value": values}).take(pa.array(order))
        bounds = np.searchsorted(which[order], np.arange(self.buckets + 1, dtype=np.uint64))
        for b in range(self.buckets):
            if bounds[b + 1] > bounds[b]:
                if self.writers[b] is None:
                    self.writers[b] = pa.ipc.new_file(self.paths[b], table.schema)
                self.writers[b].write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))

    def repeats(self, excluded: np.ndarray | None = None, offset: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, first rows): every row whose value a row before it holds, and the first row
        of that value; sorted by row. Rows r >= offset with excluded[r - offset] take no part."""
        rows, firsts = [], []
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
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows, firsts = np.concatenate(rows), np.concatenate(firsts)
        order = np.argsort(rows)
        return rows[order], firsts[order]


def _repeats_in(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    if table.num_rows < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    table = table.sort_by([("value", "ascending"), ("row", "ascending")])
    values = table.column("value").combine_chunks()
    same = np.zeros(table.num_rows, bool)
    same[1:] = pc.equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = table.column("row").to_numpy()
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(same))))
    return rows[same], rows[first[same]]


def spill_folder() -> tempfile.TemporaryDirectory:
    """A local folder for the spill files (removed when closed)."""
    return tempfile.TemporaryDirectory(prefix="ray-updown-plan-")
