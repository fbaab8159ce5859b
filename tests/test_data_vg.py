"""Visual Genome: class vocabularies, objects/attributes loading, splits and image paths."""

from __future__ import annotations

import numpy as np
import pytest

from ray_updown import storage
from ray_updown.data.vg import load_class_vocab, load_visual_genome, split_visual_genome, vg_image_path
from ray_updown.errors import DataError, StorageError


def _vocab(tmp_path, name, text):
    uri = str(tmp_path / name)
    storage.write_text(uri, text)
    return uri


@pytest.fixture()
def vocabs(tmp_path):
    objects = load_class_vocab(_vocab(tmp_path, "objects_vocab.txt",
                                      "dog\nstop sign,stopsign\ntelevision,tv\n"))
    attributes = load_class_vocab(_vocab(tmp_path, "attributes_vocab.txt",
                                         "brown\ngray,grey\nwooden\n"), background="__no_attribute__")
    return objects, attributes


def test_class_vocab_aliases_and_background(vocabs):
    objects, attributes = vocabs
    assert len(objects) == 4 and objects.names == ["__background__", "dog", "stop sign", "television"]
    assert objects.index("TV ") == 3 and objects.index("stopsign") == 2 and objects.index("Dog.") == 1
    assert objects.index("cat") is None
    assert attributes.names[0] == "__no_attribute__" and attributes.index("grey") == 2


@pytest.mark.parametrize("text, expected", [
    ("dog\ncat\ndog\n", "line 3"),
    ("dog,hound\ncat,hound\n", "line 2"),
    ("dog\n\ncat\n", "line 2"),
])
def test_class_vocab_duplicates_and_blank_lines(tmp_path, text, expected):
    uri = _vocab(tmp_path, "objects_vocab.txt", text)
    with pytest.raises(DataError) as err:
        load_class_vocab(uri)
    assert uri in str(err.value) and expected in str(err.value)


def test_class_vocab_duplicate_class_message(tmp_path):
    uri = _vocab(tmp_path, "objects_vocab.txt", "dog\ncat\nDog\n")
    with pytest.raises(DataError, match=r"line 3: duplicate class 'dog' \(already on line 1\)"):
        load_class_vocab(uri)


def test_class_vocab_empty_file(tmp_path):
    uri = _vocab(tmp_path, "objects_vocab.txt", "\n\n")
    with pytest.raises(DataError) as err:
        load_class_vocab(uri)
    assert uri in str(err.value) and "empty vocabulary file" in str(err.value)
    with pytest.raises(StorageError):
        load_class_vocab(str(tmp_path / "absent.txt"))


def _write_vg(tmp_path, image_data=None, objects=None, attributes=None):
    root = str(tmp_path / "world")
    vg = storage.join(root, "visual_genome")
    image_data = image_data if image_data is not None else [
        {"image_id": 1000001, "url": "images/train2014/COCO_train2014_000000000001.jpg",
         "width": 100, "height": 80, "coco_id": 1, "flickr_id": None},
        {"image_id": 1000002, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1000002.jpg",
         "width": 50, "height": 50, "coco_id": None, "flickr_id": 77},
    ]
    objects = objects if objects is not None else [
        {"image_id": 1000001, "objects": [
            {"object_id": 11, "x": 10, "y": 5, "w": 20, "h": 30, "names": ["Dog"], "synsets": []},
            {"object_id": 12, "x": 90, "y": 70, "w": 40, "h": 40, "names": ["unicorn", "TV"]},
            {"object_id": 13, "x": 1, "y": 1, "w": 5, "h": 5, "names": ["unicorn"]},
            {"object_id": 14, "x": 100, "y": 10, "w": 5, "h": 5, "names": ["dog"]},
        ]},
    ]
    attributes = attributes if attributes is not None else [
        {"image_id": 1000001, "attributes": [
            {"object_id": 11, "x": 10, "y": 5, "w": 20, "h": 30, "names": ["dog"],
             "attributes": ["Brown", "grey", "fluffy", "brown"]},
            {"object_id": 12, "names": ["tv"]},
        ]},
        {"image_id": 1000002, "attributes": []},
    ]
    uris = [storage.join(vg, n) for n in ("image_data.json", "objects.json", "attributes.json")]
    for uri, data in zip(uris, (image_data, objects, attributes)):
        storage.write_json(uri, data)
    return root, uris


