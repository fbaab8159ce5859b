"""Reading the region-feature store: O(1) lookup by image id, torch and Ray Data views.

`<store>/index.parquet` maps every image id to (feature file, row group, row). A lookup hashes
the id (a pandas hash index over the id column), opens the file's footer once and decodes
only that row group, so memory stays bounded by a few row groups (~1 MiB each by default),
however large the store. The index lists the shard files it was built from (name and size);
when the listing differs (a resumed extraction added shards) it is rebuilt on open.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.features.records import DecodedRows, FeatureRecord
from ray_updown.features.schema import ERRORS_DIR, FEATURES_DIR, INDEX_FILE, PLAN_FILE, StoreMeta, list_shards
from ray_updown.features.spatial import spatial_features

_OPEN_FILES = 16


def _list_shards(store_uri: str, folder: str) -> list[tuple[str, int]]:
    """(file name, size) of the shard parts in <store>/<folder>, sorted by name."""
    return [(part.name, part.size) for part in list_shards(store_uri, folder)]


def _check_parts(store_uri: str, shards: Sequence[tuple[str, int]]) -> None:
    """In a store the extraction wrote (it keeps its plan there), every features part has its
    errors part: the extraction writes that one first, so a features part without it was
    damaged (deleted, or copied without it) and the store's accounting is incomplete."""
    if not shards or not storage.exists(storage.join(store_uri, PLAN_FILE)):
        return  # imported stores (TSV, HDF5) have no errors parts
    errors = {name for name, _ in _list_shards(store_uri, ERRORS_DIR)}
    for name, _ in shards:
        if name not in errors:
            raise DataError(f"this features part has no errors part ({ERRORS_DIR}/{name}): the "
                            "shard is incomplete; re-run the extraction to repair it",
                            file=storage.join(store_uri, FEATURES_DIR, name))


def build_index(store_uri: str, write: bool = True) -> pa.Table:
    """Scan the shards' footers and id columns; write `<store>/index.parquet` (atomically).

    Reads only the image_id and num_boxes columns (one request per shard, not per row
    group). Duplicate ids across or within shards are
    a DataError naming the id and both files.
    """
    shards = _list_shards(store_uri, FEATURES_DIR)
    ids: list[pa.Array] = []
    cols: dict[str, list[np.ndarray]] = {"file": [], "row_group": [], "row": [], "num_boxes": []}
    meta: StoreMeta | None = None
    for file_no, (name, _) in enumerate(shards):
        uri = storage.join(store_uri, FEATURES_DIR, name)
        pf = storage.open_parquet(uri)
        file_meta = StoreMeta.from_kv(pf.schema_arrow.metadata, file=uri)
        if meta is None:
            meta = file_meta
        elif (file_meta.feature_dim, file_meta.image_id_type) != (meta.feature_dim, meta.image_id_type):
            raise DataError(f"feature dim / id type {file_meta.feature_dim}/{file_meta.image_id_type} "
                            f"differs from the other shards' {meta.feature_dim}/{meta.image_id_type}",
                            file=uri)
        # Two small columns of the whole file; row-group boundaries come from the footer.
        t = pf.read(columns=["image_id", "num_boxes"], use_threads=False)
        sizes = [pf.metadata.row_group(rg).num_rows for rg in range(pf.num_row_groups)]
        ids.append(t.column("image_id").combine_chunks())
        cols["file"].append(np.full(t.num_rows, file_no, np.int32))
        cols["row_group"].append(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
        cols["row"].append(np.concatenate([np.arange(n, dtype=np.int32) for n in sizes] or
                                          [np.zeros(0, np.int32)]))
        cols["num_boxes"].append(t.column("num_boxes").to_numpy().astype(np.int32))
    id_type = pa.string() if meta is not None and meta.image_id_type == "string" else pa.int64()
    id_array = pa.concat_arrays([a.cast(id_type) for a in ids]) if ids else pa.array([], id_type)
    table = pa.table({"image_id": id_array, **{k: pa.array(np.concatenate(v) if v else
                                                             np.zeros(0, np.int32))
                                               for k, v in cols.items()}})
    _check_unique(table, shards, store_uri)
    kv = dict(meta.to_kv()) if meta is not None else {}
    kv[b"files"] = json.dumps(shards).encode()
    table = table.replace_schema_metadata(kv)
    if write:
        index_uri = storage.join(store_uri, INDEX_FILE)
        with storage.atomic_write(index_uri, "wb") as f:
            pq.write_table(table, f, compression="zstd")
    return table


def _check_unique(table: pa.Table, shards: Sequence[tuple[str, int]], store_uri: str) -> None:
    ids = pd.Series(table.column("image_id").to_pandas())
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].iloc[0]
        first = first.item() if isinstance(first, np.generic) else first
        files = sorted({shards[f][0] for f in table.column("file").to_numpy()[dup.to_numpy()
                                                                               & (ids == first).to_numpy()]})
        raise DataError(f"image id {first!r} appears more than once (in {', '.join(files)})",
                        file=storage.join(store_uri, FEATURES_DIR))


