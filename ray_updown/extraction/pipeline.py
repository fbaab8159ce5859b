"""Distributed region-feature extraction with Ray Data: images in storage -> feature store.

    run_extraction(ExtractConfig(images="s3://bucket/images/", out="s3://bucket/features/",
                                 checkpoint="s3://bucket/detector/"))

reads top to bottom in `run_extraction`:

1. Check before any work: the config, that the output can be written (StorageError), that the
   checkpoint loads and matches its config (CheckpointError), that an existing store was made
   by the same model.
2. List the inputs and plan them (planning.py): image files (prefix page by page, glob or
   manifest; inputs.py) in deterministic shards of input order, planned in a stream
   (plan_build.py); WebDataset tar shards and Parquet image tables (container_plan.py) a shard
   per tar or run of row groups. The plan is saved beside the output
   (`extract_plan.parquet`) and reused, so a re-run sees the same shards. `boxes_from` joins
   the boxes of an existing store into the plan by image_id (given_boxes).
3. Skip shards that are complete (shards.complete_shards): both parts there, their footers
   readable, their rows adding up to the plan's; anything else is redone whole.
4. Workers write the store. Ray Data: from_arrow(the shards to do: shard, first_row,
   num_rows; one block each) -> map_batches(ShardWriter, ActorPoolStrategy(size=N,
   shards_in_flight concurrent calls per actor), num_gpus per actor, batch_size=1,
   max_restarts / max_task_retries so a killed actor or node is replaced and its shard
   redone). Each actor streams (actor.py): a shard's rows come from the saved plan (or its
   samples from its tar or row groups), its images are read and decoded a chunk ahead of
   the model, one forward thread runs the model for every shard in turn, and each shard's
   call builds its table and writes `errors/part-N.parquet`, then `features/part-N.parquet`, each atomically
   (storage.atomic_write: temp + rename locally, a single upload on object stores) while the
   next shard is in the model. Each call returns one row of counts (actor.COUNT_COLUMNS).

   Why whole shards in one actor call, not a streaming read -> decode -> detect pipeline
   with the driver (or a datasink) writing: a shard's files must hold all its rows, and
   streamed batches cut across shards, so someone has to gather them. Gathering on the driver
   sends ~0.3 MB per image through it; gathering in a sink needs a shuffle. In the actor,
   nothing per image leaves it: the driver receives ~100 bytes per shard, the object store
   carries the shard ranges in and the counts out, and decoded
   pixels (~1.8 MB per paper-scale image) stay in the process that uses them. The cost: a
   killed actor redoes the shards it held (rows_per_shard x shards_in_flight bounds it), and
   each actor decodes its own images (on its own CPUs, beside the model: 4 per GPU actor by
   default; raise cpus_per_actor if decoding falls behind).

   Exactly once: a shard is written whole, by one call, under names the plan fixes. A retried
   task, a restarted actor, a replaced node or a re-run after a killed driver writes the same
   shard again, whole, under the same names, so no image is in two files, and a shard whose
   features part (the commit) is missing is redone. Failures beyond the retries are one line
   with the re-run hint (failures.py).
5. Check input rows = feature rows + error rows (+ skipped rows of a table) over every shard
   from the footers (a mismatch is a DataError), build the store index, write
   `extract_summary.json` (with the shards each node wrote and the bytes the driver
   received) and print one summary line.

Driver memory is one batch of inputs while planning (plus a bit per input row) and then one
row per shard: 10^8 rows plan in 0.7 GB (benchmarks/planning.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.extraction.actor import ShardWriter
from ray_updown.extraction.config import SUMMARY_FILE, ExtractConfig
from ray_updown.extraction.containers import ContainerSpec
from ray_updown.extraction.failures import ray_failures_as_one_line
from ray_updown.extraction.model import ModelSpec, build_model, describe_model
from ray_updown.extraction.plan import save_plan
from ray_updown.extraction.planning import Planned, plan_inputs, skipped_text
from ray_updown.extraction.shards import complete_shards, count_rows
from ray_updown.features.schema import FEATURES_DIR, StoreMeta, list_shards
from ray_updown.features.writer import error_shard_uri, feature_shard_uri


def run_extraction(cfg: ExtractConfig, model_factory: Callable[[], Any] | None = None
                   ) -> dict[str, Any]:
    """Extract region (or grid) features for every input image into the store at `cfg.out`.

    `model_factory` (optional, picklable) builds any model with `extract_regions(images)`,
    `name` and `feature_dim` instead of loading `cfg.checkpoint`. Returns the run summary.
    """
    cfg.validate()
    if not cfg.out:  # empty by default, like images and manifest
        raise ConfigError("an output URI is needed", record="out")
    if not cfg.images and not cfg.manifest and not cfg.table:
        raise ConfigError("give images (a prefix or glob of image files or tar shards), a "
                          "manifest or a table", record="images")
    if cfg.table and cfg.manifest:
        raise ConfigError("give a manifest or a table, not both", record="table")
    out = str(cfg.out).rstrip("/")
    _check_writable(out)
    spec = cfg.model_spec(model_factory)
    # The driver loads the model once: CheckpointError before any work, and the store's
    # metadata (name, D, config, checkpoint hash, vocabularies). Half precision is the
    # actors' business.
    model_info = describe_model(build_model(dataclasses.replace(spec, half=False), "cpu"),
                                None if spec.factory is not None else spec.checkpoint)
    planning = time.time()
    planned = plan_inputs(cfg, out)
    ranges, skipped = planned.ranges, planned.skipped
    meta = StoreMeta(feature_dim=model_info["feature_dim"], image_id_type=planned.id_type,
                     detector=model_info["name"], detector_config=model_info["config"],
                     checkpoint_hash=model_info["checkpoint_hash"],
                     object_vocab=model_info["object_vocab"],
                     attribute_vocab=model_info["attribute_vocab"])
    _check_same_model(out, meta)
    _remove_shards(out, planned.redo_shards)  # (before the plan that redoes them is saved)
    if planned.plan is not None:  # new or grown; else the saved plan stands
        save_plan(out, planned.plan)
    planned.plan = None  # from here on the driver holds one row per shard
    done = complete_shards(out, ranges)
    todo = ranges.filter(pc.invert(pc.is_in(ranges.column("shard"), pa.array(done, pa.int32()))))
    plan_seconds = time.time() - planning
    n_todo = int(pc.sum(pc.max_element_wise(todo.column("num_rows"), 0)).as_py() or 0)
    if cfg.plan_only:  # (tars count as 0 images to do: their samples are counted when read)
        return {"inputs": planned.inputs, "shards": ranges.num_rows, "shards_to_do": todo.num_rows,
                "images_to_do": n_todo, "plan_seconds": round(plan_seconds, 3),
                "skipped_files": skipped, "store": out, "plan_only": True}
    started = time.time()
    written = (_run_shards(cfg, spec, meta, out, todo, planned.container) if todo.num_rows
               else _no_shards())
    seconds = time.time() - started

    return _finish(cfg, out, meta, planned, todo, written, seconds, plan_seconds)


def _finish(cfg: ExtractConfig, out: str, meta: StoreMeta, planned: Planned, todo: pa.Table,
            written: dict[str, Any], seconds: float, plan_seconds: float) -> dict[str, Any]:
    """Check the accounting over every shard, index the store, write and print the summary."""
    from ray_updown.features.reader import build_index  # (torch: not while planning)

    ranges, skipped, n_todo = planned.ranges, planned.skipped, written.pop("rows_written")
    counts = count_rows(out, ranges)
    build_index(out)
    summary = {
        "inputs": counts["samples"], "features": counts["features"], "errors": counts["errors"],
        "errors_by_stage": counts["errors_by_stage"], "skipped_rows": counts["skipped"],
        "shards": ranges.num_rows,
        "shards_processed": todo.num_rows, "shards_skipped": ranges.num_rows - todo.num_rows,
        "images_processed": n_todo, "skipped_files": skipped, "seconds": round(seconds, 3),
        "images_per_s": round(n_todo / seconds, 3) if n_todo and seconds > 0 else 0.0,
        "plan_seconds": round(plan_seconds, 3), "boxes_fallbacks": planned.boxes_fallbacks,
        "shards_redone": len(planned.redo_shards),
        **written,
        "detector": meta.detector, "feature_dim": meta.feature_dim,
        "checkpoint_hash": meta.checkpoint_hash, "detector_config": meta.detector_config,
        "config": dataclasses.asdict(cfg), "store": out,
    }
    storage.write_json(storage.join(out, SUMMARY_FILE), summary, indent=1)
    print(f"extract: {n_todo} images in {seconds:.1f} s "
          f"({summary['images_per_s']:.2f} images/s), {todo.num_rows} shards written, "
          f"{summary['shards_skipped']} already complete; store {out}: {summary['features']} "
          f"feature rows, {summary['errors']} errors{_skipped_rows_text(counts['skipped'])} of "
          f"{summary['inputs']} inputs{skipped_text(skipped)}", file=sys.stderr)
    return summary


def _remove_shards(out: str, shards) -> None:
    """Remove both parts of shards to redo, the features part (the commit) first."""
    for shard in [int(s) for s in shards]:
        for uri in (feature_shard_uri(out, shard), error_shard_uri(out, shard)):
            if storage.exists(uri):
                storage.remove(uri)


def _skipped_rows_text(skipped: int) -> str:
    return f", {skipped} skipped (their download had failed)" if skipped else ""


def _no_shards() -> dict[str, Any]:
    return {"shards_by_node": {}, "driver_received_bytes": 0, "object_store_bytes": 0,
            "decoded_bytes_in_workers": 0, "encoded_bytes_read": 0, "rows_written": 0}


def _run_shards(cfg: ExtractConfig, spec: ModelSpec, meta: StoreMeta, out: str,
                todo: pa.Table, container: ContainerSpec | None) -> dict[str, Any]:
    """The Ray Data run over the shards to do; what the workers reported, in sum."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    from ray_updown.ray_cluster import ensure_ray

    ensure_ray()
    cpus, actor_cpus = ray.cluster_resources().get("CPU", 0.0), cfg.actor_cpus()
    if cpus and cfg.num_actors * actor_cpus >= cpus + 1:
        warnings.warn(f"{cfg.num_actors} actors x {actor_cpus:g} CPUs need more than the "
                      f"{cpus:g} CPUs of the cluster: some wait for the autoscaler")
    # One block per shard (a few shards a block beyond 10,000): each is one actor call.
    per_block = max(1, math.ceil(todo.num_rows / 10_000))
    blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks)
    # Each actor runs `shards_in_flight` calls at once, on threads (actor.py streams them).
    strategy = ray.data.ActorPoolStrategy(
        size=cfg.num_actors, max_tasks_in_flight_per_actor=cfg.shards_in_flight,
        max_concurrent_calls_per_actor=cfg.shards_in_flight, enable_true_multi_threading=True)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options as extra kwargs but has no named
        # parameter for these yet; its defaults (-1) would retry a poison batch forever.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(
            ShardWriter, batch_size=1, batch_format="numpy", compute=strategy,
            num_cpus=actor_cpus, num_gpus=cfg.num_gpus_per_actor or None,
            resources=dict(cfg.actor_resources) or None,
            max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries,
            fn_constructor_kwargs={"out": out, "spec": spec, "meta": meta,
                                   "container": container, **cfg.shard_writer_kwargs()})
    reported: dict[int, dict[str, Any]] = {}
    received = 0
    with ray_failures_as_one_line(out, todo.num_rows, cfg.max_restarts, cfg.max_task_retries):
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            received += batch.nbytes
            for row in batch.to_pylist():  # one row per shard: ~100 bytes
                if row["failure"]:  # a shard a worker could not write (or read the plan for)
                    raise StorageError(row["failure"], file=row["failure_file"])
                reported[int(row["shard"])] = row
    missing = sorted(set(todo.column("shard").to_pylist()) - set(reported))
    if missing:
        raise DataError(f"no worker reported shard(s) {missing[:20]}; re-run to complete them",
                        file=out)
    rows = list(reported.values())
    return {"shards_by_node": dict(Counter(r["node"] for r in rows)),
            "driver_received_bytes": received,
            "object_store_bytes": int(sum(b.nbytes for b in blocks)) + received,
            "decoded_bytes_in_workers": int(sum(r["pixel_bytes"] for r in rows)),
            "encoded_bytes_read": int(sum(r["encoded_bytes"] for r in rows)),
            "rows_written": int(sum(r["features"] + r["errors"] for r in rows))}


