"""A store's features parts: reading their footers and columns, and whether they agree.

A part's footer says how its features were made (detector, its config and checkpoint, the
feature dimension and dtype, the id type). Parts made differently cannot be mixed in training:
`inspect` warns of them and the exports refuse them, both through `PartAgreement`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.features.schema import FEATURES_DIR, StoreMeta, list_shards

_REQUIRED_FEATURE_COLUMNS = ("image_id", "num_boxes", "features")


def config_hash(config: Any) -> str:
    """First 12 hex digits of the sha256 of the canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@contextlib.contextmanager
def open_part(uri: str) -> Iterator[pq.ParquetFile]:
    """A part's Parquet file, closed on leaving; one error naming it when it cannot be read."""
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        f = pa_fs.open_input_file(path)
    except FileNotFoundError:
        raise StorageError("no such file (removed while reading?)", file=uri) from None
    except OSError as exc:
        raise StorageError(f"cannot open ({type(exc).__name__})", file=uri) from None
    with f:
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file ({exc})", file=uri) from None
        yield pf


def read_row_group(pf: pq.ParquetFile, rg: int, columns: list[str], uri: str) -> pa.Table:
    try:
        return pf.read_row_group(rg, columns=columns, use_threads=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read columns {', '.join(columns)} ({exc})", file=uri,
                        record=f"row group {rg}") from None


def check_columns(pf: pq.ParquetFile, columns: Iterable[str], uri: str) -> None:
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"not a region-feature shard: no {', '.join(missing)} column", file=uri)


def vocab_size(meta: StoreMeta, kv: dict[bytes, bytes], name: str, uri: str,
               warnings: list[str]) -> int | None:
    """Size of a vocabulary in the metadata, when the store's StoreMeta / files carry one."""
    value = getattr(meta, name, None)
    if not value and name.encode() in kv:
        try:
            value = json.loads(kv[name.encode()].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            warnings.append(f"{uri}: {name} in the metadata is not JSON")
            return None
    if isinstance(value, (list, tuple, dict)):
        return len(value) if value else None
    return None


def feature_dtype(pf: pq.ParquetFile, uri: str) -> tuple[int, str]:
    """(D, dtype) of the features column: list<fixed_size_list<dtype>[D]>."""
    t = pf.schema_arrow.field("features").type
    if not (pa.types.is_list(t) and pa.types.is_fixed_size_list(t.value_type)):
        raise DataError(f"features column has type {t}, expected list<fixed_size_list<float16>[D]>",
                        file=uri)
    inner = t.value_type
    return int(inner.list_size), np.dtype(inner.value_type.to_pandas_dtype()).name


def part_info(pf: pq.ParquetFile, uri: str, warnings: list[str]) -> dict[str, Any]:
    """How one features part's features were made, from its footer alone."""
    kv = dict(pf.schema_arrow.metadata or {})
    meta = StoreMeta.from_kv(kv, file=uri)
    check_columns(pf, _REQUIRED_FEATURE_COLUMNS, uri)
    dim, dtype = feature_dtype(pf, uri)
    declared = kv.get(b"features_dtype", b"").decode("utf-8", "replace")
    if declared and declared != dtype:
        warnings.append(f"{uri}: metadata says features are {declared}, the column holds {dtype}")
    if meta.feature_dim != dim:
        warnings.append(f"{uri}: metadata says feature_dim {meta.feature_dim}, the column holds {dim}")
    return {"feature_dim": dim, "features_dtype": dtype, "image_id_type": meta.image_id_type,
            "detector": meta.detector, "detector_config_hash": config_hash(meta.detector_config),
            "checkpoint_hash": meta.checkpoint_hash,
            "object_vocab_size": vocab_size(meta, kv, "object_vocab", uri, warnings),
            "attribute_vocab_size": vocab_size(meta, kv, "attribute_vocab", uri, warnings)}


def identity(info: dict[str, Any]) -> dict[str, Any]:
    """What makes two parts' features alike: all of a part's info but its vocabulary sizes (a
    run resumed over a store older than the vocabularies adds them to its newer parts)."""
    return {k: v for k, v in info.items() if not k.endswith("vocab_size")}


class PartAgreement:
    """Whether a store's features parts agree on how their features were made (detector, its
    config and checkpoint, dimension, dtype, id type): parts that differ cannot be mixed in
    training. `add` each part in order; it returns a warning for a part unlike those before."""

    def __init__(self) -> None:
        self.first: dict[str, Any] = {}
        self._seen: dict[tuple, str] = {}

    def add(self, name: str, info: dict[str, Any]) -> str | None:
        self.first = self.first or info
        key = tuple(sorted(identity(info).items()))
        found = None
        if self._seen and key not in self._seen:
            other = next(iter(self._seen.values()))
            diff = [k for k, v in key if self.first.get(k) != v]
            found = f"{name} differs from {other} in {', '.join(diff)}"
        self._seen.setdefault(key, name)
        return found


def store_identity(store: str) -> tuple[dict[str, Any], list[str]]:
    """How the store's features were made (`identity` of its first features part; {} without
    parts) and the parts that disagree with it, read from the parts' footers only."""
    agreement, disagreements, unused = PartAgreement(), [], []
    for part in list_shards(store, FEATURES_DIR):
        with open_part(part.uri) as pf:
            found = agreement.add(part.name, part_info(pf, part.uri, unused))
        if found:
            disagreements.append(found)
    return identity(agreement.first), disagreements
