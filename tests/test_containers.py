"""Reading samples out of tar shards and Parquet image tables, and planning them (no Ray)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from containers_kit import image_samples, make_images, write_hf_table, write_img2dataset_table, write_tar

from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.extraction.container_plan import plan_containers
from ray_updown.extraction.containers import (
    ContainerSpec,
    check_table_columns,
    sample_key,
    table_samples,
    table_spec,
    tar_samples,
    tar_spec,
)


def _rows(chunks) -> list[dict]:
    return [row for chunk in chunks for row in chunk.to_pylist()]


def test_webdataset_keys_are_the_path_up_to_the_first_dot_of_the_base_name():
    assert sample_key("000000012.jpg") == ("000000012", "jpg")
    assert sample_key("a/b/x.seg.PNG") == ("a/b/x", "seg.png")
    assert sample_key("dir.v1/img") == ("dir.v1/img", "")


def test_a_tar_yields_every_sample_with_its_key_and_image_bytes(tmp_path):
    images = make_images(7)
    path = write_tar(str(tmp_path / "00000.tar"), image_samples(images))
    rows = _rows(tar_samples(path, ContainerSpec("tar"), chunk=3))
    assert [r["image_id"] for r in rows] == [k for k, _, _ in images]
    assert [r["data"] for r in rows] == [d for _, _, d in images]
    assert [r["row"] for r in rows] == list(range(7))
    assert rows[1]["uri"] == f"{path}#000000001.png" and not any(r["reason"] for r in rows)


def test_ids_from_a_json_field_keep_its_type(tmp_path):
    path = write_tar(str(tmp_path / "a.tar"), image_samples(make_images(3), start=100))
    spec = tar_spec(path, "image_id")
    assert spec.id_type == "int64"
    assert [r["image_id"] for r in _rows(tar_samples(path, spec, 8))] == [100, 101, 102]
    assert tar_spec(path, "key").id_type == "string"
    with pytest.raises(DataError, match="no 'nope' field"):
        tar_spec(path, "nope")


def test_a_sample_without_an_image_and_a_json_without_the_id_are_error_rows(tmp_path):
    images = make_images(3)
    samples = image_samples(images)
    samples[1] = (samples[1][0], {"json": b'{"image_id": 7}', "txt": b"no image"})
    samples[2] = (samples[2][0], {"jpg": images[2][2], "json": b'{"other": 1}'})
    path = write_tar(str(tmp_path / "a.tar"), samples)
    rows = _rows(tar_samples(path, ContainerSpec("tar", "int64", id_column="image_id"), 8))
    assert [r["reason"] == "" for r in rows] == [True, False, False]
    assert "has no image member" in rows[1]["reason"] and "000000001" in rows[1]["reason"]
    assert rows[1]["uri"] == f"{path}#000000001"
    assert "no 'image_id' field" in rows[2]["reason"] and rows[2]["image_id"] is None


def test_non_ascii_keys_and_a_repeated_key(tmp_path):
    images = make_images(3)
    samples = [("café/été", {"jpg": images[0][2]}), ("日本", {"png": images[1][2]}),
               ("café/été", {"jpg": images[2][2]})]
    path = write_tar(str(tmp_path / "ü.tar"), samples)
    rows = _rows(tar_samples(path, ContainerSpec("tar"), 8))
    assert [r["image_id"] for r in rows] == ["café/été", "日本", "café/été"]
    assert [bool(r["reason"]) for r in rows] == [False, False, True]
    assert "appears twice" in rows[2]["reason"]


def test_a_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    images = make_images(6)
    path = write_tar(str(tmp_path / "t.tar"), image_samples(images))
    data = open(path, "rb").read()
    # Cut inside the fifth sample's image: four samples are whole.
    cut = data.index(images[4][2][:64]) + 100
    with open(path, "wb") as f:
        f.write(data[:cut])
    rows = _rows(tar_samples(path, ContainerSpec("tar"), 2))
    assert [r["image_id"] for r in rows if not r["reason"]] == [k for k, _, _ in images[:4]]
    damaged = [r for r in rows if r["reason"]]
    assert len(damaged) == 1 and damaged[0]["image_id"] == images[4][0]
    assert "damaged" in damaged[0]["reason"]


def test_a_file_that_is_not_a_tar_is_one_error_row(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(os.urandom(3000))
    rows = _rows(tar_samples(str(path), ContainerSpec("tar"), 8))
    assert len(rows) == 1 and rows[0]["image_id"] is None and "no sample could be read" in rows[0]["reason"]


def test_table_columns_are_chosen_where_unambiguous_and_named_otherwise(tmp_path):
    images = make_images(5)
    img2 = write_img2dataset_table(str(tmp_path / "i2d.parquet"), images, failed=2)
    spec = table_spec(img2)
    assert (spec.image_column, spec.id_column, spec.id_type, spec.status_column) == \
        ("jpg", "key", "string", "status")
    hf = write_hf_table(str(tmp_path / "hf.parquet"), images, list(range(10, 15)))
    spec = table_spec(hf)
    assert (spec.image_column, spec.id_column, spec.id_type) == ("image.bytes", "image_id", "int64")
    assert table_spec(hf, id_column="image.path").id_type == "string"
    two = str(tmp_path / "two.parquet")
    pq.write_table(pa.table({"jpg": [b"x"], "png": [b"y"], "id": [1], "key": ["a"]}), two)
    with pytest.raises(ConfigError, match=r"several columns of image bytes \(\['jpg', 'png'\]\)"):
        table_spec(two)
    with pytest.raises(ConfigError, match=r"several id columns \(\['id', 'key'\]\); name one with id_field="):
        table_spec(two, image_column="jpg")
    assert table_spec(two, "png", "id").id_column == "id"
    with pytest.raises(ConfigError, match="none of the columns of image bytes is named 'gif'"):
        table_spec(two, "gif", "id")


def test_failed_downloads_are_skipped_and_counted_not_errors(tmp_path):
    images = make_images(5)
    path = write_img2dataset_table(str(tmp_path / "i2d.parquet"), images, failed=3, row_group_size=3)
    spec = table_spec(path)
    plan, _ = plan_containers([path], spec, rows_per_shard=4)
    assert plan.column("num_groups").to_pylist() == [2, 1] and plan.column("num_rows").to_pylist() == [6, 2]
    got, skipped = [], 0
    for shard in plan.to_pylist():
        for chunk, n in table_samples(path, shard["first_group"], shard["num_groups"], spec, 2):
            got += chunk.to_pylist()
            skipped += n
    assert [r["image_id"] for r in got] == [k for k, _, _ in images] and skipped == 3
    assert got[0]["uri"] == f"{path}#row0" and got[4]["uri"] == f"{path}#row4"


def test_container_plans_grow_by_new_sources_only(tmp_path):
    paths = [write_tar(str(tmp_path / f"{i:05d}.tar"), image_samples(make_images(2))) for i in range(3)]
    spec = ContainerSpec("tar")
    first, _ = plan_containers(paths[:2], spec, 100)
    assert first.column("num_rows").to_pylist() == [-1, -1]
    again, _ = plan_containers(paths[::-1], spec, 100, previous=first)
    assert again.column("source").to_pylist() == paths[:2] + [paths[2]]
    assert again.column("shard").to_pylist() == [0, 1, 2]


def test_json_sidecar_ids_can_be_strings(tmp_path):
    samples = [("k1", {"jpg": make_images(1)[0][2], "json": json.dumps({"uid": "a-1"}).encode()})]
    path = write_tar(str(tmp_path / "s.tar"), samples)
    spec = tar_spec(path, "uid")
    assert spec.id_type == "string" and _rows(tar_samples(path, spec, 4))[0]["image_id"] == "a-1"


def test_a_tar_replaced_under_its_name_is_refused_or_redone(tmp_path):
    paths = [write_tar(str(tmp_path / f"{i:05d}.tar"), image_samples(make_images(2))) for i in range(2)]
    files = {p: (os.path.getsize(p), "v1") for p in paths}
    first, redo = plan_containers(paths, ContainerSpec("tar"), 100, files=files)
    assert redo == [] and first.column("size").to_pylist() == [files[p][0] for p in paths]
    files[paths[1]] = (files[paths[1]][0], "v2")  # the second tar replaced
    with pytest.raises(ConfigError, match=r"1 tar shard\(s\) or table\(s\) .* changed since.*00001\.tar"):
        plan_containers(paths, ContainerSpec("tar"), 100, previous=first, files=files)
    again, redo = plan_containers(paths, ContainerSpec("tar"), 100, previous=first, files=files,
                                  redo_changed=True)
    assert redo == [1]
    assert again.select(["shard", "source", "num_groups"]).to_pylist() == [
        {"shard": 0, "source": paths[0], "num_groups": 1},
        {"shard": 1, "source": paths[1], "num_groups": 0},  # emptied, redone
        {"shard": 2, "source": paths[1], "num_groups": 1}]  # the new tar's samples
    assert plan_containers(paths, ContainerSpec("tar"), 100, previous=again, files=files)[1] == []


def test_tables_that_do_not_fit_the_first_or_are_not_parquet_are_named(tmp_path):
    images = make_images(2)
    first = write_img2dataset_table(str(tmp_path / "a.parquet"), images)
    spec = table_spec(first)
    other = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"key": ["x"], "png": [images[0][2]]}), other)
    with pytest.raises(DataError, match=r"b\.parquet: lacks column 'jpg'"):
        check_table_columns(other, spec)
    junk = tmp_path / "c.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"c\.parquet: not a readable Parquet file"):
        table_spec(str(junk))
    with pytest.raises(StorageError, match=r"d\.tar: no such tar"):
        list(tar_samples(str(tmp_path / "d.tar"), ContainerSpec("tar"), 4))