def _check_writable(out: str) -> None:
    """Write and delete a probe object so an unwritable output fails before any work.

    Local folders the probe created are removed again: a run that fails a later check must
    not leave an empty output folder (the plan, written after the checks, creates it)."""
    created = _missing_local_folders(out)
    probe = storage.join(out, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"probe")
    except StorageError as exc:
        raise StorageError(f"output cannot be written ({exc.problem})", file=out) from None
    except Exception as exc:  # local: not a directory, read-only file system, permissions
        raise StorageError(f"output cannot be written ({type(exc).__name__}: {exc})",
                           file=out) from None
    try:
        storage.remove(probe)
        for folder in created:  # deepest first; rmdir refuses a folder that is not empty
            os.rmdir(folder)
    except Exception:
        pass  # a leftover probe or folder is harmless


def _missing_local_folders(out: str) -> list[str]:
    """The local folders, deepest first, that writing into `out` would create."""
    if storage.is_remote(out):
        return []  # object stores have no folders
    path, missing = storage.filesystem(out)[1], []
    while path and not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _check_same_model(out: str, meta: StoreMeta) -> None:
    """An existing store must hold features of the same model (one feature space a store).

    Only what identifies the model is compared: a store written before the vocabularies were
    recorded (no vocabularies in its shards) is resumed by the same checkpoint. The first
    readable shard decides: a damaged one is redone by this run (shards.complete_shards)."""
    for shard_uri in (part.uri for part in list_shards(out, FEATURES_DIR)):
        pa_fs, path = storage.pyarrow_filesystem(shard_uri)
        try:
            theirs = StoreMeta.from_kv(pq.read_schema(path, filesystem=pa_fs).metadata,
                                       file=shard_uri)
        except (pa.ArrowInvalid, DataError):
            continue
        mine = (meta.detector, meta.feature_dim, meta.checkpoint_hash, meta.image_id_type)
        if (theirs.detector, theirs.feature_dim, theirs.checkpoint_hash, theirs.image_id_type) != mine:
            raise ConfigError(f"the output already holds features of {theirs.detector} (D="
                              f"{theirs.feature_dim}, checkpoint {theirs.checkpoint_hash or '-'}, "
                              f"ids {theirs.image_id_type}); this run would add {mine[0]} (D="
                              f"{mine[1]}, checkpoint {mine[2] or '-'}, ids {mine[3]}); "
                              "use a new output", file=out)
        return


