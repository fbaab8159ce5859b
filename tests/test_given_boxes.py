"""Features for given boxes in the extraction actor: pooled exactly there, bad boxes named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_updown.detector import BottomUpDetector, save_detector, tiny_config
from ray_updown.extraction.model import ModelSpec
from ray_updown.extraction.per_image import BatchDetector, check_given_boxes
from ray_updown.features.schema import StoreMeta

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("value, problem", [
    ([[0, 0, float("nan"), 5]], "box 0 [0, 0, nan, 5]: not a finite number"),
    ([[1, 1, 5, 5], [9, 2, 3, 8]], "box 1 [9, 2, 3, 8]: empty or inverted"),
    ([[0, 0, 41, 10]], "box 0 [0, 0, 41, 10]: outside the 40x20 image"),
    ([[-1, 0, 4, 10]], "outside the 40x20 image"),
    ([[1, 2, 3]], "box 0 [1, 2, 3]: not four numbers"),
    ([[0, 0, 1, 1]] * 3, "3 boxes given, at most 2 per image"),
    ([[0, 0, 4, 4], None], "box 1 is null: not four numbers"),  # named as null, never nan
    ([[0, None, 4, 4]], "box 0 holds a null: not four numbers"),
])
def test_bad_boxes_are_named(value, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        check_given_boxes(value, 40, 20, limit=2)


def test_good_boxes_pass_unchanged():
    boxes = check_given_boxes([[0, 0, 40, 20], [1.5, 2.25, 3, 4]], 40, 20)
    np.testing.assert_array_equal(boxes, [[0, 0, 40, 20], [1.5, 2.25, 3, 4]])


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    torch.manual_seed(0)
    uri = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_detector(BottomUpDetector(tiny_config()), uri)
    meta = StoreMeta(feature_dim=tiny_config().feature_dim, image_id_type="int64", detector="tiny")
    return BatchDetector(ModelSpec(checkpoint=uri), meta, forward_batch_size=2)


def test_actor_pools_given_boxes_in_original_pixels(actor):
    rng = np.random.default_rng(0)
    # Decoded at half the original size: given boxes (original pixels) must be scaled down.
    pixels = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(4)]
    given = [[[0, 0, 120, 80], [10, 20, 50, 60]], None, [[4, 4, 200, 50]], [[0, 0, 30, 30]]]
    batch = {"image_id": np.arange(4), "uri": np.array([f"{i}.jpg" for i in range(4)], dtype=object),
             "row": np.arange(4), "shard": np.zeros(4, np.int64),
             "stage": np.array([""] * 4, dtype=object), "reason": np.array([""] * 4, dtype=object),
             "pixels": pixels, "image_w": np.full(4, 120, np.int32), "image_h": np.full(4, 80, np.int32),
             "given_boxes": np.array(given + [None], dtype=object)[:-1]}
    rows = {r["image_id"]: r for r in actor(batch).to_pylist()}
    assert rows[0]["boxes"] == [[0, 0, 120, 80], [10, 20, 50, 60]]  # exactly as given, in order
    assert rows[3]["boxes"] == [[0, 0, 30, 30]]
    assert len(rows[1]["boxes"]) >= actor.model.config.min_boxes  # no boxes: the detector chose
    assert (rows[2]["stage"], rows[2]["features"]) == ("boxes", None)
    assert rows[2]["reason"] == ("image 2 (2.jpg, 120x80 pixels): box 0 [4, 4, 200, 50]: "
                                 "outside the 120x80 image")
    direct = actor.model.extract_given_boxes([pixels[0]], [np.array(given[0], np.float32) / 2])[0]
    np.testing.assert_allclose(np.array(rows[0]["features"], np.float32),
                               direct["features"].astype(np.float16).astype(np.float32))
