"""`ray-updown show` (viz/regions.py): one image's regions drawn from a feature store, in the
style of the paper's Figure 2, and the vocabularies in the store's metadata that name them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_updown import storage
from ray_updown.cli import main
from ray_updown.detector import BottomUpDetector, GridFeatureExtractor, save_detector, tiny_config
from ray_updown.errors import CheckpointError, ConfigError, DataError, StorageError
from ray_updown.extraction.model import describe_model
from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord, records_to_table
from ray_updown.features.schema import StoreMeta, aligned_vocab
from ray_updown.features.writer import feature_shard_uri, write_feature_shard
from ray_updown.viz.region_drawing import label_text, region_colour, region_label
from ray_updown.viz.regions import find_image, regions_picture, show_regions

W, H = 200, 150
GREY = (128, 128, 128)
OBJECTS = ["__background__", "circle", "square", "triangle"]
ATTRIBUTES = ["__no_attribute__", "red", "green", "blue"]
# Four regions; by object confidence the order is 1, 3, 0, 2. Boxes apart, so no label covers
# another box's side.
BOXES = np.array([[10, 95, 60, 140], [20, 40, 90, 80], [120, 95, 190, 140], [140, 50, 190, 85]],
                 np.float32)
OBJECT_IDS, OBJECT_CONF = [1, 1, 2, 3], [0.5, 0.9, 0.2, 0.7]
ATTR_IDS, ATTR_CONF = [2, 1, 3, 0], [0.3, 0.8, 0.1, 0.05]


def _record(image_id=123) -> FeatureRecord:
    return FeatureRecord(image_id, W, H, BOXES, np.ones((4, 8), np.float32), object_ids=OBJECT_IDS,
                         object_conf=OBJECT_CONF, attr_ids=ATTR_IDS, attr_conf=ATTR_CONF)


def _meta(vocab: bool = True) -> StoreMeta:
    return StoreMeta(feature_dim=8, detector="bua-tiny", detector_config={"num_classes": 4},
                     object_vocab=OBJECTS if vocab else [], attribute_vocab=ATTRIBUTES if vocab else [])


def _old_store(uri: str) -> str:
    """A store as written before the vocabularies existed: no vocabulary keys at all."""
    table = records_to_table([_record(), _record(7)], _meta(vocab=False))
    kv = {k: v for k, v in table.schema.metadata.items() if not k.endswith(b"_vocab")}
    path = feature_shard_uri(uri, 0)
    storage.makedirs(storage.join(uri, "features"))
    pq.write_table(table.replace_schema_metadata(kv), path)
    return uri


@pytest.fixture()
def world(tmp_path):
    """A store with vocabularies (images 123 and 7) and image 123 as a COCO-named JPEG."""
    store = str(tmp_path / "store")
    write_feature_shard([_record(), _record(7)], feature_shard_uri(store, 0), _meta())
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (W, H), GREY).save(root / "val2014" / "COCO_val2014_000000000123.jpg", quality=95)
    return {"store": store, "root": str(root), "tmp": tmp_path,
            "image": str(root / "val2014" / "COCO_val2014_000000000123.jpg")}


def _edges(box) -> list[tuple[int, int]]:
    """A pixel in the middle of each side of a box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return [(x1, (y1 + y2) // 2), (x2, (y1 + y2) // 2), ((x1 + x2) // 2, y1), ((x1 + x2) // 2, y2)]


def _is_grey(pixel) -> bool:
    return all(abs(int(c) - g) <= 12 for c, g in zip(pixel, GREY))


# ----------------------------------------------------------------------------- labels
def test_label_names_attribute_then_object_by_index_with_background_at_zero():
    # Ids index the vocabularies directly: 0 is background / no attribute, 1 the first class.
    assert region_label(1, 1, OBJECTS, ATTRIBUTES) == "red circle"
    assert region_label(3, 2, OBJECTS, ATTRIBUTES) == "green triangle"
    assert region_label(2, 0, OBJECTS, ATTRIBUTES) == "square"  # no attribute: object alone
    assert region_label(2, 3, OBJECTS, []) == "square"  # no attribute names: object alone
    assert label_text("red circle", 0.912, 0.781) == "red circle  0.91/0.78"
    assert label_text("square", 0.5, None) == "square  0.50"
    with pytest.raises(DataError, match="object id 4 has no name"):
        region_label(4, 1, OBJECTS, ATTRIBUTES)
    with pytest.raises(DataError, match="attribute id 4 has no name"):
        region_label(1, 4, OBJECTS, ATTRIBUTES)


def test_aligned_vocab_adds_the_zero_entry_only_when_it_is_missing():
    assert aligned_vocab(["circle", "square"], 3, "__background__") == ["__background__", "circle", "square"]
    assert aligned_vocab(OBJECTS, 4, "__background__") == OBJECTS
    assert aligned_vocab(None, 4, "__background__") == []
    with pytest.raises(ValueError, match="5 names for 4 class ids"):
        aligned_vocab(["a", "b", "c", "d", "e"], 4, "__background__")


# ---------------------------------------------------------------------------- drawing
def test_png_has_the_top_boxes_in_their_colours_at_the_box_coordinates(world):
    out = str(world["tmp"] / "fig" / "123.png")
    summary = show_regions(world["store"], "123", out=out, images_root=world["root"], top=2)
    assert summary["image_id"] == 123 and summary["image"] == world["image"]
    assert (summary["regions"], summary["regions_in_store"]) == (2, 4)
    assert summary["labels"] == ["red circle  0.90/0.80", "triangle  0.70"]
    assert summary["vocabularies"] == "store metadata"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (W, H)
        png = im.convert("RGB")
    colours = [region_colour(0), region_colour(1)]
    assert colours[0] != colours[1]
    # The most confident region (row 1) in the first colour, the next (row 3) in the second.
    for row, colour in ((1, colours[0]), (3, colours[1])):
        for xy in _edges(BOXES[row]):
            assert png.getpixel(xy) == colour, (row, xy)
        # Its label: a filled band of the same colour just above the box's top-left corner.
        x1, y1 = int(BOXES[row][0]), int(BOXES[row][1])
        assert png.getpixel((x1, y1 - 2)) == colour
        # Inside the box the image is untouched.
        assert _is_grey(png.getpixel((int(BOXES[row][0]) + 10, int(BOXES[row][3]) - 10)))
    # Rows 0 and 2 are beyond the top 2: nothing drawn on their sides.
    for row in (0, 2):
        for xy in _edges(BOXES[row]):
            assert _is_grey(png.getpixel(xy)), (row, xy)


def test_picture_without_a_file_and_with_zoom(world):
    picture = regions_picture(world["store"], 123, image=world["image"], top=3)
    assert picture.image.size == (W, H) and [r["index"] for r in picture.regions] == [1, 3, 0]
    assert [r["label"] for r in picture.regions] == ["red circle", "triangle", "green circle"]
    assert picture.image.getpixel(_edges(BOXES[0])[0]) == region_colour(2)
    zoomed = regions_picture(world["store"], 123, image=world["image"], top=1, zoom=2)
    assert zoomed.image.size == (2 * W, 2 * H)
    x1, y1, x2, y2 = (int(v) * 2 for v in BOXES[1])
    assert zoomed.image.getpixel((x1, (y1 + y2) // 2)) == region_colour(0)
    assert zoomed.image.getpixel((x2, (y1 + y2) // 2)) == region_colour(0)


# ------------------------------------------------------------------------ vocabularies
def test_store_meta_round_trips_vocabularies_and_reads_old_metadata():
    meta = _meta()
    back = StoreMeta.from_kv(meta.to_kv())
    assert back.object_vocab == OBJECTS and back.attribute_vocab == ATTRIBUTES and back == meta
    old = {k: v for k, v in meta.to_kv().items() if not k.endswith(b"_vocab")}
    old_meta = StoreMeta.from_kv(old)
    assert old_meta.object_vocab == [] and old_meta.attribute_vocab == [] and old_meta.detector == "bua-tiny"
    bad = {**meta.to_kv(), b"object_vocab": b'{"circle": 1}'}
    with pytest.raises(DataError, match="shard.parquet: malformed store metadata: object_vocab"):
        StoreMeta.from_kv(bad, file="shard.parquet")


def test_old_store_takes_the_vocabularies_of_the_detector(world):
    store = _old_store(str(world["tmp"] / "old"))
    assert FeatureStore(store).metadata["object_vocab"] == []
    torch.manual_seed(0)
    # Vocabularies without the zero entry (the lines of objects_vocab.txt) are aligned to ids.
    detector = BottomUpDetector(tiny_config(num_classes=4, num_attributes=4),
                                object_vocab=OBJECTS[1:], attribute_vocab=ATTRIBUTES[1:])
    ckpt = str(world["tmp"] / "ckpt")
    save_detector(detector, ckpt)
    out = str(world["tmp"] / "old.png")
    summary = show_regions(store, "123", out=out, image=world["image"], top=2, detector=ckpt)
    assert summary["labels"] == ["red circle  0.90/0.80", "triangle  0.70"]
    assert summary["vocabularies"] == storage.join(ckpt, "detector.json")
    # A detector with another class count cannot name this store's ids.
    other = str(world["tmp"] / "other")
    save_detector(BottomUpDetector(tiny_config(num_classes=6, num_attributes=4),
                                   object_vocab=list("abcde"), attribute_vocab=ATTRIBUTES[1:]), other)
    with pytest.raises(CheckpointError, match="6 object classes are not the 4"):
        regions_picture(store, 123, image=world["image"], detector=other)


def test_a_store_resumed_over_an_old_one_names_ids_from_its_newer_shards(world):
    store = _old_store(str(world["tmp"] / "resumed"))  # shard 0: before the vocabularies
    write_feature_shard([_record(8)], feature_shard_uri(store, 1), _meta())
    assert FeatureStore(store).metadata["object_vocab"] == []  # the index keeps shard 0's
    picture = regions_picture(store, 123, image=world["image"], top=1)
    assert picture.labels == ["red circle  0.90/0.80"] and picture.vocab_source == "store metadata"


def test_no_vocabularies_and_no_detector_is_one_error_naming_the_store(world, capsys):
    store = _old_store(str(world["tmp"] / "old"))
    with pytest.raises(DataError, match="has no vocabularies in its metadata") as exc:
        regions_picture(store, 123, image=world["image"])
    assert str(exc.value).startswith(store + ": ")
    code = main(["show", "--store", store, "--image-id", "123", "--image", world["image"],
                 "--out", str(world["tmp"] / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert store in err and "pass --detector" in err
    assert not (world["tmp"] / "x.png").exists()


def test_extraction_describes_the_detector_vocabularies_aligned_and_none_for_the_grid():
    torch.manual_seed(0)
    detector = BottomUpDetector(tiny_config(num_classes=4, num_attributes=4),
                                object_vocab=OBJECTS[1:], attribute_vocab=ATTRIBUTES[1:])
    info = describe_model(detector)
    assert info["object_vocab"] == OBJECTS and info["attribute_vocab"] == ATTRIBUTES
    grid = describe_model(GridFeatureExtractor(detector, 2))
    assert grid["object_vocab"] == [] and grid["attribute_vocab"] == []
    assert describe_model(BottomUpDetector(tiny_config()))["object_vocab"] == []
    detector.object_vocab = ["circle"]
    with pytest.raises(CheckpointError, match="ckpt: object_vocab: 1 names for 4 class ids"):
        describe_model(detector, "ckpt")


def test_a_resumed_extraction_accepts_a_store_written_before_the_vocabularies(tmp_path):
    from ray_updown.extraction.pipeline import _check_same_model

    store = _old_store(str(tmp_path / "old"))
    _check_same_model(store, _meta())  # same model, now with vocabularies: no error
    with pytest.raises(ConfigError, match="already holds features of bua-tiny"):
        _check_same_model(store, StoreMeta(feature_dim=8, detector="another", object_vocab=OBJECTS))


# ------------------------------------------------------------------- ids, images, errors
def test_unknown_or_malformed_id_names_the_id_and_the_store(world):
    with pytest.raises(DataError, match="image id 999 is not in the store") as exc:
        regions_picture(world["store"], "999", image=world["image"])
    assert world["store"] in str(exc.value)
    with pytest.raises(DataError, match="image id 'abc' is not an integer"):
        regions_picture(world["store"], "abc", image=world["image"])
    with pytest.raises(StorageError, match="not a feature store"):
        regions_picture(str(world["tmp"] / "nowhere"), "1", image=world["image"])


def test_image_not_found_or_not_given_or_not_the_stored_one(world):
    # Image 7 is in the store but has no file under the root.
    with pytest.raises(DataError, match="no image file for image id 7 .*pass --image") as exc:
        regions_picture(world["store"], "7", images_root=world["root"])
    assert world["root"] in str(exc.value)
    with pytest.raises(ConfigError, match="pass --image or --images-root"):
        regions_picture(world["store"], "123")
    with pytest.raises(StorageError, match="no such file"):
        regions_picture(world["store"], "123", image=str(world["tmp"] / "missing.jpg"))
    small = world["tmp"] / "small.png"
    Image.new("RGB", (W // 2, H // 2)).save(small)
    with pytest.raises(DataError, match="is 100x75 but image 123 .* is 200x150"):
        regions_picture(world["store"], "123", image=str(small))
    (world["tmp"] / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        regions_picture(world["store"], "123", image=str(world["tmp"] / "text.jpg"))
    with pytest.raises(ConfigError, match="top: must be between 1 and 1000, got 0"):
        regions_picture(world["store"], "123", image=world["image"], top=0)


def test_zoom_and_top_keep_a_picture_within_8192_px_in_one_line(world, capsys):
    with pytest.raises(ConfigError, match="top: must be between 1 and 1000, got 1001"):
        regions_picture(world["store"], "123", image=world["image"], top=1001)
    with pytest.raises(ConfigError, match=r"zoom: 500 would draw this 200x150 image at 100000x75000; "
                                          r"a picture's side is at most 8192 px, so at most --zoom 40"):
        regions_picture(world["store"], "123", image=world["image"], zoom=500)
    out = world["tmp"] / "big.png"
    capsys.readouterr()
    assert main(["show", "--store", world["store"], "--image-id", "123", "--image", world["image"],
                 "--zoom", "500", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at most 8192 px" in err[0] and not out.exists()


def _store_of(tmp_path, record, meta, size) -> tuple[str, str]:
    store = str(tmp_path / "one")
    write_feature_shard([record], feature_shard_uri(store, 0), meta)
    Image.new("RGB", size, GREY).save(tmp_path / "one.png")
    return store, str(tmp_path / "one.png")


def test_labels_never_overlap_and_leave_a_small_picture_visible(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 90, (10, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(15, 38, (10, 2))], 1).astype(np.float32)
    record = FeatureRecord(1, 128, 128, boxes, np.ones((10, 8), np.float32), object_ids=[1] * 10,
                           object_conf=np.linspace(0.9, 0.5, 10), attr_ids=[1] * 10, attr_conf=[0.8] * 10)
    store, image = _store_of(tmp_path, record, _meta(), (128, 128))
    picture = regions_picture(store, 1, image=image)
    places = [r["label_box"] for r in picture.regions if r["label_box"] is not None]
    assert picture.regions[0]["label_box"] is not None  # the best region keeps its label
    assert all(a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
               for i, a in enumerate(places) for b in places[i + 1:])
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in places) <= 0.25 * 128 * 128
    pixels = np.asarray(picture.image).astype(int)
    assert (np.abs(pixels - GREY[0]).max(-1) > 12).mean() < 0.4  # labels and outlines together


def test_a_grid_store_is_drawn_without_labels_and_without_a_detector(tmp_path):
    from ray_updown.detector.grid import grid_boxes

    cells = np.asarray(grid_boxes(H, W, 2), np.float32)
    record = FeatureRecord(1, W, H, cells, np.ones((4, 8), np.float32), object_ids=[0] * 4,
                           object_conf=[0.0] * 4, attr_ids=[0] * 4, attr_conf=[0.0] * 4)
    meta = StoreMeta(feature_dim=8, detector="bua-tiny-grid2",
                     detector_config={"grid_size": 2, "detector": {"num_classes": 4}})
    store, image = _store_of(tmp_path, record, meta, (W, H))
    summary = show_regions(store, "1", out=str(tmp_path / "grid.png"), image=image)
    assert (summary["regions"], summary["labels"], summary["labels_drawn"]) == (4, [], 0)
    assert "grid cells" in summary["vocabularies"]
    with Image.open(tmp_path / "grid.png") as im:
        png = im.convert("RGB")
    assert _is_grey(png.getpixel((W // 4, 10)))  # where a label of cell 0 would be


def test_find_image_matches_the_id_as_the_last_number_of_the_name(tmp_path):
    for name in ("val2014/COCO_val2014_000000000123.jpg", "val2014/COCO_val2014_000000001123.jpg",
                 "deep/er/45.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert find_image(str(tmp_path), 123).endswith("COCO_val2014_000000000123.jpg")
    assert find_image(str(tmp_path), 1123).endswith("COCO_val2014_000000001123.jpg")
    assert find_image(str(tmp_path), 45).endswith("deep/er/45.png")
    with pytest.raises(DataError, match="no image file for image id 2014"):  # "2014" is no id
        find_image(str(tmp_path), 2014)
    (tmp_path / "0045.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="2 image files match image id 45"):
        find_image(str(tmp_path), 45)
    (tmp_path / "img_a7.jpg").write_bytes(b"x")
    assert find_image(str(tmp_path), "a7").endswith("img_a7.jpg")


# ---------------------------------------------------------------------------- the CLI
def test_cli_show_writes_the_png_and_a_bad_id_exits_2_with_one_line(world, capsys):
    out = str(world["tmp"] / "cli.png")
    assert main(["show", "--store", world["store"], "--image-id", "123", "--images-root",
                 world["root"], "--top", "2", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["regions"] == 2 and summary["labels"][0] == "red circle  0.90/0.80"
    with Image.open(out) as im:
        assert im.size == (W, H)
        assert im.convert("RGB").getpixel(_edges(BOXES[1])[0]) == region_colour(0)
    assert main(["show", "--store", world["store"], "--image-id", "999", "--images-root",
                 world["root"], "--out", str(world["tmp"] / "bad.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image id 999" in err[0] and world["store"] in err[0]


# ------------------------------------------------------------------------ demo report
def test_demo_report_draws_figure2_for_test_images(world):
    from ray_updown.demo.pictures import region_pictures
    from ray_updown.demo.stages import WorldFiles

    root = world["tmp"] / "world"
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(world["root"])
    sentence = {"raw": "a red circle", "tokens": ["a", "red", "circle"]}
    images = [{"cocoid": 7, "filepath": "val2014", "filename": "COCO_val2014_000000000007.jpg",
               "split": "train", "sentences": [sentence]},
              {"cocoid": 123, "filepath": "val2014", "filename": "COCO_val2014_000000000123.jpg",
               "split": "test", "sentences": [sentence]}]
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps({"images": images}))
    figures = world["tmp"] / "report" / "figures"
    state = {"stores": {"regions": world["store"]}, "detector": {"detector": None}}
    items = region_pictures(WorldFiles(str(root)), state, str(figures), "figures")
    assert [i["path"] for i in items] == ["figures/regions_123.png"]  # test split only
    assert items[0]["labels"][:3] == ["red circle", "triangle", "green circle"]
    with Image.open(figures / "regions_123.png") as im:
        assert im.size == (2 * W, 2 * H)  # the report's zoom
    assert region_pictures(WorldFiles(str(root)), {"stores": {}}, str(figures), "figures") == []