class FeatureStore:
    """A region-feature store at `uri` (local path, s3://, gs://).

    `get(image_id)` decodes one row group (O(1) lookup via the index). With
    `in_memory=True` every row group is decoded up front and kept (features stay float16).
    """

    def __init__(self, uri: str, in_memory: bool = False, cache_row_groups: int = 2):
        self.uri = str(uri).rstrip("/")
        self.in_memory = in_memory
        self.cache_row_groups = max(1, int(cache_row_groups))
        shards = _list_shards(self.uri, FEATURES_DIR)
        if not shards and not _list_shards(self.uri, ERRORS_DIR):
            raise StorageError("not a feature store (no shards under features/ or errors/)", file=self.uri)
        _check_parts(self.uri, shards)
        self._index = self._load_index(shards)
        kv = self._index.schema.metadata or {}
        self._files = [n for n, _ in json.loads(kv.get(b"files", b"[]"))]
        self._file_uris = [storage.join(self.uri, FEATURES_DIR, n) for n in self._files]
        self._meta = StoreMeta.from_kv(kv) if b"feature_dim" in kv else None
        self._ids = pd.Index(self._index.column("image_id").to_pandas())
        self._loc = {k: self._index.column(k).to_numpy() for k in ("file", "row_group", "row")}
        self._parquet: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], DecodedRows] = OrderedDict()
        if in_memory:
            for f in range(len(self._files)):
                for rg in range(self._parquet_file(f).num_row_groups):
                    self._groups[(f, rg)] = self._decode(f, rg)

    # -- index -------------------------------------------------------------------------------
    def _load_index(self, shards: list[tuple[str, int]]) -> pa.Table:
        index_uri = storage.join(self.uri, INDEX_FILE)
        if storage.exists(index_uri):
            try:
                table = pq.read_table(storage.pyarrow_filesystem(index_uri)[1],
                                      filesystem=storage.pyarrow_filesystem(index_uri)[0])
                listed = json.loads((table.schema.metadata or {}).get(b"files", b"null"))
                if listed is not None and [tuple(x) for x in listed] == shards:
                    return table
            except (pa.ArrowInvalid, OSError, json.JSONDecodeError):
                pass  # unreadable or stale index: rebuild below
        try:
            return build_index(self.uri, write=True)
        except (StorageError, OSError, PermissionError) as exc:
            warnings.warn(f"{index_uri}: cannot write the index ({exc}); keeping it in memory")
            return build_index(self.uri, write=False)

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not cross process boundaries (DataLoader workers, Ray tasks).
        state = dict(self.__dict__)
        state["_parquet"] = OrderedDict()
        if not self.in_memory:
            state["_groups"] = OrderedDict()
        return state

    # -- public API ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: Any) -> bool:
        try:
            self._position(image_id)
            return True
        except DataError:
            return False

    @property
    def image_ids(self) -> list:
        return self._ids.tolist()

    @property
    def metadata(self) -> dict[str, Any]:
        return self._meta.as_dict() if self._meta is not None else {}

    @property
    def feature_dim(self) -> int:
        if self._meta is None:
            raise DataError("store has no feature rows", file=self.uri)
        return self._meta.feature_dim

    def feature_files(self) -> list[str]:
        return list(self._file_uris)

    def locate(self, image_id: Any) -> tuple[str, int, int]:
        """(feature file URI, row group, row within the group) of an image."""
        p = self._position(image_id)
        f = int(self._loc["file"][p])
        return self._file_uris[f], int(self._loc["row_group"][p]), int(self._loc["row"][p])

    def get(self, image_id: Any) -> FeatureRecord:
        p = self._position(image_id)
        f, rg, row = int(self._loc["file"][p]), int(self._loc["row_group"][p]), int(self._loc["row"][p])
        group = self._row_group(f, rg)
        if row >= len(group) or group.image_ids[row] != self._ids[p]:
            raise DataError(f"index.parquet is stale for image {image_id!r}; run build_index",
                            file=self.uri)
        return group.record(row)

    def iter_records(self) -> Iterator[FeatureRecord]:
        """Every record in file order, one row group decoded at a time."""
        for f in range(len(self._files)):
            for rg in range(self._parquet_file(f).num_row_groups):
                group = self._groups.get((f, rg)) or self._decode(f, rg)
                for i in range(len(group)):
                    yield group.record(i)

    def errors(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for name, _ in _list_shards(self.uri, ERRORS_DIR):
            uri = storage.join(self.uri, ERRORS_DIR, name)
            pa_fs, path = storage.pyarrow_filesystem(uri)
            try:
                rows.extend(pq.read_table(path, filesystem=pa_fs).to_pylist())
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"not a readable Parquet file ({exc})", file=uri) from None
        return rows

    def to_torch_dataset(self, image_ids: Sequence[Any] | None = None,
                         max_boxes: int = 100) -> "RegionFeatureDataset":
        return RegionFeatureDataset(self, image_ids, max_boxes)

    def to_ray_dataset(self, **read_parquet_kwargs: Any):
        """The feature shards as a Ray Dataset (one row per image, columns as schema.py)."""
        import ray.data

        files = self.feature_files()
        if not files:
            raise DataError("store has no feature shards", file=self.uri)
        pa_fs, _ = storage.pyarrow_filesystem(self.uri)
        paths = [storage.pyarrow_filesystem(f)[1] for f in files]
        return ray.data.read_parquet(paths, filesystem=pa_fs, **read_parquet_kwargs)

    # -- internals -------------------------------------------------------------------------
    def _position(self, image_id: Any) -> int:
        key = image_id.item() if isinstance(image_id, np.generic) else image_id
        try:
            p = self._ids.get_loc(key)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"image id {image_id!r} is not in the store", file=self.uri) from None
        if not isinstance(p, (int, np.integer)):  # guarded by build_index's uniqueness check
            raise DataError(f"image id {image_id!r} is not unique", file=self.uri)
        return int(p)

    def _parquet_file(self, f: int) -> pq.ParquetFile:
        pf = self._parquet.get(f)
        if pf is None:
            pf = storage.open_parquet(self._file_uris[f])
            self._parquet[f] = pf
            while len(self._parquet) > _OPEN_FILES:
                self._parquet.popitem(last=False)
        else:
            self._parquet.move_to_end(f)
        return pf

    def _decode(self, f: int, rg: int) -> DecodedRows:
        uri = self._file_uris[f]
        try:
            table = self._parquet_file(f).read_row_group(rg, use_threads=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"cannot read row group {rg} ({exc})", file=uri) from None
        return DecodedRows(table, file=uri)

    def _row_group(self, f: int, rg: int) -> DecodedRows:
        key = (f, rg)
        group = self._groups.get(key)
        if group is not None:
            self._groups.move_to_end(key)
            return group
        group = self._decode(f, rg)
        self._groups[key] = group
        if not self.in_memory:
            while len(self._groups) > self.cache_row_groups:
                self._groups.popitem(last=False)
        return group


