"""The driver's bookkeeping of a store's shards, from the Parquet footers alone.

A shard is the unit of work, of writing and of accounting (actor.py writes it): its
`errors/part-N.parquet` and `features/part-N.parquet` together hold one row per plan row.
`complete_shards` says which shards a run can skip, `count_rows` checks input rows = feature
rows + error rows over all of them.
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
from ray_updown.features.writer import error_shard_uri, feature_shard_uri


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
        return np.array([part.number for part in list_shards(out, folder)], dtype=np.int64)

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
