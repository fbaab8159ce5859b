"""The counting study's region coverage (demo/counting.py) on hand-made boxes."""

from __future__ import annotations

import numpy as np
import pytest

from ray_updown.demo.counting import annotated_shapes, box_iou, region_coverage


def test_box_iou_of_hand_made_boxes():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0])


def test_coverage_counts_duplicates_misses_and_context_regions():
    shapes = {1: np.array([[0, 0, 10, 10], [50, 50, 70, 70]], dtype=float),
              2: np.array([[0, 0, 20, 20]], dtype=float)}
    regions = {
        # shape 1 seen twice (a duplicate), shape 2 missed, one region on the background
        1: np.array([[0, 0, 10, 10], [0, 0, 10, 11], [80, 80, 99, 99]], dtype=float),
        2: np.array([[0, 0, 20, 20]], dtype=float),
    }
    out = region_coverage(regions, shapes)
    assert out["images"] == 2 and out["shapes"] == 3
    assert out["regions_per_image"] == 2.0
    assert out["copies_per_shape"] == pytest.approx(1.0)           # (2 + 0 + 1) / 3
    assert out["shapes_with_duplicates"] == pytest.approx(0.333)
    assert out["shapes_missed"] == pytest.approx(0.333)
    assert out["regions_on_no_shape_per_image"] == 0.5               # (1 + 0) / 2


def test_annotated_shapes_leave_the_backdrop_out(tmp_path):
    from ray_updown.data.world import WorldConfig, build_world

    build_world(WorldConfig(num_images=3, image_size=96, write_threads=2), str(tmp_path))
    shapes = annotated_shapes(str(tmp_path))
    assert sorted(shapes) == [1, 2, 3]
    for boxes in shapes.values():
        assert 2 <= len(boxes) <= 5 and (boxes[:, 2:] - boxes[:, :2] < 96).all()
