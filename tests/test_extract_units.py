"""Extraction pieces that need no Ray: inputs, ids, shard plans, the actor's logic, early errors."""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ray_updown import storage
from ray_updown.detector import BottomUpDetector, save_detector, tiny_config
from ray_updown.errors import CheckpointError, ConfigError, DataError, StorageError
from ray_updown.extraction.inputs import image_id_from_name, list_images, list_inputs, read_manifest
from ray_updown.extraction.model import ModelSpec
from ray_updown.extraction.per_image import BatchDetector, result_schema
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
from ray_updown.extraction.plan import PlanReader, load_plan, plan_table, save_plan, shard_ranges
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard


def test_image_ids_follow_coco_and_vg_file_names():
    assert image_id_from_name("s3://b/val2014/COCO_val2014_000000391895.jpg") == 391895
    assert image_id_from_name("/data/train2017/000000000009.jpg") == 9
    assert image_id_from_name("VG_100K_2/2345.jpg") == 2345
    assert image_id_from_name("holiday-photo.jpg") is None


def test_listing_gives_int_ids_or_relative_paths(tmp_path):
    for name in ("a/COCO_train2014_000000000003.jpg", "b/7.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rows = list_images(str(tmp_path))
    assert [(r.image_id, r.uri.endswith(("3.jpg", "7.png"))) for r in rows] == [(3, True), (7, True)]
    (tmp_path / "b" / "cat.jpg").write_bytes(b"x")
    assert [r.image_id for r in list_images(str(tmp_path))] == [
        "a/COCO_train2014_000000000003.jpg", "b/7.png", "b/cat.jpg"]
    assert [r.image_id for r in list_images(str(tmp_path / "b") + "/*.png")] == [7]


def test_manifests_in_three_formats_resolve_relative_uris(tmp_path):
    table = pa.table({"image_id": ["x1", "x2"], "uri": ["imgs/1.jpg", "s3://bucket/2.jpg"]})
    pq.write_table(table, tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("image_id,uri\n5,imgs/5.jpg\n6,/abs/6.jpg\n")
    (tmp_path / "m.jsonl").write_text('{"image_id": 8, "uri": "8.jpg"}\n')
    rows = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    assert [(r["image_id"], r["uri"]) for r in rows] == [("x1", str(tmp_path / "imgs/1.jpg")),
                                                         ("x2", "s3://bucket/2.jpg")]
    rows = read_manifest(str(tmp_path / "m.csv"), images_root="s3://other").to_pylist()
    assert [(r["image_id"], r["uri"]) for r in rows] == [(5, "s3://other/imgs/5.jpg"), (6, "/abs/6.jpg")]
    assert read_manifest(str(tmp_path / "m.jsonl")).column("image_id").to_pylist() == [8]
    (tmp_path / "bad.csv").write_text("id,path\n1,a.jpg\n")
    with pytest.raises(DataError, match="lacks column"):
        read_manifest(str(tmp_path / "bad.csv"))
    (tmp_path / "empty.csv").write_text("image_id,uri\n1,a.jpg\n2,\n")
    with pytest.raises(DataError, match="empty image_id or uri") as info:
        read_manifest(str(tmp_path / "empty.csv"))
    assert info.value.record == "row 2"  # data rows counted from 1


def test_manifest_boxes_become_the_plans_given_boxes(tmp_path):
    boxes = [[[1, 2, 30, 40], [0, 0, 5, 5]], None, []]
    pq.write_table(pa.table({"image_id": [1, 2, 3], "uri": ["a.jpg", "b.jpg", "c.jpg"],
                             "boxes": boxes}), tmp_path / "m.parquet")
    inputs = read_manifest(str(tmp_path / "m.parquet"))
    assert inputs.schema.field("given_boxes").type == pa.list_(pa.list_(pa.float32()))
    plan = plan_table(inputs, 2)
    assert plan.column("given_boxes").to_pylist() == [[[1, 2, 30, 40], [0, 0, 5, 5]], None, []]
    # CSV cells hold JSON; a cell that is not JSON names its row.
    (tmp_path / "m.csv").write_text('image_id,uri,boxes\n1,a.jpg,"[[1, 2, 3, 4]]"\n2,b.jpg,\n')
    assert read_manifest(str(tmp_path / "m.csv")).column("given_boxes").to_pylist() == [
        [[1, 2, 3, 4]], None]
    (tmp_path / "bad.csv").write_text('image_id,uri,boxes\n1,a.jpg,"[[1, 2"\n')
    with pytest.raises(DataError, match="boxes is not a JSON list") as info:
        read_manifest(str(tmp_path / "bad.csv"))
    assert info.value.record == "row 1"


def _inputs(names, extra=()):
    return pa.table({"image_id": pa.array([image_id_from_name(n) for n in names]
                                          + [i for i, _ in extra], pa.int64()),
                     "uri": [f"/img/{n}" for n in names] + [u for _, u in extra]})


def _rows(plan, *columns):
    return [tuple(r[c] for c in columns) for r in plan.to_pylist()]


def test_shard_plan_keeps_input_order_and_extends_without_moving_rows(tmp_path):
    names = [f"{i}.jpg" for i in (5, 1, 4, 2, 3)]
    plan = plan_table(_inputs(names), rows_per_shard=2)
    assert _rows(plan, "uri", "shard") == [
        ("/img/5.jpg", 0), ("/img/1.jpg", 0), ("/img/4.jpg", 1), ("/img/2.jpg", 1), ("/img/3.jpg", 2)]
    assert plan.equals(plan_table(_inputs(names), rows_per_shard=2))
    save_plan(str(tmp_path), plan)
    previous = load_plan(str(tmp_path))
    assert previous.equals(plan)
    # The same inputs in another order: already planned, nothing moves.
    assert plan_table(_inputs(list(reversed(names))), 2, previous).equals(plan)
    # New images go to new shards in input order; old rows keep theirs; a repeated id errs.
    grown = plan_table(_inputs(names + ["0.jpg", "6.jpg"], [(3, "/img/copy/3.jpg")]),
                       rows_per_shard=2, previous=previous)
    assert _rows(grown.slice(0, 5), "uri", "shard") == _rows(plan, "uri", "shard")
    assert _rows(grown.slice(5), "uri", "shard") == [
        ("/img/0.jpg", 3), ("/img/6.jpg", 3), ("/img/copy/3.jpg", 4)]
    dup = grown.to_pylist()[-1]
    assert dup["stage"] == "list" and "duplicate image id 3" in dup["reason"]
    assert "planned by an earlier run, is kept: /img/3.jpg" in dup["reason"]
    assert grown.column("row").to_pylist() == list(range(8))
    assert shard_ranges(grown).to_pylist()[3:] == [
        {"shard": 3, "first_row": 5, "num_rows": 2}, {"shard": 4, "first_row": 7, "num_rows": 1}]
    twice = plan_table(pa.table({"image_id": [1, 2], "uri": ["/img/a.jpg", "/img/a.jpg"]}), 5)
    assert twice.to_pylist()[1]["stage"] == "list"
    assert "duplicate uri (already listed as image id 1, input row 1)" in twice.to_pylist()[1]["reason"]
    with pytest.raises(DataError, match="mix integers and strings"):
        plan_table(pa.table({"image_id": ["a.jpg"], "uri": ["/img/a.jpg"]}), 2, previous)


def test_duplicate_ids_keep_the_first_row_in_input_order_and_name_it(tmp_path):
    inputs = pa.table({"image_id": pa.array([24, 17, 24, 24], pa.int64()),
                       "uri": ["/i/024.jpg", "/i/017.jpg", "/i/001.jpg", "/i/099.jpg"]})
    plan = plan_table(inputs, 2).to_pylist()
    assert [r["reason"] == "" for r in plan] == [True, True, False, False]
    assert all("the first, input row 1, is kept: /i/024.jpg" in r["reason"] for r in plan[2:])


def test_a_plan_of_many_batches_finds_repeats_across_them(tmp_path):
    from ray_updown.extraction.plan_build import build_plan

    n = 50_000
    uris = pa.array([f"s3://b/images/{i:09d}.jpg" for i in range(n)])
    ids = pa.array(np.arange(n, dtype=np.int64))
    # Row 49,999 repeats the URI of row 3; row 30,000 repeats the id of row 7.
    uris = pa.array(uris.to_pylist()[:-1] + ["s3://b/images/000000003.jpg"])
    ids = ids.to_numpy().copy()
    ids[30_000] = 7
    table = pa.table({"image_id": ids, "uri": uris})
    batches = lambda: (table.slice(i, 7000) for i in range(0, n, 7000))  # noqa: E731
    built = build_plan(batches, 1000)
    new, ranges, rows, kind = built.new, built.ranges, built.rows, built.kind
    with new.folder:
        plan = pq.read_table(new.path)
    assert (rows, kind, ranges.num_rows, plan.num_rows) == (n, "int64", 50, n)
    bad = plan.filter(pc.not_equal(plan.column("reason"), "")).to_pylist()
    assert [(r["row"], r["stage"]) for r in bad] == [(30_000, "list"), (49_999, "list")]
    assert "input row 8" in bad[0]["reason"] and "input row 4" in bad[1]["reason"]
    assert plan.column("shard").to_pylist()[::1000] == list(range(50))


def test_a_worker_reads_its_shards_rows_from_the_saved_plan(tmp_path, monkeypatch):
    import ray_updown.extraction.plan as plan_module

    monkeypatch.setattr(plan_module, "PLAN_ROW_GROUP", 3)  # shards straddle row groups
    inputs = pa.table({"image_id": pa.array(range(10), pa.int64()),
                       "uri": [f"/img/{i:02d}.jpg" for i in range(10)]})
    plan = plan_table(inputs, 4)
    save_plan(str(tmp_path), plan)
    reader = PlanReader(str(tmp_path))
    assert reader.file.num_row_groups == 4
    for r in shard_ranges(plan).to_pylist():
        rows = reader.rows(r["first_row"], r["num_rows"])
        assert rows.equals(plan.slice(r["first_row"], r["num_rows"]))
    with pytest.raises(DataError, match="the plan holds 10"):
        reader.rows(8, 4)


def test_a_listing_is_arrow_and_streams_local_folders(tmp_path):
    for i in range(3):
        (tmp_path / "d" / f"sub{i}").mkdir(parents=True)
        (tmp_path / "d" / f"sub{i}" / f"{i + 1}.jpg").write_bytes(b"x")
    listing = list_inputs(str(tmp_path / "d"))
    assert listing.table.column("image_id").to_pylist() == [1, 2, 3]
    assert listing.table.column("uri").to_pylist() == sorted(listing.table.column("uri").to_pylist())


class PoisonModel:
    """Deterministic model: one box (the whole image), features = mean colour; raises on an
    image whose top-left pixel is 13 (and so fails any batch holding it)."""

    name, feature_dim = "poison-test", 3

    def extract_regions(self, images):
        if any(int(im[0, 0, 0]) == 13 for im in images):
            raise ValueError("poisoned pixel")
        return [{"boxes": np.array([[0, 0, im.shape[1], im.shape[0]]], np.float32),
                 "features": im.reshape(-1, 3).mean(0, keepdims=True).astype(np.float32),
                 "object_ids": np.array([1], np.int32), "object_conf": np.array([0.5], np.float32),
                 "attr_ids": np.array([2], np.int32), "attr_conf": np.array([0.25], np.float32),
                 "image_w": im.shape[1], "image_h": im.shape[0]} for im in images]


def test_actor_retries_one_by_one_and_maps_boxes_to_original_pixels():
    meta = StoreMeta(feature_dim=3, image_id_type="int64", detector="poison-test")
    actor = BatchDetector(ModelSpec(factory=PoisonModel), meta)
    pixels = [np.full((10, 20, 3), v, np.uint8) for v in (50, 13, 90)] + [np.zeros((0, 0, 3), np.uint8)]
    batch = {"image_id": np.array([1, 2, 3, 4]), "uri": np.array(["a", "b", "c", "d"], dtype=object),
             "row": np.array([0, 1, 2, 3]), "shard": np.array([0, 0, 0, 0]),
             "stage": np.array(["", "", "", "decode"], dtype=object),
             "reason": np.array(["", "", "", "truncated"], dtype=object),
             "pixels": np.array(pixels + [None], dtype=object)[:-1],
             "image_w": np.array([40, 40, 40, 0], np.int32), "image_h": np.array([20, 20, 20, 0], np.int32)}
    table = actor(batch)
    assert table.schema == result_schema(meta)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == {1, 2, 3, 4}
    # The reason names the image, its file and its own size, not a batch position.
    assert (rows[2]["stage"], rows[2]["reason"]) == (
        "detect", "image 2 (b, 40x20 pixels): ValueError: poisoned pixel")
    assert (rows[4]["stage"], rows[4]["reason"], rows[4]["features"]) == ("decode", "truncated", None)
    for i, colour in ((1, 50), (3, 90)):
        assert rows[i]["reason"] == "" and rows[i]["image_w"] == 40 and rows[i]["image_h"] == 20
        assert rows[i]["boxes"] == [[0, 0, 40, 20]]  # decoded at half size: boxes doubled
        assert rows[i]["features"] == [[colour] * 3] and rows[i]["attr_ids"] == [2]


class CountingPoisonModel(PoisonModel):
    calls: list[int] = []

    def extract_regions(self, images):
        CountingPoisonModel.calls.append(len(images))
        return super().extract_regions(images)


def test_actor_forwards_in_chunks_and_retries_only_the_failing_one():
    meta = StoreMeta(feature_dim=3, image_id_type="int64", detector="poison-test")
    actor = BatchDetector(ModelSpec(factory=CountingPoisonModel), meta, forward_batch_size=2)
    colours = (50, 60, 13, 70, 80)
    batch = {"image_id": np.arange(5), "uri": np.array(list("abcde"), dtype=object),
             "row": np.arange(5), "shard": np.zeros(5, np.int64),
             "stage": np.array([""] * 5, dtype=object), "reason": np.array([""] * 5, dtype=object),
             "pixels": [np.full((10, 20, 3), v, np.uint8) for v in colours],
             "image_w": np.full(5, 20, np.int32), "image_h": np.full(5, 10, np.int32)}
    CountingPoisonModel.calls.clear()
    rows = {r["image_id"]: r for r in actor(batch).to_pylist()}
    # Forwards of 2, 2, 1; only the second (holding the poisoned image) is redone one by one.
    assert CountingPoisonModel.calls == [2, 2, 1, 1, 1]
    assert [rows[i]["stage"] for i in range(5)] == ["", "", "detect", "", ""]
    assert [rows[i]["features"][0][0] for i in (0, 1, 3, 4)] == [50, 60, 70, 80]


class NoRegionsForDarkImages(PoisonModel):
    """Keeps no region where the image is black, as a port's score threshold may."""

    def extract_regions(self, images):
        out = super().extract_regions(images)
        for im, result in zip(images, out):
            if not im.any():
                result.update({k: v[:0] for k, v in result.items() if isinstance(v, np.ndarray)})
        return out


def test_an_image_without_regions_becomes_an_error_row():
    meta = StoreMeta(feature_dim=3, image_id_type="int64", detector="poison-test")
    actor = BatchDetector(ModelSpec(factory=NoRegionsForDarkImages), meta)
    batch = {"image_id": np.arange(2), "uri": np.array(["a.jpg", "b.jpg"], dtype=object),
             "row": np.arange(2), "shard": np.zeros(2, np.int64),
             "stage": np.array([""] * 2, dtype=object), "reason": np.array([""] * 2, dtype=object),
             "pixels": [np.full((10, 20, 3), 50, np.uint8), np.zeros((10, 20, 3), np.uint8)],
             "image_w": np.full(2, 20, np.int32), "image_h": np.full(2, 10, np.int32)}
    rows = {r["image_id"]: r for r in actor(batch).to_pylist()}
    assert rows[0]["stage"] == "" and rows[0]["num_boxes"] == 1
    assert rows[1]["stage"] == "detect"
    assert "b.jpg" in rows[1]["reason"] and "kept no regions" in rows[1]["reason"]


def test_detector_streams_batches_like_single_calls():
    torch.manual_seed(0)
    model = BottomUpDetector(tiny_config()).prepare_inference("cpu")
    rng = np.random.default_rng(0)
    batches = [[rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(2)],
               [np.zeros((4, 4), np.uint8)],  # not an image: that batch's exception, then on
               [rng.integers(0, 256, (60, 30, 3), dtype=np.uint8)]]
    streamed = list(model.extract_batches(batches))
    assert isinstance(streamed[1], DataError)
    for images, got in zip((batches[0], batches[2]), (streamed[0], streamed[2])):
        for a, b in zip(model.extract_regions(images), got):
            np.testing.assert_array_equal(a["features"], b["features"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    uri = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_detector(BottomUpDetector(tiny_config()), uri)
    return uri


def test_unwritable_output_fails_before_any_work(tmp_path, s3_bucket):
    (tmp_path / "a-file").write_text("x")
    for out in (str(tmp_path / "a-file" / "store"), "s3://no-such-bucket-for-ray-updown/store"):
        cfg = ExtractConfig(images=str(tmp_path), out=out, checkpoint=str(tmp_path / "missing"))
        with pytest.raises(StorageError, match="output cannot be written") as info:
            run_extraction(cfg)  # the missing checkpoint is never reached
        assert info.value.file == out


def test_checkpoint_that_does_not_match_its_config_fails_before_any_work(tmp_path, checkpoint):
    bad = str(tmp_path / "bad")
    for name in ("detector.safetensors", "detector.json"):
        storage.write_bytes(storage.join(bad, name), storage.read_bytes(storage.join(checkpoint, name)))
    meta = json.loads(storage.read_text(storage.join(bad, "detector.json")))
    meta["config"]["num_classes"] = 9  # the weights hold 5 classes
    storage.write_json(storage.join(bad, "detector.json"), meta)
    out = tmp_path / "store"
    with pytest.raises(CheckpointError, match="does not match the model"):
        run_extraction(ExtractConfig(images=str(tmp_path), out=str(out), checkpoint=bad))
    with pytest.raises(CheckpointError, match="no such file"):
        run_extraction(ExtractConfig(images=str(tmp_path), out=str(out), checkpoint=str(tmp_path / "nope")))
    assert not (out / "features").exists() and not (out / "extract_plan.parquet").exists()


def test_a_store_of_another_model_is_not_extended(tmp_path, checkpoint):
    out = str(tmp_path / "store")
    other = StoreMeta(feature_dim=64, image_id_type="int64", detector="someone-else")
    write_feature_shard([FeatureRecord(1, 4, 4, np.zeros((1, 4)), np.zeros((1, 64)))],
                        feature_shard_uri(out, 0), other)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "2.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds features of someone-else"):
        run_extraction(ExtractConfig(images=str(tmp_path / "imgs"), out=out, checkpoint=checkpoint))


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="out"):
        run_extraction(ExtractConfig(images="x"))  # empty by default: checked before any work
    with pytest.raises(ConfigError, match="images"):
        run_extraction(ExtractConfig(out="y"))
    with pytest.raises(ConfigError, match="half"):
        ExtractConfig(images="x", out="y", half=True).validate()
    with pytest.raises(ConfigError, match="model"):
        ExtractConfig(images="x", out="y", model="yolo").validate()
    spec = ExtractConfig(images="x", out="y", model="grid", grid_size=3).model_spec(
        functools.partial(PoisonModel))
    assert (spec.kind, spec.grid_size, spec.factory is not None) == ("grid", 3, True)


def test_workers_write_shards_from_arrow_tables(tmp_path):
    from ray_updown.extraction.actor import numpy_batch
    from ray_updown.features.reader import FeatureStore
    from ray_updown.features.records import records_to_table
    from ray_updown.features.writer import write_feature_table

    meta = StoreMeta(feature_dim=3, image_id_type="int64", detector="t")
    records = [FeatureRecord(i, 8, 6, np.array([[0, 0, 4, 4]] * i, np.float32),
                             np.full((i, 3), i, np.float32)) for i in (1, 2)]
    table = records_to_table(records, meta)
    uri = feature_shard_uri(str(tmp_path / "s"), 0)
    assert write_feature_table(table, uri, meta) == 2
    store = FeatureStore(str(tmp_path / "s"))
    assert store.get(2).features.shape == (2, 3) and (store.get(2).features == 2).all()
    with pytest.raises(DataError, match="lacks column"):
        write_feature_table(table.drop_columns(["boxes"]), uri, meta)
    # The plan rows a worker hands the detector: given_boxes as None or lists of boxes.
    plan = plan_table(pa.table({"image_id": pa.array([1, 2], pa.int64()), "uri": ["/a", "/b"],
                                "given_boxes": pa.array([None, [[1.0, 2.0, 3.0, 4.0]]],
                                                        pa.list_(pa.list_(pa.float32())))}), 4)
    batch = numpy_batch(plan)
    assert list(batch["given_boxes"]) == [None, [[1.0, 2.0, 3.0, 4.0]]]
    assert batch["image_id"].dtype == np.int64 and list(batch["uri"]) == ["/a", "/b"]


def test_an_s3_prefix_is_listed_page_by_page(s3_bucket, monkeypatch):
    import ray_updown.extraction.inputs as inputs

    for i in range(1, 6):
        storage.write_bytes(f"{s3_bucket}/pages/{i}.jpg", b"x")
    storage.write_bytes(f"{s3_bucket}/pages/notes.txt", b"x")
    monkeypatch.setattr(inputs, "S3_PAGE_KEYS", 2)
    pages = list(inputs._pages(f"{s3_bucket}/pages/"))
    assert [len(p) for p in pages] == [2, 2, 2]  # one list request a page
    assert pages[0][0][1] == 1 and pages[0][0][2]  # each file's size and ETag
    listing = list_inputs(f"{s3_bucket}/pages/")
    assert listing.table.column("image_id").to_pylist() == [1, 2, 3, 4, 5]
    assert listing.skipped_summary()["by_reason"] == {"suffix": 1}


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_manifests_stream_in_batches_and_errors_count_rows_across_them(tmp_path, suffix):
    from ray_updown.extraction.inputs import manifest_batches

    table = pa.table({"image_id": pa.array(range(1, 41), pa.int64()),
                      "uri": [f"img/{i:03d}.jpg" for i in range(1, 41)]})
    path = str(tmp_path / f"m.{suffix}")
    if suffix == "parquet":
        pq.write_table(table, path, row_group_size=8)
    elif suffix == "csv":
        import pyarrow.csv as pa_csv
        pa_csv.write_csv(table, path)
    else:
        with open(path, "w") as f:
            f.writelines(f'{{"image_id": {i}, "uri": "{u}"}}\n' for i, u in
                         zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))
    parts = list(manifest_batches(path, rows=8))
    assert len(parts) > 1
    assert pa.concat_tables(parts).column("image_id").to_pylist() == list(range(1, 41))
    assert pa.concat_tables(parts).column("uri").to_pylist()[0] == str(tmp_path / "img/001.jpg")
    # An empty uri far into the manifest is named by its row over the whole manifest.
    if suffix == "parquet":
        bad = table.set_column(1, "uri", pa.array([u if i != 33 else "" for i, u in
                                                   enumerate(table.column("uri").to_pylist())]))
        pq.write_table(bad, path, row_group_size=8)
        with pytest.raises(DataError, match="empty image_id or uri") as info:
            list(manifest_batches(path, rows=8))
        assert info.value.record == "row 34"  # the 34th data row


def test_a_prefix_and_a_glob_list_the_same_sizes_and_versions(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / "d" / name).write_bytes(b"x" * len(name))
    by_prefix = list_inputs(str(tmp_path / "d")).table.select(["uri", "size", "version"])
    by_glob = list_inputs(str(tmp_path / "d" / "*.jpg")).table.select(["uri", "size", "version"])
    assert by_prefix.equals(by_glob) and by_prefix.column("size").to_pylist() == [5, 5]


def test_a_manifest_after_a_listing_is_no_change(tmp_path):
    from ray_updown.extraction.plan_build import build_plan

    listing = pa.table({"image_id": pa.array([1, 2], pa.int64()), "uri": ["/i/1.jpg", "/i/2.jpg"],
                        "size": pa.array([10, 20], pa.int64()), "version": ["a", "b"]})
    first = build_plan(lambda: [listing], 5)
    saved = pq.ParquetFile(first.new.path)
    manifest = listing.select(["image_id", "uri"])  # says nothing of the files
    assert build_plan(lambda: [manifest], 5, saved).new is None  # the saved plan stands
    # A manifest that also repeats a row is planned again (no longer the same inputs): the
    # listed rows are not "changed" by the manifest's silence on sizes and versions.
    assert build_plan(lambda: [pa.concat_tables([manifest, manifest.slice(0, 1)])], 5, saved).new \
        is not None
    replaced = listing.set_column(2, "size", pa.array([10, 21], pa.int64()))
    with pytest.raises(ConfigError, match=r"1 image\(s\) this store already planned changed.*ids 2"):
        build_plan(lambda: [replaced], 5, saved)
    assert build_plan(lambda: [replaced], 5, saved, redo_changed=True).redo_shards.tolist() == [0]
