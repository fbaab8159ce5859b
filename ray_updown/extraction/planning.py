"""The driver's planning step, for every kind of input: which shards a run has, as one table.

    loose files   `images=` a prefix or glob of image files, or `manifest=`: one plan row
                  per image (plan.py), a shard a run of `rows_per_shard` rows
    tar shards    `images=` a prefix or glob of WebDataset `.tar` files: a shard per tar
    image tables  `table=` Parquet files with the image bytes in a column: a shard per run of
                  row groups (container_plan.py)

`plan_inputs` returns the shards (`Planned.ranges`): for loose files shard, first_row,
num_rows (rows of the saved plan); for containers shard, source, first_group, num_groups,
num_rows (-1 for a tar, whose samples are counted as it is read). Either way the driver
holds one row per shard once planning is done. A store holds one kind of input: a re-run
from another kind is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError
from ray_updown.extraction.config import SUMMARY_FILE, ExtractConfig
from ray_updown.extraction.container_plan import plan_containers
from ray_updown.extraction.containers import (
    TABLE_SUFFIXES,
    TAR_SUFFIXES,
    ContainerSpec,
    check_table_columns,
    table_spec,
    tar_spec,
)
from ray_updown.extraction.inputs import InputListing, list_inputs, manifest_batches
from ray_updown.extraction.plan import boxes_of_store, join_boxes, make_plan, open_plan_file
from ray_updown.extraction.plan_build import Inputs, NewPlan
from ray_updown.extraction.plan_settings import check_settings, settings_metadata
from ray_updown.features.schema import PLAN_FILE

CONTAINER_PLAN_COLUMNS = ("shard", "source", "first_group", "num_groups", "num_rows")
LISTING_BATCH = 1 << 20  # rows of a listing the planner takes at a time


@dataclass
class Planned:
    """What planning gives the run (see the module docstring)."""

    ranges: pa.Table
    inputs: int | None  # planned input rows; None where tars are counted as they are read
    id_type: str
    skipped: dict[str, Any]
    container: ContainerSpec | None = None
    plan: pa.Table | NewPlan | None = None  # the plan to save; None when the saved one stands
    boxes_fallbacks: int = 0  # images boxes_from has no boxes for, left to the detector
    # Shards whose inputs or settings changed since they were written (redo_changed): their
    # parts are removed before the new plan is saved, so they are redone.
    redo_shards: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def plan_inputs(cfg: ExtractConfig, out: str) -> Planned:
    """List and plan the run's inputs; one ConfigError when there are none."""
    missing = [0]  # images with no boxes in boxes_from
    if cfg.table:
        listing = list_inputs(cfg.table, TABLE_SUFFIXES)
        return _plan_containers(cfg, out, listing, "table")
    if cfg.manifest:
        skipped = InputListing(pa.table({})).skipped_summary()
        batches = _with_boxes(lambda: manifest_batches(cfg.manifest, cfg.images or None), cfg,
                              missing)
    else:
        listing = list_inputs(cfg.images, tuple(cfg.suffixes) + TAR_SUFFIXES)
        tars = pc.match_substring_regex(listing.table.column("uri"), r"\.(tar|tar\.gz|tgz)$",
                                        ignore_case=True)
        n_tars = int(pc.sum(tars).as_py() or 0)
        if n_tars and n_tars < listing.table.num_rows:
            raise ConfigError(f"{n_tars} tar shards and {listing.table.num_rows - n_tars} image "
                              "files under one input: point images at one kind (e.g. a glob "
                              "ending in *.tar)", file=cfg.images, record="images")
        if n_tars:
            return _plan_containers(cfg, out, listing, "tar")
        table, skipped = listing.table, listing.skipped_summary()
        if not table.num_rows:
            raise ConfigError(f"no input images found{skipped_text(skipped)}", file=cfg.images)
        batches = _with_boxes(lambda: (table.slice(i, LISTING_BATCH)
                                       for i in range(0, table.num_rows, LISTING_BATCH)), cfg,
                              missing)
    built = make_plan(out, batches, cfg.rows_per_shard, cfg.plan_settings(), cfg.redo_changed)
    if not built.rows:
        raise ConfigError("no input images found (the manifest has no rows)", file=cfg.manifest)
    return Planned(built.ranges, built.rows, built.kind, skipped, plan=built.new,
                   boxes_fallbacks=missing[0] if cfg.boxes_fallback else 0,
                   redo_shards=built.redo_shards)


