"""The Ray Data extraction pipeline end to end on the shared local cluster (tiny detector).

S3 -> Parquet in S3 and back through FeatureStore; resume after a partial run and after an
actor is killed mid-run (no duplicates, no losses); the bad-image catalogue; the grid baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from ray import cloudpickle
from test_images import encode, halves, png_chunks, with_orientation  # noqa: E402

from ray_updown import storage
from ray_updown.data.images import decode_image
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.detector import BottomUpDetector, grid_boxes, load_detector, save_detector, tiny_config
from ray_updown.errors import ConfigError
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
from ray_updown.features.reader import FeatureStore

# Ray workers cannot import this test module: its model wrappers travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    # Vocabularies as objects_vocab.txt lists them (no background line): the store records
    # them aligned to the ids, entry 0 the background.
    return BottomUpDetector(tiny_config(), object_vocab=["ball", "cube", "cone", "ring"],
                            attribute_vocab=["red", "green", "blue"]).eval()


def _store_files(out: str) -> dict[str, bytes]:
    return {u: storage.read_bytes(u) for folder in ("features", "errors")
            for u in storage.list_files(storage.join(out, folder))}


def test_s3_world_to_s3_store_and_resume_after_a_partial_run(ray_cluster, s3_bucket, detector):
    build_world(WorldConfig(num_images=12, image_size=80, write_threads=4), f"{s3_bucket}/world")
    save_detector(detector, f"{s3_bucket}/ckpt")
    out = f"{s3_bucket}/features"
    cfg = ExtractConfig(images=f"{s3_bucket}/world/images/", out=out, checkpoint=f"{s3_bucket}/ckpt",
                        rows_per_shard=5, batch_size=4)
    summary = run_extraction(cfg)
    assert (summary["inputs"], summary["features"], summary["errors"]) == (12, 12, 0)
    assert (summary["shards"], summary["shards_processed"], summary["images_processed"]) == (3, 3, 12)
    assert summary["detector"] == "bua-tiny-r10-w8" and summary["checkpoint_hash"] == detector.checkpoint_hash
    assert storage.read_json(f"{out}/extract_summary.json")["features"] == 12

    store = FeatureStore(out)
    assert sorted(store.image_ids) == list(range(1, 13))  # COCO ids from the file names
    assert store.metadata["detector"] == "bua-tiny-r10-w8" and store.feature_dim == 64
    assert store.metadata["object_vocab"] == ["__background__", "ball", "cube", "cone", "ring"]
    assert store.metadata["attribute_vocab"] == ["__no_attribute__", "red", "green", "blue"]
    # A stored row equals the bare model on the same file (features rounded to float16).
    uri = storage.list_files(f"{s3_bucket}/world/images/val2014/")[0]
    image_id = int(uri.rsplit("_", 1)[1].split(".")[0])
    expect = detector.extract_regions([decode_image(storage.read_bytes(uri)).pixels])[0]
    got = store.get(image_id)
    assert (got.image_w, got.image_h) == (80, 80)
    np.testing.assert_allclose(got.boxes, expect["boxes"], rtol=1e-5)
    np.testing.assert_allclose(got.features.astype(np.float32), expect["features"], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(got.object_ids, expect["object_ids"])

    # Resume: shard 1 lost its outputs (as after a crash); only it is redone, nothing else moves.
    before = _store_files(out)
    for folder in ("features", "errors"):
        storage.remove(f"{out}/{folder}/part-00001.parquet")
    summary = run_extraction(cfg)
    assert (summary["shards_processed"], summary["shards_skipped"], summary["images_processed"]) == (1, 2, 5)
    assert (summary["features"], summary["errors"]) == (12, 0)
    after = _store_files(out)
    assert after.keys() == before.keys()
    assert all(after[u] == before[u] for u in after if "part-00001" not in u)
    assert sorted(FeatureStore(out).image_ids) == list(range(1, 13))  # no duplicates, no losses
    # A third run has nothing to do.
    assert run_extraction(cfg)["shards_processed"] == 0


class ExitOnce:
    """Wraps a detector; the first extract_regions call in a process that finds `flag` removes
    it and kills the process, as an OOM kill or a node loss would."""

    def __init__(self, model, flag: str, marker: str):
        self.model, self.flag, self.marker = model, flag, marker

    def __getattr__(self, name):
        if name == "extract_batches":  # every forward goes through extract_regions below
            raise AttributeError(name)
        return getattr(self.model, name)

    def extract_regions(self, images):
        if os.path.exists(self.flag):
            os.remove(self.flag)
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return self.model.extract_regions(images)


def exit_once_detector(checkpoint: str, flag: str, marker: str) -> ExitOnce:
    return ExitOnce(load_detector(checkpoint), flag, marker)


def _write_images(folder, count: int, size=(48, 40)) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(1, count + 1):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"))


def test_an_actor_killed_mid_run_is_replaced_without_losses_or_duplicates(ray_cluster, tmp_path, detector):
    _write_images(tmp_path / "imgs", 8)
    save_detector(detector, str(tmp_path / "ckpt"))
    flag, marker = tmp_path / "kill-flag", tmp_path / "killed"
    flag.write_text("kill the first actor that runs a batch")
    factory = functools.partial(exit_once_detector, str(tmp_path / "ckpt"), str(flag), str(marker))
    cfg = ExtractConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "store"),
                        rows_per_shard=3, batch_size=2, max_restarts=2,
                        max_task_retries=2)
    summary = run_extraction(cfg, model_factory=factory)
    assert marker.exists() and not flag.exists()  # an actor really died mid-run
    assert (summary["inputs"], summary["features"], summary["errors"]) == (8, 8, 0)
    store = FeatureStore(str(tmp_path / "store"))
    assert sorted(store.image_ids) == list(range(1, 9))
    assert all(store.get(i).num_boxes >= 2 for i in range(1, 9))


def _catalogue(folder) -> dict[str, tuple[bytes, object]]:
    """name -> (bytes, expected): (w, h) for a feature row, or the error stage and words."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[:, 15:] = (200, 30, 30, 255)
    palette = Image.new("P", (33, 27), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    gray16 = Image.fromarray((rng.integers(0, 65536, (24, 36))).astype(np.uint16))
    truncated = encode(rgb, "JPEG")
    return {
        "1.jpg": (encode(rgb, "JPEG"), (56, 40)),
        "2.jpg": (encode(rgb.convert("L"), "JPEG"), (56, 40)),
        "3.jpg": (encode(Image.new("CMYK", (50, 30), (0, 255, 255, 0)), "JPEG"), (50, 30)),
        "4.png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), (30, 30)),
        "5.png": (encode(gray16, "PNG"), (36, 24)),
        "6.png": (encode(palette, "PNG"), (33, 27)),
        "7.jpg": (with_orientation(halves(60, 30, (230, 20, 20), (20, 20, 230)), 6), (30, 60)),
        "8.jpg": (b"", ("decode", "empty file")),
        "9.jpg": (truncated[: len(truncated) // 2], ("decode", "truncated")),
        "10.png": (png_chunks(8, 8, 8, 2, b"not zlib"), ("decode", "corrupt")),
        "11.jpg": (b"<html>404</html>", ("decode", "not a recognised image")),
        "12.png": (png_chunks(50_000, 50_000, 8, 2, zlib.compress(b"")), ("decode", "decompression-bomb")),
        "13.png": (encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), ("decode", "1x1")),
    }


def test_the_bad_image_catalogue_gives_feature_or_error_rows(ray_cluster, tmp_path, detector):
    save_detector(detector, str(tmp_path / "ckpt"))
    files = _catalogue(tmp_path)
    (tmp_path / "imgs").mkdir()
    for name, (data, _) in files.items():
        (tmp_path / "imgs" / name).write_bytes(data)
    # A manifest adds a missing file, a second file for id 1 (sorting after 1.jpg, which keeps
    # the id) and a second row for file 2.jpg.
    rows = [f"{n.split('.')[0]},imgs/{n}" for n in files] + [
        "14,imgs/missing.jpg", "1,imgs/x-1-again.jpg", "2,imgs/2.jpg"]
    (tmp_path / "manifest.csv").write_text("image_id,uri\n" + "\n".join(rows) + "\n")
    cfg = ExtractConfig(manifest=str(tmp_path / "manifest.csv"), out=str(tmp_path / "store"),
                        checkpoint=str(tmp_path / "ckpt"), rows_per_shard=8, batch_size=3)
    summary = run_extraction(cfg)
    assert (summary["inputs"], summary["features"], summary["errors"]) == (16, 7, 9)
    assert summary["errors_by_stage"] == {"decode": 6, "read": 1, "list": 2}
    store = FeatureStore(str(tmp_path / "store"))
    errors = {(e["image_id"], e["uri"].rsplit("/", 1)[1]): e for e in store.errors()}
    assert len(errors) == 9
    for name, (_, expected) in files.items():
        image_id = int(name.split(".")[0])
        if isinstance(expected[0], int):
            record = store.get(image_id)
            assert (record.image_w, record.image_h) == expected, name
            assert record.num_boxes >= 2 and np.isfinite(record.features.astype(np.float32)).all()
            assert (record.boxes[:, [0, 2]] <= record.image_w).all()
            assert (record.boxes[:, [1, 3]] <= record.image_h).all()
        else:
            error = errors[(image_id, name)]
            assert error["stage"] == expected[0] and expected[1] in error["reason"], (name, error)
            assert image_id not in store
    assert errors[(14, "missing.jpg")]["stage"] == "read"
    assert "no such file" in errors[(14, "missing.jpg")]["reason"]
    assert errors[(1, "x-1-again.jpg")]["stage"] == "list"
    assert "duplicate image id 1" in errors[(1, "x-1-again.jpg")]["reason"]
    assert errors[(2, "2.jpg")]["stage"] == "list"
    assert "duplicate uri" in errors[(2, "2.jpg")]["reason"]


def test_grid_baseline_runs_through_the_same_pipeline(ray_cluster, tmp_path, detector):
    _write_images(tmp_path / "imgs", 3, size=(70, 50))
    save_detector(detector, str(tmp_path / "ckpt"))
    cfg = ExtractConfig(images=str(tmp_path / "imgs") + "/*.png", out=str(tmp_path / "grid"),
                        checkpoint=str(tmp_path / "ckpt"), model="grid", grid_size=2)
    summary = run_extraction(cfg)
    assert (summary["features"], summary["errors"], summary["detector"]) == (3, 0, "bua-tiny-r10-w8-grid2")
    store = FeatureStore(str(tmp_path / "grid"))
    assert store.metadata["detector_config"]["grid_size"] == 2
    assert store.metadata["object_vocab"] == [] == store.metadata["attribute_vocab"]  # cells name nothing
    for i in (1, 2, 3):
        record = store.get(i)
        np.testing.assert_allclose(record.boxes, grid_boxes(50, 70, 2))
        assert record.features.shape == (4, 64) and (record.object_ids == 0).all()


class BoxModel:
    """Chooses one box (the whole image, feature 1s); pools given boxes with features 2s."""

    name, feature_dim = "box-test", 3

    def extract_regions(self, images):
        return [{"boxes": np.array([[0, 0, im.shape[1], im.shape[0]]], np.float32),
                 "features": np.ones((1, 3), np.float32)} for im in images]

    def extract_given_boxes(self, images, boxes):
        return [{"boxes": np.asarray(b, np.float32).reshape(-1, 4),
                 "features": np.full((len(b), 3), 2, np.float32)} for b in boxes]


def test_manifest_boxes_and_boxes_from_reach_the_detector(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_images(tmp_path / "imgs", 4, size=(60, 40))
    given = {1: [[1, 2, 30, 20], [0, 0, 60, 40]], 2: [[5, 5, 10, 10]], 3: None,
             4: [[5, 5, 99, 10]]}  # 4: outside the 60x40 image
    pq.write_table(pa.table({"image_id": list(given), "uri": [f"imgs/{i}.png" for i in given],
                             "boxes": list(given.values())}), tmp_path / "m.parquet")
    cfg = ExtractConfig(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "a"),
                        rows_per_shard=3, batch_size=2)
    summary = run_extraction(cfg, model_factory=BoxModel)
    assert (summary["features"], summary["errors"]) == (3, 1)
    store = FeatureStore(str(tmp_path / "a"))
    for i in (1, 2):
        np.testing.assert_array_equal(store.get(i).boxes, np.array(given[i], np.float32))
        assert (store.get(i).features == 2).all()
    np.testing.assert_array_equal(store.get(3).boxes, [[0, 0, 60, 40]])  # chosen by the model
    error, = store.errors()
    assert error["image_id"] == 4 and "box 0" in error["reason"] and "outside" in error["reason"]

    # --boxes-from: a second store pools the first store's boxes, by image id; id 4 has no
    # row there: an error row, or with boxes_fallback the model chooses (and it is counted).
    again = ExtractConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "b"),
                          boxes_from=str(tmp_path / "a"), rows_per_shard=3)
    summary = run_extraction(again, model_factory=BoxModel)
    assert (summary["features"], summary["errors"], summary["boxes_fallbacks"]) == (3, 1, 0)
    second = FeatureStore(str(tmp_path / "b"))
    for i in (1, 2, 3):
        np.testing.assert_array_equal(second.get(i).boxes, store.get(i).boxes)
        assert (second.get(i).features == 2).all()
    error, = second.errors()
    assert error["image_id"] == 4 and error["stage"] == "boxes" and "no boxes for this id" in error["reason"]
    fallback = dataclasses.replace(again, out=str(tmp_path / "c"), boxes_fallback=True)
    summary = run_extraction(fallback, model_factory=BoxModel)
    assert (summary["features"], summary["boxes_fallbacks"]) == (4, 1)
    assert (FeatureStore(str(tmp_path / "c")).get(4).features == 1).all()  # the model chose
    # An image whose size differs from its row in the boxes_from store: an error row.
    _write_images(tmp_path / "other", 2, size=(50, 40))
    resized = dataclasses.replace(fallback, images=str(tmp_path / "other"), out=str(tmp_path / "e"))
    summary = run_extraction(resized, model_factory=BoxModel)
    bad = {e["image_id"]: e for e in FeatureStore(str(tmp_path / "e")).errors()}
    assert sorted(bad) == [1, 2] and "is 60x40 pixels: not the same image" in bad[1]["reason"]
    # A manifest with its own boxes and boxes_from: one line, before any work.
    with pytest.raises(ConfigError, match="the manifest gives boxes"):
        run_extraction(dataclasses.replace(cfg, out=str(tmp_path / "d"), boxes_from=str(tmp_path / "a")),
                       model_factory=BoxModel)
