"""Distributed region-feature extraction with Ray Data: images in storage -> feature store.

    run_extraction(ExtractConfig(images="s3://bucket/images/", out="s3://bucket/features/",
                                 checkpoint="s3://bucket/detector/"))

reads top to bottom in `run_extraction`:

1. Check before any work: the config, that the output can be written (StorageError), that the
   checkpoint loads and matches its config (CheckpointError), that an existing store was made
   by the same model.
2. List the inputs (prefix, glob or manifest; inputs.py) and cut them into
   deterministic shards by sorted URI. The plan is saved beside the output and reused, so a
   re-run sees the same shards.
3. Skip shards that are complete. A shard is complete when both of its files exist:
   `errors/part-N.parquet` is written first, `features/part-N.parquet` last, each atomically
   (storage.atomic_write: temp + rename locally, a single upload on object stores). So a crash,
   a killed actor or a killed driver leaves only whole shards, and a re-run redoes the others
   under the same names: no image is ever written twice.
4. Ray Data: from_arrow(plan) -> map_batches(read bytes, threads) -> map_batches(decode,
   CPU tasks; uint8 arrays in blocks) -> map_batches(DetectorActor, ActorPoolStrategy(size=N),
   num_gpus per actor, batch_size, max_restarts / max_task_retries so a killed actor is
   replaced and its batch retried). Every stage keeps its rows; failures become error rows.
5. The driver streams the actors' Arrow output, groups rows by shard, and as soon as a shard
   has all its rows writes its two files (on a small thread pool, so the pipeline keeps
   flowing). Rows are deduplicated by plan row, so a retried batch cannot duplicate an image.
   Driver memory is bounded by the shards in flight; the driver moves ~0.2-0.4 MB per image,
   far below what a driver node can write.
6. Build the store index, check input rows = feature rows + error rows over every shard
   (a mismatch is a DataError), write `extract_summary.json` and print one summary line.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import uuid
import warnings
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.config import validate_fields
from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.extraction.images import DecodeLimits
from ray_updown.extraction.inputs import (
    IMAGE_SUFFIXES,
    list_images,
    load_plan,
    plan_shards,
    plan_table,
    read_manifest,
    save_plan,
)
from ray_updown.extraction.stages import DetectorActor, ModelSpec, build_model, decode_stage, describe_model, read_stage
from ray_updown.features.reader import build_index
from ray_updown.features.schema import ERRORS_DIR, FEATURES_DIR, StoreMeta, feature_schema
from ray_updown.features.writer import (
    error_shard_uri,
    feature_shard_uri,
    table_to_records,
    write_error_shard,
    write_feature_shard,
)

SUMMARY_FILE = "extract_summary.json"


@dataclass
class ExtractConfig:
    """One extraction run. `images` (prefix or glob) or `manifest`, plus `out`, are required.

    model: "detector" (bottom-up regions) or "grid" (ResNet grid baseline, paper 4.2, with
    grid_size x grid_size cells); both read the detector checkpoint at `checkpoint`.
    """

    images: str = ""
    manifest: str = ""  # Parquet / CSV / JSON lines with image_id, uri (relative to `images`)
    out: str = ""
    checkpoint: str = ""
    model: Literal["detector", "grid"] = "detector"
    grid_size: int = 7
    rows_per_shard: int = 256
    batch_size: int = 4  # images per detector forward
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    torch_threads: int = 0  # 0: one per CPU of the actor
    half: bool = False  # float16 forward (CUDA only)
    min_boxes: int = 0  # 0: the checkpoint's clamp (10-100 in the paper)
    max_boxes: int = 0
    min_side: int = 600  # the detector's test scale; larger images are downscaled to it
    max_side: int = 1000
    max_image_pixels: int = 100_000_000
    min_image_side: int = 2
    read_threads: int = 16
    decode_batch_size: int = 16
    max_restarts: int = 3  # per extraction actor
    max_task_retries: int = 3
    suffixes: list[str] = field(default_factory=lambda: list(IMAGE_SUFFIXES))

    def validate(self) -> None:
        validate_fields(self)  # model
        for key in ("rows_per_shard", "batch_size", "num_actors", "decode_batch_size",
                    "read_threads", "grid_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", record=key)
        if self.half and self.num_gpus_per_actor <= 0:
            raise ConfigError("half precision needs GPUs (num_gpus_per_actor > 0)", record="half")
        if self.max_boxes and self.min_boxes > self.max_boxes:
            raise ConfigError(f"min_boxes {self.min_boxes} > max_boxes {self.max_boxes}",
                              record="min_boxes")

    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.min_side, self.max_side, self.max_image_pixels,
                            self.min_image_side)

    def model_spec(self, factory: Callable[[], Any] | None = None) -> ModelSpec:
        return ModelSpec(self.model, self.checkpoint, self.grid_size, self.min_boxes,
                         self.max_boxes, self.half, factory)


def run_extraction(cfg: ExtractConfig, model_factory: Callable[[], Any] | None = None
                   ) -> dict[str, Any]:
    """Extract region (or grid) features for every input image into the store at `cfg.out`.

    `model_factory` (optional, picklable) builds any model with `extract_regions(images)`,
    `name` and `feature_dim` instead of loading `cfg.checkpoint`. Returns the run summary.
    """
    import ray
    from ray.util.annotations import RayDeprecationWarning

    from ray_updown.ray_session import ensure_ray

    cfg.validate()
    if not cfg.out:  # empty by default, like images and manifest
        raise ConfigError("an output URI is needed", record="out")
    if not cfg.images and not cfg.manifest:
        raise ConfigError("give images (a prefix or glob) or a manifest", record="images")
    out = str(cfg.out).rstrip("/")
    _check_writable(out)
    spec = cfg.model_spec(model_factory)
    # The driver loads the model once: CheckpointError before any work, and the store's
    # metadata (name, D, config, checkpoint hash, vocabularies). Half precision is the
    # actors' business.
    model_info = describe_model(build_model(dataclasses.replace(spec, half=False), "cpu"),
                                None if spec.factory is not None else spec.checkpoint)
    inputs = (read_manifest(cfg.manifest, cfg.images or None) if cfg.manifest
              else list_images(cfg.images, tuple(cfg.suffixes)))
    if not inputs:
        raise ConfigError("no input images found", file=cfg.manifest or cfg.images)
    plan = plan_shards(inputs, cfg.rows_per_shard, load_plan(out))
    id_type = "string" if isinstance(plan[0].image_id, str) else "int64"
    meta = StoreMeta(feature_dim=model_info["feature_dim"], image_id_type=id_type,
                     detector=model_info["name"], detector_config=model_info["config"],
                     checkpoint_hash=model_info["checkpoint_hash"],
                     object_vocab=model_info["object_vocab"],
                     attribute_vocab=model_info["attribute_vocab"])
    _check_same_model(out, meta)
    save_plan(out, plan)

    expected = defaultdict(int)
    for row in plan:
        expected[row.shard] += 1
    done = _complete_shards(out)
    todo = [row for row in plan if row.shard not in done]
    todo_shards = sorted({row.shard for row in todo})
    started = time.time()
    if todo:
        ensure_ray()
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if cpus and cfg.num_actors * cfg.cpus_per_actor >= cpus:
            warnings.warn(f"{cfg.num_actors} actors x {cfg.cpus_per_actor} CPUs take all {cpus:g} "
                          "CPUs of the cluster: the read/decode tasks wait for the autoscaler "
                          "(lower num_actors or cpus_per_actor on a fixed cluster)")
        started = time.time()
        rows_per_block = max(cfg.decode_batch_size, math.ceil(len(todo) / 20000))
        table = plan_table(todo)
        blocks = [table.slice(i, rows_per_block) for i in range(0, len(todo), rows_per_block)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(read_stage, batch_size=cfg.decode_batch_size, batch_format="numpy",
                            fn_kwargs={"threads": cfg.read_threads})
        ds = ds.map_batches(decode_stage, batch_size=cfg.decode_batch_size, batch_format="numpy",
                            fn_kwargs={"limits": cfg.limits()})
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing actor options as extra kwargs but has no named
            # parameter for these yet; its defaults (-1) would retry a poison batch forever.
            warnings.simplefilter("ignore", RayDeprecationWarning)
            ds = ds.map_batches(
                DetectorActor, batch_size=cfg.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
                max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries,
                fn_constructor_kwargs={
                    "spec": spec, "meta": meta, "use_gpu": cfg.num_gpus_per_actor > 0,
                    "torch_threads": cfg.torch_threads or max(1, int(cfg.cpus_per_actor))})
        _write_shards(ds.iter_batches(batch_format="pyarrow", batch_size=None),
                      out, meta, {s: expected[s] for s in todo_shards})
    seconds = time.time() - started

    build_index(out)
    counts = _count_rows(out, expected)
    summary = {
        "inputs": len(plan), "features": counts["features"], "errors": counts["errors"],
        "errors_by_stage": counts["errors_by_stage"], "shards": len(expected),
        "shards_processed": len(todo_shards), "shards_skipped": len(expected) - len(todo_shards),
        "images_processed": len(todo), "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0,
        "detector": meta.detector, "feature_dim": meta.feature_dim,
        "checkpoint_hash": meta.checkpoint_hash, "detector_config": meta.detector_config,
        "config": dataclasses.asdict(cfg), "store": out,
    }
    storage.write_json(storage.join(out, SUMMARY_FILE), summary, indent=1)
    print(f"extract: {summary['images_processed']} images in {seconds:.1f} s "
          f"({summary['images_per_s']:.2f} images/s), {len(todo_shards)} shards written, "
          f"{summary['shards_skipped']} already complete; store {out}: {summary['features']} "
          f"feature rows, {summary['errors']} errors of {summary['inputs']} inputs",
          file=sys.stderr)
    return summary


def _check_writable(out: str) -> None:
    """Write and delete a probe object so an unwritable output fails before any work."""
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
    except Exception:
        pass  # a leftover probe is harmless


def _check_same_model(out: str, meta: StoreMeta) -> None:
    """An existing store must hold features of the same model (one feature space a store).

    Only what identifies the model is compared: a store written before the vocabularies were
    recorded (no vocabularies in its shards) is resumed by the same checkpoint."""
    for shard_uri in _shard_files(out, FEATURES_DIR)[:1]:
        pa_fs, path = storage.pyarrow_filesystem(shard_uri)
        theirs = StoreMeta.from_kv(pq.read_schema(path, filesystem=pa_fs).metadata, file=shard_uri)
        mine = (meta.detector, meta.feature_dim, meta.checkpoint_hash, meta.image_id_type)
        if (theirs.detector, theirs.feature_dim, theirs.checkpoint_hash, theirs.image_id_type) != mine:
            raise ConfigError(f"the output already holds features of {theirs.detector} (D="
                              f"{theirs.feature_dim}, checkpoint {theirs.checkpoint_hash or '-'}, "
                              f"ids {theirs.image_id_type}); this run would add {mine[0]} (D="
                              f"{mine[1]}, checkpoint {mine[2] or '-'}, ids {mine[3]}); "
                              "use a new output", file=out)


def _shard_files(out: str, folder: str) -> list[str]:
    uri = storage.join(out, folder)
    if not storage.exists(uri):
        return []
    return [u for u in storage.list_files(uri, (".parquet",))
            if u.rsplit("/", 1)[-1].startswith("part-")]


def _complete_shards(out: str) -> set[int]:
    def numbers(folder: str) -> set[int]:
        names = [u.rsplit("/", 1)[-1] for u in _shard_files(out, folder)]
        return {int(n[len("part-"):-len(".parquet")]) for n in names
                if n[len("part-"):-len(".parquet")].isdigit()}

    return numbers(FEATURES_DIR) & numbers(ERRORS_DIR)


def _write_shards(batches: Any, out: str, meta: StoreMeta, expected: dict[int, int]) -> None:
    """Group result rows by shard; write each shard once all its rows have arrived."""
    pending: dict[int, list[pa.Table]] = defaultdict(list)
    seen: dict[int, set[int]] = defaultdict(set)
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for table in batches:
            shards = table.column("shard")
            for shard in pc.unique(shards).to_pylist():
                part = table.filter(pc.equal(shards, shard))
                rows = part.column("row").to_pylist()
                fresh = [i for i, r in enumerate(rows) if r not in seen[shard]]
                if len(fresh) < len(rows):  # a retried batch delivered rows twice
                    part = part.take(pa.array(fresh, pa.int64()))
                seen[shard].update(rows)
                pending[shard].append(part)
                if len(seen[shard]) == expected[shard]:
                    complete = pa.concat_tables(pending.pop(shard))
                    writes.append(pool.submit(_write_shard, out, shard, complete, meta))
            for f in [f for f in writes if f.done()]:
                f.result()  # surface a failed write early
        for f in writes:
            f.result()
    missing = {s: expected[s] - len(seen[s]) for s in expected if len(seen[s]) != expected[s]}
    if missing:
        raise DataError(f"rows lost in the pipeline for shard(s) {missing} (shard: missing rows); "
                        "nothing was written for them, re-run to retry", file=out)


def _write_shard(out: str, shard: int, rows: pa.Table, meta: StoreMeta) -> None:
    """errors part first, features part last: the features file is the commit."""
    failed = pc.not_equal(rows.column("reason"), "")
    errors = rows.filter(failed).select(["image_id", "uri", "stage", "reason"]).to_pylist()
    write_error_shard(errors, error_shard_uri(out, shard), meta.image_id_type)
    ok = rows.filter(pc.invert(failed))
    records = table_to_records(ok.select(feature_schema(meta).names))
    write_feature_shard(records, feature_shard_uri(out, shard), meta)


def _count_rows(out: str, expected: dict[int, int]) -> dict[str, Any]:
    """Rows per shard from the Parquet footers (and error stages); checks the invariant."""
    features = errors = 0
    by_stage: dict[str, int] = defaultdict(int)
    for shard, want in sorted(expected.items()):
        n_feat = _num_rows(feature_shard_uri(out, shard))
        err_uri = error_shard_uri(out, shard)
        pa_fs, path = storage.pyarrow_filesystem(err_uri)
        try:
            stages = pq.read_table(path, filesystem=pa_fs, columns=["stage"]).column("stage")
        except (FileNotFoundError, OSError):
            raise DataError(f"shard {shard} has no errors part; re-run to complete it",
                            file=err_uri) from None
        for stage, n in zip(*_value_counts(stages)):
            by_stage[stage] += n
        if n_feat + len(stages) != want:
            raise DataError(f"shard {shard} holds {n_feat} feature + {len(stages)} error rows, "
                            f"but {want} images are planned for it (input rows must equal feature "
                            "rows + error rows)", file=out)
        features += n_feat
        errors += len(stages)
    return {"features": features, "errors": errors, "errors_by_stage": dict(by_stage)}


def _num_rows(uri: str) -> int:
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        return pq.ParquetFile(pa_fs.open_input_file(path)).metadata.num_rows
    except (FileNotFoundError, OSError):
        raise DataError("feature part of a shard is missing; re-run to complete it", file=uri) from None


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(column.combine_chunks()) if len(column) else pa.array([], pa.struct(
        [("values", pa.string()), ("counts", pa.int64())]))
    return ([str(v) for v in counts.field("values").to_pylist()],
            counts.field("counts").to_pylist())
