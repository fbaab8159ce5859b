"""Extraction from tar shards (in S3) and Parquet image tables on the shared local Ray: the
same features as from the same images as loose files, every sample accounted for
(features + errors + skipped = samples), and a re-run resumes."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from containers_kit import image_samples, make_images, write_hf_table, write_img2dataset_table, write_tar

from ray_updown import storage
from ray_updown.detector import BottomUpDetector, save_detector, tiny_config
from ray_updown.errors import ConfigError
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
from ray_updown.features.inspect import inspect_store
from ray_updown.features.reader import FeatureStore

IMAGES = make_images(9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_detector(BottomUpDetector(tiny_config()).eval(), path)
    return path


@pytest.fixture(scope="module")
def loose_store(ray_cluster, checkpoint, tmp_path_factory):
    """The images as loose files, through a manifest that gives them the tar keys as ids."""
    folder = tmp_path_factory.mktemp("loose")
    uris = []
    for key, suffix, data in IMAGES:
        (folder / f"{key}.{suffix}").write_bytes(data)
        uris.append(str(folder / f"{key}.{suffix}"))
    pq.write_table(pa.table({"image_id": [k for k, _, _ in IMAGES], "uri": uris}),
                   str(folder / "manifest.parquet"))
    out = str(folder / "store")
    run_extraction(_cfg(checkpoint, out, manifest=str(folder / "manifest.parquet")))
    return FeatureStore(out)


def _cfg(checkpoint: str, out: str, **inputs) -> ExtractConfig:
    return ExtractConfig(out=out, checkpoint=checkpoint, rows_per_shard=4, batch_size=4,
                         read_threads=2, **inputs)


def _assert_same_features(store: FeatureStore, loose: FeatureStore, ids: dict) -> None:
    for image_id, key in ids.items():
        got, want = store.get(image_id), loose.get(key)
        assert (got.image_w, got.image_h) == (want.image_w, want.image_h)
        # (equal up to float rounding: the images meet in other batches)
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got.features.astype(np.float32), want.features.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


def test_tar_shards_in_s3_give_the_features_of_loose_files(ray_cluster, s3_bucket, checkpoint,
                                                           loose_store, tmp_path):
    samples = image_samples(IMAGES)
    samples.insert(6, ("000000100", {"txt": b"a sample without its image"}))
    local = [write_tar(str(tmp_path / "00000.tar"), samples[:5]),
             write_tar(str(tmp_path / "00001.tar"), samples[5:])]
    for path in local:  # as img2dataset leaves them: a metadata Parquet beside each tar
        for name in (path, path[:-4] + ".parquet"):
            storage.write_bytes(f"{s3_bucket}/shards/{os.path.basename(name)}", open(name, "rb").read())
    out = f"{s3_bucket}/store"
    summary = run_extraction(_cfg(checkpoint, out, images=f"{s3_bucket}/shards/"))
    assert (summary["inputs"], summary["features"], summary["errors"]) == (10, 9, 1)
    assert summary["shards"] == 2 and summary["skipped_files"]["count"] == 2  # the .parquet files
    store = FeatureStore(out)
    assert sorted(store.image_ids) == sorted(k for k, _, _ in IMAGES)
    _assert_same_features(store, loose_store, {k: k for k, _, _ in IMAGES})
    report = inspect_store(out)  # a plan of one row per tar: every shard complete, no warning
    assert report["plan"]["complete_shards"] == 2 and not report["warnings"]
    again = run_extraction(_cfg(checkpoint, out, images=f"{s3_bucket}/shards/*.tar"))
    assert (again["shards_skipped"], again["images_processed"], again["inputs"]) == (2, 0, 10)


def test_img2dataset_tables_skip_failed_downloads(ray_cluster, checkpoint, loose_store, tmp_path):
    path = write_img2dataset_table(str(tmp_path / "in" / "00000.parquet"), IMAGES, failed=3)
    out = str(tmp_path / "store")
    summary = run_extraction(_cfg(checkpoint, out, table=str(tmp_path / "in")))
    assert (summary["inputs"], summary["features"], summary["errors"], summary["skipped_rows"]) == \
        (12, 9, 0, 3)
    assert summary["features"] + summary["errors"] + summary["skipped_rows"] == summary["inputs"]
    _assert_same_features(FeatureStore(out), loose_store, {k: k for k, _, _ in IMAGES})
    assert run_extraction(_cfg(checkpoint, out, table=path))["shards_processed"] == 0


def test_hugging_face_tables_with_integer_ids(ray_cluster, checkpoint, loose_store, tmp_path):
    ids = list(range(500, 509))
    path = write_hf_table(str(tmp_path / "hf.parquet"), IMAGES, ids)
    out = str(tmp_path / "store")
    summary = run_extraction(_cfg(checkpoint, out, table=path))
    assert (summary["inputs"], summary["features"]) == (9, 9)
    store = FeatureStore(out)
    assert store.metadata["image_id_type"] == "int64"
    _assert_same_features(store, loose_store, dict(zip(ids, (k for k, _, _ in IMAGES))))


def test_one_store_holds_one_kind_of_input(ray_cluster, checkpoint, tmp_path):
    tars = str(tmp_path / "tars")
    write_tar(f"{tars}/00000.tar", image_samples(IMAGES[:2]))
    (tmp_path / "tars" / "extra.jpg").write_bytes(IMAGES[0][2])
    with pytest.raises(ConfigError, match="1 tar shards and 1 image files"):
        run_extraction(_cfg(checkpoint, str(tmp_path / "a"), images=tars))
    os.remove(tmp_path / "tars" / "extra.jpg")
    out = str(tmp_path / "store")
    run_extraction(_cfg(checkpoint, out, images=tars, plan_only=True))
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "1.jpg").write_bytes(IMAGES[0][2])
    with pytest.raises(ConfigError, match="planned from tar shards or tables"):
        run_extraction(_cfg(checkpoint, out, images=str(loose), plan_only=True))
