"""The store's feature shards read by other tools: pandas, DuckDB and Hugging Face datasets.

No code of ours on the reading side: each tool opens `<store>/features/*.parquet` itself and
the values must equal what FeatureStore returns. How the nested columns come back differs:
pandas gives object arrays of float16 arrays, DuckDB widens float16 to FLOAT and the
fixed-size lists to FLOAT[][], datasets keeps the Arrow types (numpy format casts to float32).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard

D = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two shards, row groups of two rows; returns (store URI, {image_id: record as stored})."""
    root = tmp_path_factory.mktemp("interop")
    uri = str(root / "store")
    rng = np.random.default_rng(7)
    records = []
    for i in range(5):
        k = int(rng.integers(1, 5))
        xy = rng.uniform(0, 40, (k, 2)).astype(np.float32)
        records.append(FeatureRecord(image_id=500 + i, image_w=64 + i, image_h=48,
                                     boxes=np.concatenate([xy, xy + 9], 1),
                                     features=rng.normal(size=(k, D)).astype(np.float32) * 4,
                                     object_ids=rng.integers(1, 9, k), object_conf=rng.uniform(0, 1, k)))
    meta = StoreMeta(feature_dim=D)
    write_feature_shard(records[:3], feature_shard_uri(uri, 0), meta, row_group_rows=2)
    write_feature_shard(records[3:], feature_shard_uri(uri, 1), meta, row_group_rows=2)
    expected = {r.image_id: r for r in FeatureStore(uri).iter_records()}
    assert len(expected) == 5
    return uri, expected


def test_pandas_read_parquet(store):
    uri, expected = store
    df = pd.read_parquet(os.path.join(uri, "features"))
    assert sorted(df["image_id"]) == sorted(expected)
    for row in df.itertuples():
        r = expected[row.image_id]
        assert (row.image_w, row.image_h, row.num_boxes) == (r.image_w, r.image_h, r.num_boxes)
        features = np.stack(row.features)  # object array of per-box float16 arrays
        assert features.dtype == np.float16 and features.shape == (r.num_boxes, D)
        np.testing.assert_array_equal(features, r.features)
        np.testing.assert_array_equal(np.stack(row.boxes), r.boxes)
        np.testing.assert_array_equal(row.object_ids, r.object_ids)
        np.testing.assert_array_equal(row.object_conf, r.object_conf)


def test_duckdb_sql(store):
    import duckdb

    uri, expected = store
    glob = os.path.join(uri, "features", "*.parquet")
    con = duckdb.connect()
    rows = con.sql(f"SELECT image_id, num_boxes, len(features) AS n_feat, features[1] AS first, boxes "
                   f"FROM read_parquet('{glob}') ORDER BY image_id").fetchall()
    assert [r[0] for r in rows] == sorted(expected)
    for image_id, num_boxes, n_feat, first, boxes in rows:
        r = expected[image_id]
        assert num_boxes == n_feat == r.num_boxes
        # float16 -> DuckDB FLOAT is exact; lists are 1-based
        np.testing.assert_array_equal(np.asarray(first, np.float32), r.features[0].astype(np.float32))
        np.testing.assert_array_equal(np.asarray(boxes, np.float32), r.boxes)
    images, total, most, wide = con.sql(
        f"SELECT count(*), sum(num_boxes), max(num_boxes), count(*) FILTER (WHERE image_w > 65) "
        f"FROM read_parquet('{glob}')").fetchall()[0]
    assert images == len(expected) and total == sum(r.num_boxes for r in expected.values())
    assert most == max(r.num_boxes for r in expected.values())
    assert wide == sum(r.image_w > 65 for r in expected.values())


def test_hugging_face_datasets_load_dataset(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    uri, expected = store
    ds = datasets.load_dataset("parquet", data_files=os.path.join(uri, "features", "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(expected)
    # The Arrow types survive: float16 features in fixed-size lists of D.
    assert ds.data.schema.field("features").type == pa.list_(pa.list_(pa.float16(), D))
    for row in ds:  # plain Python: nested lists
        r = expected[row["image_id"]]
        assert (row["image_w"], row["image_h"], row["num_boxes"]) == (r.image_w, r.image_h, r.num_boxes)
        np.testing.assert_array_equal(np.asarray(row["features"], np.float16), r.features)
        np.testing.assert_array_equal(np.asarray(row["boxes"], np.float32), r.boxes)
    for row in ds.with_format("numpy"):  # what a trainer batches: float16 widened to float32, exactly
        r = expected[int(row["image_id"])]
        assert row["features"].shape == (r.num_boxes, D)
        np.testing.assert_array_equal(row["features"].astype(np.float32), r.features.astype(np.float32))