def test_load_visual_genome(tmp_path, vocabs):
    objects_vocab, attr_vocab = vocabs
    root, uris = _write_vg(tmp_path)
    images = load_visual_genome(*uris, objects_vocab, attr_vocab, root=root)
    first, second = images
    assert first.image_id == 1000001 and first.coco_id == 1 and second.coco_id is None
    assert first.object_ids.tolist() == [11, 12]
    assert first.labels.tolist() == [1, 3]          # "unicorn" skipped, "TV" is an alias
    assert first.boxes.dtype == np.float32
    # x, y, w, h -> x1, y1, x + w, y + h, clipped to the 100 x 80 image.
    assert first.boxes.tolist() == [[10, 5, 30, 35], [90, 70, 100, 80]]
    assert first.num_unmapped == 1 and first.num_degenerate == 1   # object 14 lies on the border
    assert first.attributes == [(1, 2), ()]
    assert first.attribute_matrix(3).tolist() == [[1, 2, 0], [0, 0, 0]]
    assert first.path == storage.join(root, "images/train2014/COCO_train2014_000000000001.jpg")
    assert second.path == storage.join(root, "VG_100K_2", "1000002.jpg")
    assert second.boxes.shape == (0, 4) and second.labels.shape == (0,)


def test_vg_image_path():
    url = "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg"
    assert vg_image_path(url, images_dir="s3://b/vg/images") == "s3://b/vg/images/2.jpg"
    assert vg_image_path(url, root="s3://b/vg") == "s3://b/vg/VG_100K/2.jpg"
    assert vg_image_path("images/x.jpg", root="s3://b/world") == "s3://b/world/images/x.jpg"
    assert vg_image_path("images/x.jpg") == "images/x.jpg"


@pytest.mark.parametrize("which, mutate, expected", [
    (0, lambda d: d[1].__setitem__("width", "50"), "[1] (image_id 1000002)"),
    (0, lambda d: d[0].pop("url"), "missing field 'url'"),
    (1, lambda d: d[0]["objects"][1].__setitem__("x", "90"), "objects[1]"),
    (1, lambda d: d[0]["objects"][0].pop("names"), "objects[0]"),
    (1, lambda d: d.append({"image_id": 5, "objects": []}), "[1] (image_id 5)"),
    (2, lambda d: d[0]["attributes"][0].__setitem__("attributes", "brown"), "attributes[0]"),
])
def test_bad_visual_genome_records(tmp_path, vocabs, which, mutate, expected):
    root, uris = _write_vg(tmp_path)
    data = storage.read_json(uris[which])
    mutate(data)
    storage.write_json(uris[which], data)
    with pytest.raises(DataError) as err:
        load_visual_genome(*uris, *vocabs, root=root)
    assert uris[which] in str(err.value) and expected in str(err.value)


def test_truncated_objects_file(tmp_path, vocabs):
    root, uris = _write_vg(tmp_path)
    storage.write_text(uris[1], storage.read_text(uris[1])[:-25])
    with pytest.raises(DataError) as err:
        load_visual_genome(*uris, *vocabs, root=root)
    assert uris[1] in str(err.value) and "JSON" in str(err.value)


def _fake_images(n_coco, n_rest):
    from ray_updown.data.vg import VgImage

    def image(image_id, coco_id):
        return VgImage(image_id, "u", 1, 1, coco_id, None, "p", np.zeros(0, np.int64),
                       np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [])
    return ([image(1_000_000 + c, c) for c in range(1, n_coco + 1)]
            + [image(2_000_000 + k, None) for k in range(n_rest)])


def test_split_keeps_coco_images_in_their_split():
    images = _fake_images(4, 36)
    coco = {1: "train", 2: "restval", 3: "val", 4: "test"}
    splits = split_visual_genome(images, coco, ratios=(0.8, 0.1, 0.1), seed=3)
    ids = {k: [im.image_id for im in v] for k, v in splits.items()}
    assert 1_000_001 in ids["train"] and 1_000_002 in ids["train"]
    assert 1_000_003 in ids["val"] and 1_000_004 in ids["test"]
    assert len(ids["val"]) == 4 and len(ids["test"]) == 4 and len(ids["train"]) == 32
    assert sorted(sum(ids.values(), [])) == sorted(im.image_id for im in images)
    again = split_visual_genome(list(reversed(images)), coco, ratios=(0.8, 0.1, 0.1), seed=3)
    assert {k: sorted(im.image_id for im in v) for k, v in again.items()} == \
        {k: sorted(v) for k, v in ids.items()}
    other = split_visual_genome(images, coco, ratios=(0.8, 0.1, 0.1), seed=4)
    assert sorted(im.image_id for im in other["val"]) != sorted(ids["val"])


def test_split_rejects_unknown_coco_split():
    with pytest.raises(DataError, match="unknown COCO split 'dev'"):
        split_visual_genome(_fake_images(1, 0), {1: "dev"})
