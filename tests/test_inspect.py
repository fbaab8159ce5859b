"""`ray-updown inspect`: store summaries, their text, the histogram PNG, S3, plans and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_updown import storage
from ray_updown.cli import main
from ray_updown.errors import DataError
from ray_updown.features.histograms import Histogram, store_histograms
from ray_updown.features.inspect import format_summary, inspect_store
from ray_updown.features.records import FeatureRecord, records_to_table
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import error_shard_uri, feature_shard_uri, write_error_shard, write_feature_shard
from ray_updown.viz.store_plots import plot_store

D = 8
CONFIG = {"weights": "vg-r101", "nms": 0.3, "min_boxes": [10, 100]}
# Boxes per image of shard 0 and shard 1 (one image without boxes): 8 images,
# sorted 0 1 2 3 4 4 5 7 -> min 0, median (3 + 4) / 2, mean 26 / 8, max 7.
BOXES = ([2, 5, 0, 3], [7, 1, 4, 4])
# (stage, reason, rows in shard 0, rows in shard 1): decode has 6 reasons, so the 5 shown drop one.
ERRORS = [("decode", "truncated JPEG", 2, 2), ("decode", "bad header", 3, 0),
          ("decode", "zero-size image", 1, 1), ("decode", "unsupported mode CMYK", 0, 2),
          ("decode", "too large", 1, 0), ("decode", "odd", 0, 1), ("read", "no such file", 1, 1)]


def confidences(image_id: int, k: int) -> np.ndarray:
    # Bin centres of 50 bins over [0, 1] (exact in float32): no value sits on a bin edge.
    return ((np.arange(k) * 7 + image_id) % 50 * 0.02 + 0.01).astype(np.float32)


def record(image_id: int, k: int) -> FeatureRecord:
    xy = np.arange(k * 2, dtype=np.float32).reshape(k, 2)
    return FeatureRecord(image_id=image_id, image_w=64, image_h=48, boxes=np.concatenate([xy, xy + 5], 1),
                         features=np.ones((k, D), np.float32), object_ids=np.arange(k) + 1,
                         object_conf=confidences(image_id, k))


def meta() -> StoreMeta:
    return StoreMeta(feature_dim=D, image_id_type="int64", detector="vg-frcnn-r101",
                     detector_config=CONFIG, checkpoint_hash="ckpt-42")


def build_store(uri: str) -> list[FeatureRecord]:
    records = []
    image_id = 100
    for shard, counts in enumerate(BOXES):
        part = []
        for k in counts:
            part.append(record(image_id, k))
            image_id += 1
        write_feature_shard(part, feature_shard_uri(uri, shard), meta(), row_group_rows=3)
        records += part
        rows = [{"image_id": 900 + n, "uri": f"img{n}.jpg", "stage": stage, "reason": reason}
                for stage, reason, *per_shard in ERRORS for n in range(per_shard[shard])]
        write_error_shard(rows, error_shard_uri(uri, shard), "int64")
    return records


def expected_hash(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def sizes(folder: str) -> list[int]:
    return [os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]


def check_png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size == (1000, 400)
    pixels = np.asarray(img.convert("RGB"))
    assert (pixels.min(axis=2) < 200).mean() > 0.02  # drawn, not a blank canvas
    return pixels


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("inspect") / "store")
    return uri, build_store(uri)


def test_summary_counts_are_exact(local_store):
    uri, _ = local_store
    s = inspect_store(uri)
    assert s["store"] == uri and s["images"] == 8 and s["errors"] == 15
    decode, read = s["errors_by_stage"]["decode"], s["errors_by_stage"]["read"]
    assert list(s["errors_by_stage"]) == ["decode", "read"]  # most errors first
    assert decode["count"] == 13 and read["count"] == 2
    assert decode["top_reasons"] == [
        {"reason": "truncated JPEG", "count": 4}, {"reason": "bad header", "count": 3},
        {"reason": "unsupported mode CMYK", "count": 2}, {"reason": "zero-size image", "count": 2},
        {"reason": "odd", "count": 1}]  # "too large" (1) is the sixth: ties go alphabetically
    assert read["top_reasons"] == [{"reason": "no such file", "count": 2}]
    all_boxes = [k for shard in BOXES for k in shard]
    assert s["boxes_per_image"] == {"min": 0, "median": 3.5, "mean": 3.25, "max": 7,
                                    "total": sum(all_boxes), "zero": 1}
    assert s["boxes_per_image"]["median"] == np.median(all_boxes)
    assert (s["feature_dim"], s["features_dtype"], s["image_id_type"]) == (D, "float16", "int64")
    assert s["detector"] == "vg-frcnn-r101" and s["checkpoint_hash"] == "ckpt-42"
    assert s["detector_config_hash"] == expected_hash(CONFIG)
    assert s["object_vocab_size"] is None and s["attribute_vocab_size"] is None
    f = s["files"]
    feature_sizes, error_sizes = sizes(os.path.join(uri, "features")), sizes(os.path.join(uri, "errors"))
    assert (f["feature_files"], f["error_files"], f["total_files"]) == (2, 2, 4)
    assert f["feature_bytes"] == sum(feature_sizes) and f["error_bytes"] == sum(error_sizes)
    assert f["total_bytes"] == sum(feature_sizes + error_sizes) and f["stray_files"] == []
    assert s["shards"] == {"count": 2, "complete": 2, "incomplete": 0, "incomplete_shard_numbers": [],
                           "unplanned": 0}
    assert s["plan"] is None and s["index"] == "absent" and s["warnings"] == []
    json.dumps(s)  # JSON-able as it is


def test_text_is_aligned_and_has_the_numbers(local_store):
    uri, _ = local_store
    s = inspect_store(uri)
    text = format_summary(s)
    lines = text.splitlines()
    assert lines[-1].startswith("summary: 8 images, 15 errors, median 3.5 boxes/image, vg-frcnn-r101, D=8 float16")
    assert lines[-1].endswith("; ok")
    table = lines[:-1]
    column = table[0].index(uri)
    for line in table:  # every labelled value starts in one column
        assert line[column - 2:column] == "  ", line
        if line[:column].strip():
            assert line[column] != " ", line
    by_label = {line[:column].strip(): line[column:] for line in table if line[:column].strip()}
    assert by_label["images"] == "8 (feature rows)" and by_label["errors"] == "15 (error rows)"
    assert by_label["decode"] == "13" and by_label["read"] == "2"
    assert by_label["boxes per image"].startswith("min 0  median 3.5  mean 3.25  max 7")
    assert by_label["features"] == "8 x float16 per box"
    assert by_label["config hash"] == expected_hash(CONFIG) and by_label["checkpoint"] == "ckpt-42"
    assert by_label["all files"].startswith(f"4  {s['files']['total_bytes']} bytes")
    assert "4  truncated JPEG" in text and "3  bad header" in text and "too large" not in text


def test_histogram_accumulates_chunks_into_fixed_bins():
    rng = np.random.default_rng(3)
    chunks = [rng.uniform(0, 1, n) for n in (0, 7, 100, 1)] + [np.array([0.0, 1.0, -0.5, 1.5, np.nan])]
    h = Histogram(0.0, 1.0, bins=10)
    for c in chunks:
        h.add(c)
    inside = np.concatenate(chunks[:-1] + [np.array([0.0, 1.0])])
    np.testing.assert_array_equal(h.counts, np.histogram(inside, bins=10, range=(0, 1))[0])
    assert (h.below, h.above, h.nonfinite) == (1, 1, 1) and h.total == inside.size + 3
    assert h.counts[0] >= 1 and h.counts[-1] >= 1  # 0.0 and 1.0 land in the end bins
    with pytest.raises(ValueError):
        Histogram(1.0, 1.0)


def test_plot_counts_and_png(local_store, tmp_path):
    uri, records = local_store
    boxes, conf = store_histograms(uri)
    assert dict(boxes) == {k: [r.num_boxes for r in records].count(k) for k in {r.num_boxes for r in records}}
    every = np.concatenate([r.object_conf for r in records]).astype(np.float64)
    np.testing.assert_array_equal(conf.counts, np.histogram(every, bins=50, range=(0, 1))[0])
    assert conf.counts.sum() == sum(sum(b) for b in BOXES) and conf.below == conf.above == 0
    png = str(tmp_path / "out" / "hist.png")
    assert plot_store(uri, png) == png
    check_png(open(png, "rb").read())


def test_empty_store_gives_zeros(tmp_path):
    uri = str(tmp_path / "empty")
    os.makedirs(os.path.join(uri, "features"))
    s = inspect_store(uri)
    assert s["images"] == s["errors"] == 0 and s["errors_by_stage"] == {}
    assert s["boxes_per_image"] == {"min": 0, "median": 0, "mean": 0.0, "max": 0, "total": 0, "zero": 0}
    assert s["feature_dim"] is None and s["detector"] is None
    assert s["files"]["total_files"] == 0 and s["files"]["total_bytes"] == 0
    assert "summary: 0 images, 0 errors" in format_summary(s)
    check_png(open(plot_store(uri, str(tmp_path / "e.png")), "rb").read())


@pytest.mark.parametrize("kind", ["missing", "file", "other folder"])
def test_not_a_store_is_one_data_error(tmp_path, kind, capsys):
    path = tmp_path / "nope"
    if kind == "file":
        path.write_text("hello")
    elif kind == "other folder":
        (path / "images").mkdir(parents=True)
        (path / "images" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a feature store") as err:
        inspect_store(str(path))
    assert err.value.file == str(path) and str(path) in str(err.value)
    assert main(["inspect", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_corrupt_shard_names_the_file(tmp_path):
    uri = str(tmp_path / "store")
    storage.write_bytes(feature_shard_uri(uri, 0), b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        inspect_store(uri)
    assert err.value.file == feature_shard_uri(uri, 0)


def test_plan_incomplete_and_stray_shards(tmp_path):
    from ray_updown.extraction.inputs import InputImage
    from ray_updown.extraction.plan import save_plan

    uri = str(tmp_path / "store")
    build_store(uri)
    per_shard = [len(b) + sum(e[2 + s] for e in ERRORS) for s, b in enumerate(BOXES)]  # 12, 11
    # Shard 1 planned one row more than it holds; shard 2 was never written.
    planned = [(0, per_shard[0]), (1, per_shard[1] + 1), (2, 5)]
    save_plan(uri, [InputImage(image_id=n, uri=f"i{n}.jpg", shard=s)
                    for s, count in planned for n in range(count)])
    storage.write_bytes(storage.join(uri, "features", "part-00003.parquet.tmp-1a2b3c4d"), b"half")
    s = inspect_store(uri)
    p = s["plan"]
    assert p["planned_rows"] == sum(c for _, c in planned) and p["present_rows"] == sum(per_shard)
    assert (p["planned_shards"], p["complete_shards"], p["missing_shards"]) == (3, 2, 1)
    assert p["missing_shard_numbers"] == [2] and p["unplanned_shards"] == []
    assert p["mismatched_shards"] == [{"shard": 1, "planned": per_shard[1] + 1, "present": per_shard[1]}]
    assert s["shards"]["incomplete_shard_numbers"] == [2]
    assert s["files"]["stray_files"] == ["features/part-00003.parquet.tmp-1a2b3c4d"]
    assert len(s["warnings"]) == 3
    text = format_summary(s)
    assert f"{sum(c for _, c in planned)} images in 3 shards planned, {sum(per_shard)} rows present" in text
    assert text.endswith("3 warning(s)")


def test_a_shard_the_plan_does_not_have_is_counted_and_warned_of(tmp_path):
    from ray_updown.extraction.inputs import InputImage
    from ray_updown.extraction.plan import save_plan

    uri = str(tmp_path / "store")
    build_store(uri)  # shards 0 and 1
    write_feature_shard([record(1, 2)], feature_shard_uri(uri, 5), meta())
    write_error_shard([], error_shard_uri(uri, 5), "int64")
    per_shard = [len(b) + sum(e[2 + s] for e in ERRORS) for s, b in enumerate(BOXES)]
    save_plan(uri, [InputImage(image_id=n, uri=f"i{n}.jpg", shard=s)
                    for s, count in enumerate(per_shard) for n in range(count)])
    s = inspect_store(uri)
    assert s["shards"] == {"count": 3, "complete": 2, "incomplete": 0, "incomplete_shard_numbers": [],
                           "unplanned": 1}
    assert s["plan"]["unplanned_shards"] == [5]
    assert s["warnings"] == ["1 shard(s) not in the plan (another job's?), counted as neither "
                             "complete nor incomplete"]
    assert "3 present, 2 complete, 0 incomplete, 1 not in the plan" in format_summary(s)


def test_errors_part_without_features_part_is_incomplete(tmp_path):
    uri = str(tmp_path / "store")
    write_feature_shard([record(1, 2)], feature_shard_uri(uri, 0), meta())
    write_error_shard([{"image_id": 2, "uri": "b.jpg", "stage": "detect", "reason": "oom"}],
                      error_shard_uri(uri, 4), "int64")
    s = inspect_store(uri)
    assert s["shards"] == {"count": 2, "complete": 1, "incomplete": 1, "incomplete_shard_numbers": [4],
                           "unplanned": 0}
    assert s["errors_by_stage"] == {"detect": {"count": 1, "top_reasons": [{"reason": "oom", "count": 1}]}}


def test_vocab_sizes_and_mixed_detectors(tmp_path):
    uri = str(tmp_path / "store")
    table = records_to_table([record(1, 3)], meta())
    kv = dict(table.schema.metadata)
    kv[b"object_vocab"] = json.dumps(["cat", "dog", "tree"]).encode()
    kv[b"attribute_vocab"] = json.dumps(["red", "wooden"]).encode()
    with storage.atomic_write(feature_shard_uri(uri, 0), "wb") as f:
        pq.write_table(table.replace_schema_metadata(kv), f)
    other = StoreMeta(feature_dim=D, detector="other-detector", detector_config={"nms": 0.5})
    write_feature_shard([record(2, 1)], feature_shard_uri(uri, 1), other)
    s = inspect_store(uri)
    assert (s["object_vocab_size"], s["attribute_vocab_size"]) == (3, 2)
    assert s["detector"] == "vg-frcnn-r101"  # the first shard's
    assert len(s["warnings"]) == 1 and "part-00001.parquet differs from part-00000.parquet" in s["warnings"][0]
    assert "detector" in s["warnings"][0] and "checkpoint_hash" in s["warnings"][0]
    assert "objects 3, attributes 2" in format_summary(s)


def test_index_current_then_stale(tmp_path):
    from ray_updown.features.reader import build_index

    uri = str(tmp_path / "store")
    write_feature_shard([record(1, 2)], feature_shard_uri(uri, 0), meta())
    build_index(uri)
    s = inspect_store(uri)
    assert s["index"] == "current" and s["files"]["total_files"] == 2
    assert s["files"]["total_bytes"] == sum(sizes(os.path.join(uri, "features"))) + os.path.getsize(
        os.path.join(uri, "index.parquet"))
    write_feature_shard([record(2, 2)], feature_shard_uri(uri, 1), meta())
    assert inspect_store(uri)["index"] == "stale"


def test_store_on_s3(s3_bucket):
    import boto3

    uri = f"{s3_bucket}/runs/store"
    records = build_store(uri)
    s = inspect_store(uri)
    assert s["store"] == uri and (s["images"], s["errors"]) == (8, 15)
    assert s["boxes_per_image"]["median"] == 3.5 and s["detector_config_hash"] == expected_hash(CONFIG)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://"):]
    objects = client.list_objects_v2(Bucket=bucket, Prefix="runs/store/")["Contents"]
    feature_bytes = sum(o["Size"] for o in objects if "/features/" in o["Key"])
    assert s["files"]["feature_bytes"] == feature_bytes
    assert s["files"]["total_bytes"] == sum(o["Size"] for o in objects) and s["files"]["total_files"] == 4
    png = f"{s3_bucket}/plots/hist.png"
    assert plot_store(uri, png) == png
    check_png(client.get_object(Bucket=bucket, Key="plots/hist.png")["Body"].read())
    _, conf = store_histograms(uri)
    assert conf.counts.sum() == sum(r.num_boxes for r in records)


def test_cli_text_json_and_png(local_store, tmp_path, capsys):
    uri, _ = local_store
    assert main(["inspect", uri]) == 0
    out = capsys.readouterr().out
    assert out == format_summary(inspect_store(uri)) + "\n"
    png = str(tmp_path / "h.png")
    assert main(["inspect", uri, "--json", "--png", png]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed == {**inspect_store(uri), "png": png}
    check_png(open(png, "rb").read())
