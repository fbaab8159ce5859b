"""The streaming extraction actor: `ShardWriter`, the Ray Data actor that turns shards into files.

A shard is the unit of work, of writing and of accounting. Ray Data hands each actor up to
`shards_in_flight` shards at once (ActorPoolStrategy with that many concurrent calls, run on
threads of the one actor process), and inside the actor every step runs on threads of its
own, joined by bounded hand-offs, so reading, decoding, the forwards, building the result
table and writing Parquet all overlap, within a shard and across shard boundaries:

    call thread, shard k   rows from the saved plan -> chunks of `chunk` images
      loader thread          read the chunk's files (storage, `read_threads` at once), or
                             the next `chunk` samples of a tar or table stream, and
                             decode them on the decode pool (`decode_threads`; Pillow
                             releases the GIL), one chunk ahead of the model
      forward thread         `BatchDetector.detect`: the only thread that runs the model, one
                             chunk after another, fed by a queue of one waiting chunk
    call thread, shard k     `BatchDetector.to_table` per chunk, check every plan row is
                             there exactly once, write the errors part, then the features part

The feed lock lets one shard at a time hand chunks to the model, in the order the calls came,
so shards leave the model one after another: while shard k builds its table and writes, shard
k+1 is in the model and shard k+2 is decoding its first chunk. The model waits for neither a
shard's files nor the previous shard's write.

Memory is bounded by the hand-offs, not by the shard size: the chunk in the model, one queued
for it, the chunk being loaded and one loaded, per shard waiting to feed one loaded chunk, and
each shard's results (features of 36 x 2,048 float32 per image) until its write. A chunk's
pixels are dropped as soon as the model is done with them.

Exactly once stays as it was: a shard's files are written whole by one call, under names fixed
by the plan, features part last. A retried task (a killed actor or node) or a re-run writes the
same shard again, whole, under the same names: the last complete write stands and no image can
be in two files. A call that dies before its features part is written leaves the shard
incomplete (shards.complete_shards), and it is redone. The driver receives one row of counts
per shard (~100 bytes), never a feature.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_updown.data.images import DecodeLimits
from ray_updown.errors import DataError, StorageError
from ray_updown.extraction.containers import ContainerSpec, table_samples, tar_samples
from ray_updown.extraction.model import ModelSpec, default_batch_size
from ray_updown.extraction.per_image import BatchDetector, Detected, decode_stage, read_stage
from ray_updown.extraction.plan import PlanReader
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import error_shard_uri, feature_shard_uri, write_error_table, write_feature_table

COUNT_COLUMNS = ("shard", "features", "errors", "node", "pid", "seconds", "encoded_bytes",
                 "pixel_bytes", "failure", "failure_file")
_TEXT_COLUMNS = ("node", "failure", "failure_file")


def numpy_batch(rows: pa.Table) -> dict[str, np.ndarray]:
    """Plan rows as the per-image steps' numpy batch; given_boxes per image: None (the detector
    chooses) or a list of [x1, y1, x2, y2] lists as the manifest gave them."""
    batch = {}
    for name in rows.column_names:
        column = rows.column(name)
        if name == "given_boxes":
            values = column.to_pylist()
            batch[name] = np.array(values + [None], dtype=object)[:-1]
        elif pa.types.is_string(column.type) or pa.types.is_binary(column.type) or column.null_count:
            batch[name] = np.array(column.to_pylist() + [None], dtype=object)[:-1]
        else:
            batch[name] = column.to_numpy()
    return batch


def _ray_node_id() -> str:
    """The Ray node this actor runs on; "" outside Ray (benchmarks/gpu_check.py runs the
    actor on machines without Ray)."""
    try:
        import ray
    except ImportError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class ForwardThread:
    """One thread that runs `run(item)` for every submitted item, in submission order.

    `submit` blocks while `waiting` items are queued: the producers slow down to the model's
    pace instead of piling decoded images up in memory."""

    def __init__(self, run: Callable[[Any], Any], waiting: int = 1):
        self._run = run
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, waiting))
        self._thread = threading.Thread(target=self._loop, name="forward", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def _loop(self) -> None:
        while True:
            item, future = self._queue.get()
            try:
                future.set_result(self._run(item))
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)


class ShardWriter:
    """Holds one model per actor process; each call: shards in, their counts out. Calls may
    run concurrently (one thread each); see the module docstring for how they share it."""

    def __init__(self, out: str, spec: ModelSpec, meta: StoreMeta, limits: DecodeLimits,
                 read_threads: int = 16, forward_batch_size: int = 4, forwards_per_call: int = 1,
                 torch_threads: int = 1, use_gpu: bool = False, decode_threads: int = 1,
                 shards_in_flight: int = 3, container: ContainerSpec | None = None):
        self.detector = BatchDetector(spec, meta, torch_threads=torch_threads, use_gpu=use_gpu,
                                      forward_batch_size=forward_batch_size)
        if not forward_batch_size:  # 0: chosen for the device the model landed on
            self.detector.forward_batch_size = default_batch_size(self.detector.model)
        self.out, self.meta, self.limits, self.threads = out, meta, limits, read_threads
        self.chunk = max(1, self.detector.forward_batch_size * forwards_per_call)
        self.container = container  # None: loose files, read by the plan's URIs
        self.plan = PlanReader(out) if container is None else None  # one reader for all calls
        self.plan_lock = threading.Lock()
        self.forward = ForwardThread(self._detect)
        # Chunk loads: one per waiting shard and one ahead in the feeding shard, never queued
        # behind each other (the feeding shard's next chunk must not wait).
        self.loader = ThreadPoolExecutor(max_workers=max(1, shards_in_flight) + 1,
                                         thread_name_prefix="shard-load")
        self.decoders = ThreadPoolExecutor(max_workers=max(1, decode_threads),
                                           thread_name_prefix="decode")
        self.feed = threading.Lock()
        self.node = _ray_node_id()

    def _load(self, rows: pa.Table) -> dict[str, np.ndarray]:
        batch = numpy_batch(rows)
        if "data" not in batch:  # loose files (a container's chunk comes with its bytes)
            batch = read_stage(batch, threads=self.threads)
        encoded = int(sum(len(d) for d in batch["data"] if d is not None))
        batch = decode_stage(batch, self.limits, self.decoders)
        batch["_encoded_bytes"] = encoded
        batch["_pixel_bytes"] = int(sum(p.nbytes for p in batch["pixels"]))
        return batch

    def _detect(self, batch: dict[str, np.ndarray]) -> Detected:
        """On the forward thread: the model's share, then the pixels are let go (to_table
        needs only their size)."""
        detected = self.detector.detect(batch)
        batch["pixels"] = None
        return detected

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for i, shard in enumerate(int(s) for s in batch["shard"]):
            try:
                if "source" in batch:  # a container's shard: a tar, or a table's row groups
                    done.append(self.write_container_shard(
                        shard, str(batch["source"][i]), int(batch["first_group"][i]),
                        int(batch["num_groups"][i])))
                else:
                    done.append(self.write_shard(shard, int(batch["first_row"][i]),
                                                 int(batch["num_rows"][i])))
            except (StorageError, DataError) as exc:
                # Reported as data, not raised: Ray Data's wrappers would lose the error's
                # type on the way; the driver raises it as itself (failures.py adds the hint).
                done.append({"shard": shard, "failure": exc.problem,
                             "failure_file": exc.file or self.out})
        return {name: np.array([d.get(name, "") for d in done] + [None], dtype=object)[:-1]
                if name in _TEXT_COLUMNS else np.array([d.get(name, 0) for d in done])
                for name in COUNT_COLUMNS}

    def _load_next(self, chunks: Iterator[pa.Table]) -> dict[str, np.ndarray] | None:
        rows = next(chunks, None)
        return None if rows is None else self._load(rows)

    def _feed(self, chunks: Iterator[pa.Table]) -> list[tuple[dict[str, np.ndarray], Future]]:
        """Load the shard's chunks one ahead of the model and queue them for it. The first
        chunk loads before the feed lock is free, so the model never waits for it."""
        pending = self.loader.submit(self._load_next, chunks)
        fed = []
        with self.feed:
            while (loaded := pending.result()) is not None:
                pending = self.loader.submit(self._load_next, chunks)
                fed.append((loaded, self.forward.submit(loaded)))
        return fed

    def _extract(self, chunks: Iterator[pa.Table]) -> tuple[pa.Table, int, int]:
        """(one result row per input row, encoded bytes read, decoded pixel bytes)."""
        results, encoded, pixels = [], 0, 0
        for loaded, future in self._feed(chunks):
            detected = future.result()
            encoded += loaded.pop("_encoded_bytes")
            pixels += loaded.pop("_pixel_bytes")
            results.append(self.detector.to_table(loaded, detected))
        table = pa.concat_tables(results) if results else self.detector.schema.empty_table()
        return table, encoded, pixels

    def write_shard(self, shard: int, first: int, count: int) -> dict[str, Any]:
        """A shard of loose files: plan rows first..first+count-1."""
        started = time.time()
        with self.plan_lock:
            rows = self.plan.rows(first, count)
        if pc.any(pc.not_equal(rows.column("shard"), shard)).as_py():
            raise DataError(f"plan rows {first}..{first + count - 1} are not all in shard "
                            f"{shard}; delete the plan to re-plan", file=self.plan.uri)
        table, encoded, pixels = self._extract(
            iter([rows.slice(i, self.chunk) for i in range(0, count, self.chunk)]))
        self._check_rows(shard, table, first, count)
        written = self._write(shard, table)
        return {**written, "seconds": time.time() - started, "encoded_bytes": encoded,
                "pixel_bytes": pixels}

    def write_container_shard(self, shard: int, source: str, first_group: int,
                              num_groups: int) -> dict[str, Any]:
        """A container's shard, streamed: a tar front to back, or a run of a table's row
        groups (containers.py); its samples are counted as they are read."""
        started, skipped = time.time(), [0]

        def chunks() -> Iterator[pa.Table]:
            if num_groups == 0:  # a shard emptied when its source changed (redo_changed)
                return
            if self.container.kind == "tar":
                parts = ((chunk, 0) for chunk in tar_samples(source, self.container, self.chunk))
            else:
                parts = table_samples(source, first_group, num_groups, self.container, self.chunk)
            for chunk, skipped_rows in parts:
                skipped[0] += skipped_rows
                if chunk.num_rows:
                    yield chunk.append_column("shard", pa.array(np.full(chunk.num_rows, shard,
                                                                        np.int32)))

        table, encoded, pixels = self._extract(chunks())
        self._check_rows(shard, table, 0, table.num_rows)
        written = self._write(shard, table, samples=table.num_rows + skipped[0], skipped=skipped[0])
        return {**written, "seconds": time.time() - started, "encoded_bytes": encoded,
                "pixel_bytes": pixels}

    def _check_rows(self, shard: int, table: pa.Table, first: int, count: int) -> None:
        got = np.sort(table.column("row").to_numpy())
        if not np.array_equal(got, np.arange(first, first + count)):
            raise DataError(f"shard {shard}: the detector returned rows {got.tolist()[:10]}... "
                            f"for rows {first}..{first + count - 1}; nothing written",
                            file=self.out)

    def _write(self, shard: int, table: pa.Table, samples: int | None = None,
               skipped: int = 0) -> dict[str, Any]:
        """The errors part, then the features part: its appearance commits the shard."""
        failed = pc.not_equal(table.column("reason"), "")
        try:
            errors = write_error_table(table.filter(failed).select(["image_id", "uri", "stage", "reason"]),
                                       error_shard_uri(self.out, shard), self.meta.image_id_type,
                                       samples=samples, skipped=skipped)
            features = write_feature_table(table.filter(pc.invert(failed)),
                                           feature_shard_uri(self.out, shard), self.meta)
        except OSError as exc:  # local: permissions, disk full
            raise StorageError(f"cannot write shard {shard} ({type(exc).__name__}: {exc})",
                               file=feature_shard_uri(self.out, shard)) from None
        return {"shard": shard, "features": features, "errors": errors, "node": self.node,
                "pid": os.getpid()}
