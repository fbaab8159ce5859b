"""Workers write the store: `ShardWriter`, the Ray Data actor that turns a shard into its files.

A shard is the unit of work, of writing and of accounting. The actor gets (shard, first_row,
num_rows), reads those rows from the saved plan (plan.PlanReader), then, in chunks of
`batch_size x forwards_per_call` images: reads the files (a thread pool), decodes them and runs
the detector (stages.py: read_stage, decode_stage, DetectorActor), loading the next chunk on a
background thread while the current one is in the model. Decoded pixels never leave the
actor's process, so they cost no object-store traffic. When the shard has a result row for
each of its plan rows (checked: each row exactly once), it writes `errors/part-N.parquet`
then `features/part-N.parquet`, each atomically (storage.atomic_write), and returns one row
of counts. So the driver receives ~100 bytes per shard, never a feature.

Exactly once: a shard's files are written whole by one call, under names fixed by the plan.
A retried task (a killed actor or node) or a re-run writes the same shard again, whole, under
the same names: the last complete write stands and no image can be in two files. A call that
dies before its features part is written leaves the shard incomplete (`complete_shards`), and
it is redone.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.extraction.images import DecodeLimits
from ray_updown.extraction.plan import PlanReader
from ray_updown.extraction.stages import DetectorActor, ModelSpec, decode_stage, read_stage
from ray_updown.features.schema import ERRORS_DIR, FEATURES_DIR, StoreMeta
from ray_updown.features.writer import (
    error_shard_uri,
    feature_shard_uri,
    write_error_table,
    write_feature_table,
)

COUNT_COLUMNS = ("shard", "features", "errors", "node", "pid", "seconds", "encoded_bytes",
                 "pixel_bytes", "failure", "failure_file")
_TEXT_COLUMNS = ("node", "failure", "failure_file")


def numpy_batch(rows: pa.Table) -> dict[str, np.ndarray]:
    """Plan rows as the stages' numpy batch; given_boxes per image: None (the detector
    chooses) or a list of [x1, y1, x2, y2] lists as the manifest gave them."""
    batch = {}
    for name in rows.column_names:
        column = rows.column(name)
        if name == "given_boxes":
            values = column.to_pylist()
            batch[name] = np.array(values + [None], dtype=object)[:-1]
        elif pa.types.is_string(column.type):
            batch[name] = np.array(column.to_pylist(), dtype=object)
        else:
            batch[name] = column.to_numpy()
    return batch


class ShardWriter:
    """Holds one detector per actor process; each call: shards in, their counts out."""

    def __init__(self, out: str, spec: ModelSpec, meta: StoreMeta, limits: DecodeLimits,
                 read_threads: int = 16, forward_batch_size: int = 4, forwards_per_call: int = 1,
                 torch_threads: int = 1, use_gpu: bool = False):
        import ray

        self.detector = DetectorActor(spec, meta, torch_threads=torch_threads, use_gpu=use_gpu,
                                      forward_batch_size=forward_batch_size)
        self.out, self.meta, self.limits, self.threads = out, meta, limits, read_threads
        self.chunk = max(1, forward_batch_size * forwards_per_call)
        self.plan = PlanReader(out)
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-load")
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _load(self, rows: pa.Table) -> dict[str, np.ndarray]:
        batch = read_stage(numpy_batch(rows), threads=self.threads)
        encoded = int(sum(len(d) for d in batch["data"] if d is not None))
        batch = decode_stage(batch, self.limits)
        batch["_encoded_bytes"] = encoded
        return batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for shard, first, count in zip(batch["shard"], batch["first_row"], batch["num_rows"]):
            try:
                done.append(self.write_shard(int(shard), int(first), int(count)))
            except StorageError as exc:
                # Reported as data, not raised: Ray Data's wrappers would lose the error's
                # type on the way; the driver raises it as itself (failures.py adds the hint).
                done.append({"shard": int(shard), "failure": exc.problem,
                             "failure_file": exc.file or self.out})
        return {name: np.array([d.get(name, "") for d in done] + [None], dtype=object)[:-1]
                if name in _TEXT_COLUMNS else np.array([d.get(name, 0) for d in done])
                for name in COUNT_COLUMNS}

    def write_shard(self, shard: int, first: int, count: int) -> dict[str, Any]:
        started = time.time()
        rows = self.plan.rows(first, count)
        if pc.any(pc.not_equal(rows.column("shard"), shard)).as_py():
            raise DataError(f"plan rows {first}..{first + count - 1} are not all in shard "
                            f"{shard}; delete the plan to re-plan", file=self.plan.uri)
        chunks = [rows.slice(i, self.chunk) for i in range(0, count, self.chunk)]
        pending = self.loader.submit(self._load, chunks[0])
        results, encoded, pixels = [], 0, 0
        for n in range(len(chunks)):
            loaded = pending.result()
            if n + 1 < len(chunks):  # the next chunk's reads and decodes overlap this forward
                pending = self.loader.submit(self._load, chunks[n + 1])
            encoded += loaded.pop("_encoded_bytes")
            pixels += int(sum(p.nbytes for p in loaded["pixels"]))
            results.append(self.detector(loaded))
        table = pa.concat_tables(results)
        got = np.sort(table.column("row").to_numpy())
        if not np.array_equal(got, np.arange(first, first + count)):
            raise DataError(f"shard {shard}: the detector returned rows {got.tolist()[:10]}... "
                            f"for plan rows {first}..{first + count - 1}; nothing written",
                            file=self.out)
        failed = pc.not_equal(table.column("reason"), "")
        try:
            errors = write_error_table(table.filter(failed).select(["image_id", "uri", "stage", "reason"]),
                                       error_shard_uri(self.out, shard), self.meta.image_id_type)
            # The features part last: its appearance commits the shard.
            features = write_feature_table(table.filter(pc.invert(failed)),
                                           feature_shard_uri(self.out, shard), self.meta)
        except OSError as exc:  # local: permissions, disk full
            raise StorageError(f"cannot write shard {shard} ({type(exc).__name__}: {exc})",
                               file=feature_shard_uri(self.out, shard)) from None
        return {"shard": shard, "features": features, "errors": errors, "node": self.node,
                "pid": os.getpid(), "seconds": time.time() - started, "encoded_bytes": encoded,
                "pixel_bytes": pixels}


# -- the driver's bookkeeping: per shard, from the files' footers ------------------------------
def shard_files(out: str, folder: str) -> list[str]:
    uri = storage.join(out, folder)
    if not storage.exists(uri):
        return []
    return [u for u in storage.list_files(uri, (".parquet",))
            if u.rsplit("/", 1)[-1].startswith("part-")]


def num_rows(uri: str) -> int:
    """Rows of a shard part from its footer: DataError when missing or not Parquet (a re-run
    redoes the shard), StorageError when the storage cannot be reached."""
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        return pq.ParquetFile(pa_fs.open_input_file(path)).metadata.num_rows
    except FileNotFoundError:
        raise DataError("this part of a shard is missing; re-run to complete it", file=uri) from None
    except pa.ArrowInvalid as exc:
        raise DataError(f"not a readable Parquet file ({exc}); re-run to redo the shard",
                        file=uri) from None
    except OSError as exc:  # network, permissions
        raise StorageError(f"cannot read ({type(exc).__name__}: {exc})", file=uri) from None


def complete_shards(out: str, ranges: pa.Table) -> np.ndarray:
    """Shard numbers whose two parts are both there, readable, and hold the planned number of
    rows. Anything else (a part missing, truncated or unreadable, or row counts off the plan)
    is redone: its parts are overwritten under the same names, so a re-run repairs a damaged
    store instead of reporting it complete. Only the footers are read (one request a part)."""
    def numbers(folder: str) -> np.ndarray:
        names = [u.rsplit("/", 1)[-1][len("part-"):-len(".parquet")] for u in shard_files(out, folder)]
        return np.array([int(n) for n in names if n.isdigit()], dtype=np.int64)

    planned = ranges.column("shard").to_numpy().astype(np.int64)
    both = np.intersect1d(np.intersect1d(numbers(FEATURES_DIR), numbers(ERRORS_DIR)), planned)
    want = dict(zip(planned[np.isin(planned, both)].tolist(),
                    ranges.column("num_rows").to_numpy()[np.isin(planned, both)].tolist()))

    def rows(shard: int) -> int | None:
        try:
            return num_rows(feature_shard_uri(out, shard)) + num_rows(error_shard_uri(out, shard))
        except DataError:  # truncated or not Parquet: redo the shard
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer in parallel
        counts = list(pool.map(rows, both.tolist()))
    return np.array([s for s, n in zip(both.tolist(), counts) if n == want[s]], dtype=np.int64)


def count_rows(out: str, ranges: pa.Table) -> dict[str, Any]:
    """Rows per shard from the Parquet footers (and error stages); checks the invariant."""
    features = errors = 0
    by_stage: dict[str, int] = {}
    shards, wanted = ranges.column("shard").to_pylist(), ranges.column("num_rows").to_pylist()

    def read(shard: int) -> tuple[int, pa.ChunkedArray]:
        err_uri = error_shard_uri(out, shard)
        pa_fs, path = storage.pyarrow_filesystem(err_uri)
        try:
            stages = pq.read_table(path, filesystem=pa_fs, columns=["stage"]).column("stage")
        except FileNotFoundError:
            raise DataError(f"shard {shard} has no errors part; re-run to complete it",
                            file=err_uri) from None
        except pa.ArrowInvalid as exc:
            raise DataError(f"shard {shard}: not a readable Parquet file ({exc}); re-run to "
                            "redo it", file=err_uri) from None
        except OSError as exc:
            raise StorageError(f"cannot read ({type(exc).__name__}: {exc})", file=err_uri) from None
        return num_rows(feature_shard_uri(out, shard)), stages

    with ThreadPoolExecutor(max_workers=16) as pool:
        for shard, want, (n_feat, stages) in zip(shards, wanted, pool.map(read, shards)):
            if len(stages):
                counts = pc.value_counts(stages.combine_chunks())
                for stage, n in zip(counts.field("values").to_pylist(),
                                    counts.field("counts").to_pylist()):
                    by_stage[str(stage)] = by_stage.get(str(stage), 0) + n
            if n_feat + len(stages) != want:
                raise DataError(f"shard {shard} holds {n_feat} feature + {len(stages)} error "
                                f"rows, but {want} images are planned for it (input rows must "
                                "equal feature rows + error rows)", file=out)
            features += n_feat
            errors += len(stages)
    return {"features": features, "errors": errors, "errors_by_stage": by_stage}
