"""Region-feature store: schema, writer, reader (index, row-group reads), padding, spatial."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.features.reader import FeatureStore, build_index, pad_regions
from ray_updown.features.records import FeatureRecord, records_to_table, table_to_records
from ray_updown.features.schema import StoreMeta
from ray_updown.features.spatial import spatial_features
from ray_updown.features.writer import error_shard_uri, feature_shard_uri, write_error_shard, write_feature_shard

D = 16


def make_record(image_id, k, rng, dim=D):
    xy = rng.uniform(0, 50, size=(k, 2)).astype(np.float32)
    wh = rng.uniform(1, 40, size=(k, 2)).astype(np.float32)
    return FeatureRecord(
        image_id=image_id, image_w=100, image_h=80, boxes=np.concatenate([xy, xy + wh], 1),
        features=np.maximum(rng.normal(size=(k, dim)), 0).astype(np.float32) * 3,
        object_ids=rng.integers(1, 20, k), object_conf=rng.uniform(0.2, 1, k),
        attr_ids=rng.integers(0, 9, k), attr_conf=rng.uniform(0, 1, k))


def write_store(uri, n_images=10, per_shard=4, seed=0, string_ids=False):
    rng = np.random.default_rng(seed)
    records = [make_record(f"img{i}" if string_ids else 1000 + i, int(rng.integers(1, 7)), rng)
               for i in range(n_images)]
    meta = StoreMeta(feature_dim=D, image_id_type="string" if string_ids else "int64",
                     detector="test-detector", detector_config={"min_boxes": 1},
                     checkpoint_hash="abc123")
    for shard, start in enumerate(range(0, n_images, per_shard)):
        write_feature_shard(records[start:start + per_shard], feature_shard_uri(uri, shard), meta,
                            row_group_rows=2)
    return records


def assert_same(a: FeatureRecord, b: FeatureRecord):
    assert a.image_id == b.image_id and (a.image_w, a.image_h) == (b.image_w, b.image_h)
    assert a.num_boxes == b.num_boxes
    np.testing.assert_array_equal(a.boxes, b.boxes)
    # Stored as float16: equal to the float16 rounding of the input.
    np.testing.assert_array_equal(b.features, a.features.astype(np.float16))
    np.testing.assert_array_equal(a.object_ids, b.object_ids)
    np.testing.assert_array_equal(a.attr_ids, b.attr_ids)
    np.testing.assert_allclose(a.object_conf, b.object_conf)
    np.testing.assert_allclose(a.attr_conf, b.attr_conf)


def test_round_trip_local_with_index_and_metadata(tmp_path):
    uri = str(tmp_path / "store")
    records = write_store(uri)
    store = FeatureStore(uri)
    assert len(store) == 10 and sorted(store.image_ids) == [1000 + i for i in range(10)]
    for r in records:
        got = store.get(r.image_id)
        assert got.features.dtype == np.float16
        assert_same(r, got)
    assert store.get(np.int64(1003)).image_id == 1003
    meta = store.metadata
    assert meta["feature_dim"] == D and meta["detector_config"] == {"min_boxes": 1}
    assert meta["checkpoint_hash"] == "abc123" and meta["box_format"] == "xyxy_pixels"
    # Index persisted beside the shards, readable with plain pyarrow.
    index = pq.read_table(tmp_path / "store" / "index.parquet")
    assert index.num_rows == 10
    assert json.loads(index.schema.metadata[b"files"])[0][0] == "part-00000.parquet"
    # Plain pandas reads the shard; features come back as float16 numpy arrays.
    df = pd.read_parquet(tmp_path / "store" / "features" / "part-00000.parquet")
    assert list(df.columns)[:4] == ["image_id", "image_w", "image_h", "num_boxes"]
    first = np.stack(df["features"].iloc[0])
    assert first.dtype == np.float16 and first.shape == (records[0].num_boxes, D)
    kv = pq.read_schema(tmp_path / "store" / "features" / "part-00000.parquet").metadata
    assert kv[b"feature_dim"] == str(D).encode() and kv[b"features_dtype"] == b"float16"


def test_float16_precision_and_range():
    rng = np.random.default_rng(1)
    r = make_record(1, 5, rng)
    r.features[0, 0] = 1.0 + 2 ** -12  # below float16 resolution at 1.0 -> rounds to 1.0
    back = table_to_records(records_to_table([r], StoreMeta(feature_dim=D)))[0]
    assert back.features[0, 0] == 1.0
    rel = np.abs(back.features.astype(np.float32) - r.features) / np.maximum(np.abs(r.features), 1e-3)
    assert rel.max() <= 2 ** -11 + 1e-6  # float16 has an 11-bit significand
    r.features[1, 1] = 1e6  # beyond float16's range: refused, not silently inf
    with pytest.raises(DataError, match="image 1.*not finite"):
        records_to_table([r], StoreMeta(feature_dim=D))


def test_round_trip_s3_string_ids_and_errors(s3_bucket):
    uri = f"{s3_bucket}/run1"
    records = write_store(uri, n_images=5, per_shard=3, string_ids=True)
    write_error_shard([{"image_id": "bad1", "uri": "s3://x/bad1.jpg", "stage": "decode",
                        "reason": "truncated JPEG"}], error_shard_uri(uri, 0))
    store = FeatureStore(uri)
    assert storage.exists(f"{uri}/index.parquet")
    assert len(store) == 5
    assert_same(records[4], store.get("img4"))
    assert store.errors() == [{"image_id": "bad1", "uri": "s3://x/bad1.jpg", "stage": "decode",
                               "reason": "truncated JPEG"}]
    assert store.metadata["image_id_type"] == "string"


def test_get_reads_exactly_one_row_group(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    write_store(uri, n_images=12, per_shard=6)  # 2 files x 3 row groups of 2 rows
    store = FeatureStore(uri)
    reads = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        reads.append((i, kwargs.get("columns")))
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    file, rg, row = store.locate(1009)
    assert file.endswith("part-00001.parquet") and (rg, row) == (1, 1)
    assert store.get(1009).image_id == 1009
    assert reads == [(1, None)]
    store.get(1008)  # same row group: served from the small cache
    assert reads == [(1, None)]


def test_index_rebuilt_when_shards_change(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, n_images=4, per_shard=4)
    assert len(FeatureStore(uri)) == 4
    rng = np.random.default_rng(5)
    write_feature_shard([make_record(77, 3, rng)], feature_shard_uri(uri, 1), StoreMeta(feature_dim=D))
    store = FeatureStore(uri)
    assert len(store) == 5 and store.get(77).num_boxes == 3


def test_in_memory_matches_lazy(tmp_path):
    uri = str(tmp_path / "store")
    records = write_store(uri)
    mem = FeatureStore(uri, in_memory=True)
    assert len(mem._groups) == 2 + 2 + 1  # every row group (4+4+2 rows, 2 a group) decoded up front
    for r in records:
        assert_same(r, mem.get(r.image_id))


def test_bad_inputs_name_the_image(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(DataError, match="image 5: features has shape"):
        FeatureRecord(5, 10, 10, boxes=np.zeros((3, 4)), features=np.zeros((2, D)))
    with pytest.raises(DataError, match="image 6: boxes has shape"):
        FeatureRecord(6, 10, 10, boxes=np.zeros((3, 5)), features=np.zeros((3, D)))
    with pytest.raises(DataError, match="image 7: attr_conf has shape"):
        FeatureRecord(7, 10, 10, boxes=np.zeros((3, 4)), features=np.zeros((3, D)), attr_conf=np.zeros(2))
    with pytest.raises(DataError, match="image 8: feature dim 16 differs"):
        records_to_table([make_record(8, 2, rng)], StoreMeta(feature_dim=32))
    with pytest.raises(DataError, match="does not match the store's id type"):
        records_to_table([make_record("a", 2, rng)], StoreMeta(feature_dim=D))
    uri = str(tmp_path / "store")
    write_store(uri, n_images=3)
    store = FeatureStore(uri)
    with pytest.raises(DataError, match="image id 424242 is not in the store"):
        store.get(424242)
    with pytest.raises(DataError, match="'1000' is not in the store"):
        store.get("1000")
    with pytest.raises(StorageError, match="not a feature store"):
        FeatureStore(str(tmp_path / "nothing"))


def test_duplicate_ids_across_shards(tmp_path):
    uri = str(tmp_path / "store")
    rng = np.random.default_rng(3)
    meta = StoreMeta(feature_dim=D)
    write_feature_shard([make_record(1, 2, rng)], feature_shard_uri(uri, 0), meta)
    write_feature_shard([make_record(1, 2, rng)], feature_shard_uri(uri, 1), meta)
    with pytest.raises(DataError, match="image id 1 appears more than once.*part-00000.*part-00001"):
        build_index(uri)


def test_pad_regions_and_mask():
    rng = np.random.default_rng(4)
    a, b = make_record(1, 3, rng), make_record(2, 6, rng)
    feats, boxes, mask = pad_regions([a, b], max_boxes=4)
    assert feats.shape == (2, 4, D) and feats.dtype == torch.float32
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.all(feats[0, 3] == 0) and torch.all(boxes[0, 3] == 0)
    np.testing.assert_array_equal(feats[1].numpy(), b.features[:4])  # truncated to the best 4
    feats, _, mask = pad_regions([a, b])
    assert feats.shape == (2, 6, D) and mask.sum().item() == 9


def test_spatial_features_hand_checked():
    boxes = np.array([[10, 20, 60, 100], [0, 0, 200, 100]], dtype=np.float32)
    s = spatial_features(boxes, 200, 100)
    np.testing.assert_allclose(s[0], [0.05, 0.2, 0.3, 1.0, 0.25, 0.8, 0.2])
    np.testing.assert_allclose(s[1], [0, 0, 1, 1, 1, 1, 1])
    t = spatial_features(torch.from_numpy(boxes)[None], torch.tensor([200.0]), torch.tensor([100.0]))
    assert isinstance(t, torch.Tensor) and t.shape == (1, 2, 7)
    np.testing.assert_allclose(t[0].numpy(), s, rtol=1e-6)


def test_torch_dataset_and_dataloader(tmp_path):
    uri = str(tmp_path / "store")
    records = write_store(uri, n_images=6)
    ds = FeatureStore(uri).to_torch_dataset(max_boxes=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = {}
    for batch in loader:
        assert batch["features"].shape[1:] == (5, D) and batch["spatial"].shape[2] == 7
        for i, image_id in enumerate(batch["image_id"].tolist()):
            seen[image_id] = (batch["mask"][i].sum().item(), batch["spatial"][i])
    assert sorted(seen) == [r.image_id for r in records]
    for r in records:
        n, spatial = seen[r.image_id]
        assert n == min(r.num_boxes, 5)
        assert torch.all(spatial[n:] == 0)
        np.testing.assert_allclose(spatial[:n].numpy(), spatial_features(r.boxes[:n], 100, 80), rtol=1e-6)


def test_inconsistent_shard_names_file_and_image(tmp_path):
    # A shard whose num_boxes disagrees with its lists (written by someone else) is named.
    import pyarrow as pa

    uri = str(tmp_path / "store")
    write_store(uri, n_images=2)
    path = tmp_path / "store" / "features" / "part-00000.parquet"
    table = pq.read_table(path)
    table = table.set_column(3, "num_boxes", pa.array([9, 9], pa.int32()))
    pq.write_table(table, path)
    store = FeatureStore(uri)
    with pytest.raises(DataError, match="part-00000.parquet: image 1000: column boxes has"):
        store.get(1000)


def test_ray_dataset_iteration(tmp_path, ray_cluster):
    uri = str(tmp_path / "store")
    records = write_store(uri, n_images=7)
    ds = FeatureStore(uri).to_ray_dataset()
    rows = ds.take_all()
    assert sorted(r["image_id"] for r in rows) == [r.image_id for r in records]
    row = next(r for r in rows if r["image_id"] == records[2].image_id)
    feats = np.stack([np.asarray(x) for x in row["features"]])
    np.testing.assert_array_equal(feats.astype(np.float16), records[2].features.astype(np.float16))
    assert row["num_boxes"] == records[2].num_boxes


def test_store_pickles_without_open_files(tmp_path):
    # DataLoader workers and Ray tasks receive the store pickled: no open handles cross over.
    import pickle

    uri = str(tmp_path / "store")
    records = write_store(uri, n_images=3)
    store = FeatureStore(uri)
    store.get(1001)
    assert store._parquet and store._groups
    clone = pickle.loads(pickle.dumps(store))
    assert not clone._parquet and not clone._groups
    assert_same(records[2], clone.get(1002))


def test_shard_where_every_image_failed(tmp_path):
    # An extraction shard whose images all failed: an empty feature shard plus its error rows.
    uri = str(tmp_path / "store")
    write_store(uri, n_images=2)
    write_feature_shard([], feature_shard_uri(uri, 1), StoreMeta(feature_dim=D))
    write_error_shard([{"image_id": 7, "uri": "a.jpg", "stage": "decode", "reason": "zero bytes"},
                       {"image_id": None, "uri": "b.txt", "stage": "list", "reason": "no id"}],
                      error_shard_uri(uri, 1))
    store = FeatureStore(uri)
    assert len(store) == 2 and len(store.feature_files()) == 2
    assert [e["image_id"] for e in store.errors()] == [7, None]
    assert len(list(store.iter_records())) == 2