def _with_boxes(batches: Inputs, cfg: ExtractConfig, missing: list[int]) -> Inputs:
    """The input batches with the boxes of `cfg.boxes_from` joined in, when it is set;
    missing[0]: the images of the last pass over them that the store has no boxes for."""
    if not cfg.boxes_from:
        return batches
    source = boxes_of_store(cfg.boxes_from)

    def joined() -> Iterator[pa.Table]:
        missing[0] = 0
        for batch in batches():
            batch, n = join_boxes(batch, source, cfg.boxes_from, cfg.boxes_fallback)
            missing[0] += n
            yield batch

    return joined


def _plan_containers(cfg: ExtractConfig, out: str, listing: InputListing, kind: str) -> Planned:
    given = cfg.table or cfg.images
    sources = listing.table.column("uri").to_pylist()
    skipped = listing.skipped_summary()
    if not sources:
        raise ConfigError(f"no Parquet tables found{skipped_text(skipped)}", file=given)
    if cfg.boxes_from:
        raise ConfigError("boxes_from takes loose image files or a manifest, not tar shards or "
                          "tables", record="boxes_from")
    suffixes = tuple(cfg.suffixes)
    if kind == "table":
        spec = table_spec(sources[0], cfg.image_column, cfg.id_field, suffixes)
        for uri in sources[1:]:
            check_table_columns(uri, spec)
    else:
        spec = tar_spec(sources[0], cfg.id_field, suffixes)
    previous, settings = load_container_plan(out), cfg.plan_settings()
    changed = check_settings(previous.schema.metadata if previous is not None else None, settings,
                             cfg.redo_changed, file=out)
    files = dict(zip(sources, zip(listing.table.column("size").to_pylist(),
                                  listing.table.column("version").to_pylist())))
    plan, redo = plan_containers(sources, spec, cfg.rows_per_shard, previous, files, cfg.redo_changed)
    plan = plan.replace_schema_metadata(settings_metadata(settings))
    rows = plan.column("num_rows").to_numpy()
    inputs = None if (rows < 0).any() else int(rows.sum())
    grown = previous is None or plan.num_rows > previous.num_rows or bool(changed) or bool(redo)
    if changed:  # every shard, with the new settings
        redo = previous.column("shard").to_pylist()
    return Planned(plan, inputs, spec.id_type, skipped, spec, plan if grown else None,
                   redo_shards=np.array(sorted(set(redo)), np.int64))


def load_container_plan(out: str) -> pa.Table | None:
    """The saved plan of a store of container inputs; None when it has none yet."""
    file = open_plan_file(out)
    if file is None:
        return None
    if "source" not in file.schema_arrow.names:
        raise ConfigError("the output was planned from loose image files; tar shards and "
                          "tables go to a new output", file=out)
    missing = [c for c in CONTAINER_PLAN_COLUMNS if c not in file.schema_arrow.names]
    if missing:
        raise DataError(f"extraction plan lacks column(s) {missing}; delete it to re-plan",
                        file=storage.join(out, PLAN_FILE))
    columns = list(CONTAINER_PLAN_COLUMNS) + [c for c in ("size", "version") if c in file.schema_arrow.names]
    return file.read(columns=columns, use_threads=False)


def skipped_text(skipped: dict[str, Any], names: int = 5) -> str:
    """'; 3 files under the input skipped (hidden 1, suffix 2): a.svg, ...' or ''."""
    if not skipped["count"]:
        return ""
    reasons = ", ".join(f"{why} {n}" for why, n in skipped["by_reason"].items())
    shown = ", ".join(str(u).rsplit("/", 1)[-1] or str(u) for u in skipped["first"][:names])
    more = ", ..." if skipped["count"] > names else ""
    return (f"; {skipped['count']} file(s) under the input skipped as not images ({reasons}): "
            f"{shown}{more} (all in {SUMMARY_FILE})")
