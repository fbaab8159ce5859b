"""The driver's bookkeeping of a store's shards, from the Parquet footers alone.

A shard is the unit of work, of writing and of accounting (actor.py writes it): its
`errors/part-N.parquet` and `features/part-N.parquet` together hold one row per plan row.
`complete_shards` says which shards a run can skip, `count_rows` checks input rows = feature
rows + error rows (+ skipped rows) over all of them.

A shard of loose files holds the plan's rows. A container's shard (a tar, a run of a table's
row groups; containers.py) holds the samples it turned out to hold: its errors part records
them, and those skipped as failed downloads, in its footer (`SHARD_SAMPLES_KEY`,
`SHARD_SKIPPED_KEY`); a tar's plan row says -1.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.features.schema import ERRORS_DIR, FEATURES_DIR, list_shards
from ray_updown.features.writer import (
    SHARD_SAMPLES_KEY,
    SHARD_SKIPPED_KEY,
    error_shard_uri,
    feature_shard_uri,
)


def num_rows(uri: str) -> int:
    """Rows of a shard part from its footer (see `footer`)."""
    return footer(uri).num_rows


def footer(uri: str) -> pq.FileMetaData:
    """A shard part's footer: DataError when missing or not Parquet (a re-run redoes the
    shard), StorageError when the storage cannot be reached."""
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        return pq.ParquetFile(pa_fs.open_input_file(path)).metadata
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
        return np.array([part.number for part in list_shards(out, folder)], dtype=np.int64)

    planned = ranges.column("shard").to_numpy().astype(np.int64)
    both = np.intersect1d(np.intersect1d(numbers(FEATURES_DIR), numbers(ERRORS_DIR)), planned)
    want = dict(zip(planned[np.isin(planned, both)].tolist(),
                    ranges.column("num_rows").to_numpy()[np.isin(planned, both)].tolist()))

    def complete(shard: int) -> bool:
        try:
            errors = footer(error_shard_uri(out, shard))
            written = num_rows(feature_shard_uri(out, shard)) + errors.num_rows
        except DataError:  # truncated or not Parquet: redo the shard
            return False
        samples, skipped = shard_samples(errors, want[shard])
        return samples >= 0 and written + skipped == samples

    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer in parallel
        done = list(pool.map(complete, both.tolist()))
    return np.array([s for s, ok in zip(both.tolist(), done) if ok], dtype=np.int64)


def shard_samples(errors: pq.FileMetaData, planned: int) -> tuple[int, int]:
    """(samples, skipped) of a shard: the plan's count, or (a tar: planned -1) what its
    errors part records; skipped rows only a container's errors part records."""
    kv = errors.metadata or {}
    recorded = int(kv.get(SHARD_SAMPLES_KEY, b"-1"))
    return (planned if planned >= 0 else recorded), int(kv.get(SHARD_SKIPPED_KEY, b"0"))


def count_rows(out: str, ranges: pa.Table) -> dict[str, Any]:
    """Rows per shard from the Parquet footers (and error stages); checks the invariant
    samples = feature rows + error rows + skipped rows, shard by shard."""
    features = errors = samples_total = skipped_total = 0
    by_stage: dict[str, int] = {}
    shards, wanted = ranges.column("shard").to_pylist(), ranges.column("num_rows").to_pylist()

    def read(shard: int) -> tuple[int, pa.ChunkedArray, pq.FileMetaData]:
        err_uri = error_shard_uri(out, shard)
        pa_fs, path = storage.pyarrow_filesystem(err_uri)
        try:
            file = pq.ParquetFile(pa_fs.open_input_file(path))
            stages = file.read(columns=["stage"]).column("stage")
        except FileNotFoundError:
            raise DataError(f"shard {shard} has no errors part; re-run to complete it",
                            file=err_uri) from None
        except pa.ArrowInvalid as exc:
            raise DataError(f"shard {shard}: not a readable Parquet file ({exc}); re-run to "
                            "redo it", file=err_uri) from None
        except OSError as exc:
            raise StorageError(f"cannot read ({type(exc).__name__}: {exc})", file=err_uri) from None
        return num_rows(feature_shard_uri(out, shard)), stages, file.metadata

    with ThreadPoolExecutor(max_workers=16) as pool:
        for shard, want, (n_feat, stages, meta) in zip(shards, wanted, pool.map(read, shards)):
            if len(stages):
                counts = pc.value_counts(stages.combine_chunks())
                for stage, n in zip(counts.field("values").to_pylist(),
                                    counts.field("counts").to_pylist()):
                    by_stage[str(stage)] = by_stage.get(str(stage), 0) + n
            samples, skipped = shard_samples(meta, want)
            if n_feat + len(stages) + skipped != samples:
                raise DataError(f"shard {shard} holds {n_feat} feature + {len(stages)} error "
                                f"rows ({skipped} skipped), but {samples} inputs are planned "
                                "for it (input rows must equal feature rows + error rows)",
                                file=out)
            features += n_feat
            errors += len(stages)
            samples_total += samples
            skipped_total += skipped
    return {"features": features, "errors": errors, "errors_by_stage": by_stage,
            "samples": samples_total, "skipped": skipped_total}
