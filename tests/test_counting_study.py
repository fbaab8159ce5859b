"""The counting study's region coverage (demo/counting.py) on hand-made boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ray_updown.demo.counting import annotated_shapes, draw_study, region_coverage


def test_coverage_counts_duplicates_misses_and_context_regions():
    shapes = {1: np.array([[0, 0, 10, 10], [50, 50, 70, 70]], dtype=float),
              2: np.array([[0, 0, 20, 20]], dtype=float)}
    regions = {
        # image 1: its first shape seen twice (a duplicate), its second missed, one region on
        # the background; image 2: its one shape seen once
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


def test_study_picture_is_drawn_from_a_summary(tmp_path):
    per_seed = {"overall": [60.0, 62.0], "yes/no": [58.0, 58.0], "number": [72.0, 74.0],
                "other": [58.0, 60.0]}
    summary = {"world_seed": 0, "vqa_seeds": 2, "fixed": "fixed36",
               "vqa": {name: {**per_seed, "mean": {k: float(np.mean(v)) for k, v in per_seed.items()}}
                       for name in ("fixed36", "adaptive")}}
    draw_study(summary, str(tmp_path / "counting.png"))
    with Image.open(tmp_path / "counting.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 400


def test_a_demo_folder_without_its_config_record_is_one_line_naming_the_file(tmp_path):
    from ray_updown import storage
    from ray_updown.demo.counting import main

    with pytest.raises(SystemExit, match="not a demo folder with its region features"):
        main(["--demo", str(tmp_path)])
    storage.write_json(str(tmp_path / "stages" / "extract_regions.json"), {"result": {}})
    with pytest.raises(SystemExit, match=r"counting: error: .*demo_config\.json: not a demo folder"):
        main(["--demo", str(tmp_path)])


def test_fewer_than_one_seed_exits_with_one_line_before_any_work(tmp_path):
    from ray_updown.demo.counting import main

    with pytest.raises(SystemExit, match="--seeds must be at least 1, got 0"):
        main(["--demo", str(tmp_path), "--seeds", "0"])
    assert list(tmp_path.iterdir()) == []  # nothing written