def pad_regions(records: Sequence[FeatureRecord], max_boxes: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch records: features [B, M, D] float32, boxes [B, M, 4], mask [B, M] (True = real box).

    M = max_boxes (records with more boxes keep their first M, the detector's best-ranked),
    or the batch's largest box count when max_boxes is None.
    """
    if not records:
        raise DataError("pad_regions needs at least one record")
    m = max_boxes if max_boxes is not None else max(r.num_boxes for r in records)
    dim = records[0].feature_dim
    feats = torch.zeros(len(records), m, dim, dtype=torch.float32)
    boxes = torch.zeros(len(records), m, 4, dtype=torch.float32)
    mask = torch.zeros(len(records), m, dtype=torch.bool)
    for b, r in enumerate(records):
        if r.feature_dim != dim:
            raise DataError(f"feature dim {r.feature_dim} differs from the batch's {dim}",
                            record=f"image {r.image_id}")
        k = min(r.num_boxes, m)
        # copy_ converts float16 -> float32 in place: no temporary float32 copy of the features.
        feats[b, :k].copy_(torch.from_numpy(np.ascontiguousarray(r.features[:k])))
        boxes[b, :k] = torch.from_numpy(r.boxes[:k])
        mask[b, :k] = True
    return feats, boxes, mask


class RegionFeatureDataset(torch.utils.data.Dataset):
    """Map-style torch dataset over a store: each item is one image padded to max_boxes.

    Item keys: image_id, features [M, D] float32, boxes [M, 4], spatial [M, 7] (spatial.py;
    zero on padding), mask [M] bool, num_boxes, image_w, image_h.
    """

    def __init__(self, store: FeatureStore, image_ids: Sequence[Any] | None = None,
                 max_boxes: int = 100):
        self.store = store
        self.image_ids = list(store.image_ids if image_ids is None else image_ids)
        self.max_boxes = int(max_boxes)
        missing = [i for i in self.image_ids[:1000] if i not in store]  # cheap early check
        if missing:
            raise DataError(f"image id {missing[0]!r} is not in the store", file=store.uri)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.store.get(self.image_ids[i])
        feats, boxes, mask = pad_regions([record], self.max_boxes)
        spatial = spatial_features(boxes[0], float(record.image_w), float(record.image_h))
        spatial = spatial * mask[0, :, None]
        return {"image_id": record.image_id, "features": feats[0], "boxes": boxes[0],
                "spatial": spatial, "mask": mask[0], "num_boxes": min(record.num_boxes, self.max_boxes),
                "image_w": record.image_w, "image_h": record.image_h}
