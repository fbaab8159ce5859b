"""The plan of an image set stored in containers (containers.py): one row per shard.

Planning reads no image: a tar is one shard of the plan (its samples are counted when it is
read), and a table's row groups, from the footers, are cut into runs of about
`rows_per_shard` rows, a shard each. `plan_containers` returns one row per shard: shard,
source (the tar or table), first_group, num_groups, num_rows (-1 for a tar), and the size
and version of the file as listed, so that a file replaced under its name is noticed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from ray_updown import storage
from ray_updown.errors import ConfigError
from ray_updown.extraction.containers import ContainerSpec


def plan_containers(sources: list[str], spec: ContainerSpec, rows_per_shard: int,
                    previous: pa.Table | None = None, files: dict[str, tuple] | None = None,
                    redo_changed: bool = False) -> tuple[pa.Table, list[int]]:
    """(one row per shard, the shards to redo). The previous plan's shards stay, then the
    sources it does not hold (in the order given) go in new shards after its last one.
    `files`: {source: (size, version)} from the listing, kept in the plan. A source planned
    before whose size or version changed (a tar replaced under its name) is refused in one
    line, or with `redo_changed` planned again: its old shards are emptied and redone, and
    it gets new shards."""
    if rows_per_shard < 1:
        raise ConfigError(f"must be >= 1, got {rows_per_shard}", record="rows_per_shard")
    files = files or {}
    previous = _with_file_columns(previous) if previous is not None else None
    changed = _changed_sources(previous, files)
    if changed and not redo_changed:
        raise ConfigError(f"{len(changed)} tar shard(s) or table(s) this store already planned "
                          f"changed since (size or version differ), e.g. {', '.join(changed[:3])}: "
                          "write to a new --out, or re-run with redo_changed=true to redo them")
    redo: list[int] = []
    if changed:
        mask = pa.array([s in set(changed) for s in previous.column("source").to_pylist()])
        redo = previous.filter(mask).column("shard").to_pylist()
        # (the emptied rows keep no size or version: they describe no file any more)
        empty = {"first_group": 0, "num_groups": 0, "num_rows": 0, "size": None, "version": None}
        previous = pa.table({name: pc.if_else(mask, pa.scalar(empty[name], previous.schema.field(name).type),
                                              previous.column(name)) if name in empty else previous.column(name)
                             for name in previous.column_names})
    known = set(previous.column("source").to_pylist()) - set(changed) if previous is not None else set()
    new = [uri for uri in sources if uri not in known]
    runs = (_row_group_runs(new, spec, rows_per_shard) if spec.kind == "table"
            else [(uri, 0, 1, -1) for uri in new])
    first = int(max(previous.column("shard").to_pylist(), default=-1)) + 1 if previous is not None else 0
    table = pa.table({
        "shard": pa.array(range(first, first + len(runs)), pa.int32()),
        "source": pa.array([r[0] for r in runs], pa.string()),
        "first_group": pa.array([r[1] for r in runs], pa.int32()),
        "num_groups": pa.array([r[2] for r in runs], pa.int32()),
        "num_rows": pa.array([r[3] for r in runs], pa.int64()),
        "size": pa.array([files.get(r[0], (None, None))[0] for r in runs], pa.int64()),
        "version": pa.array([files.get(r[0], (None, None))[1] for r in runs], pa.string())})
    plan = table if previous is None else pa.concat_tables([previous.cast(table.schema), table])
    return plan, redo


def _with_file_columns(plan: pa.Table) -> pa.Table:
    for name, kind in (("size", pa.int64()), ("version", pa.string())):
        if name not in plan.column_names:
            plan = plan.append_column(name, pa.nulls(plan.num_rows, kind))
    return plan


def _changed_sources(previous: pa.Table | None, files: dict[str, tuple]) -> list[str]:
    """Sources of the previous plan whose listed size or version differs from the plan's."""
    if previous is None or not files:
        return []
    changed = []
    for source, size, version in zip(*(previous.column(c).to_pylist() for c in ("source", "size", "version"))):
        now = files.get(source)
        if now is not None and size is not None and (size, version) != tuple(now) and source not in changed:
            changed.append(source)
    return changed


def _row_group_runs(tables: list[str], spec: ContainerSpec, rows_per_shard: int
                    ) -> list[tuple[str, int, int, int]]:
    """(table, first group, groups, rows) per shard: a table's row groups in runs of about
    `rows_per_shard` rows (a group is never split; a shard never spans two files)."""
    def footer(uri: str) -> tuple[str, list[int]]:
        meta = storage.open_parquet(uri).metadata
        return uri, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    runs = []
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer in parallel
        for uri, sizes in pool.map(footer, tables):
            start, rows = 0, 0
            for g, size in enumerate(sizes):
                rows += size
                if rows >= rows_per_shard or g == len(sizes) - 1:
                    runs.append((uri, start, g + 1 - start, rows))
                    start, rows = g + 1, 0
    return runs
