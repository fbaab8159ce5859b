"""The per-world targets table and picture (demo/seeds.py) from hand-made demo folders."""

from __future__ import annotations

import pytest
from PIL import Image

from ray_updown import storage
from ray_updown.demo.seeds import demo_targets, draw_margins, targets_table


def _fake_demo(root, seed: int, updown_number: float) -> str:
    """A demo folder with only what the summary reads: its config, detector and report."""
    out = str(root / f"demo-seed{seed}")
    row = lambda overall, number: {"overall": overall, "yes/no": 58.0, "number": number,  # noqa: E731
                                   "other": 40.0}
    cider = lambda c: {"CIDEr": c, "Bleu_4": 50.0}  # noqa: E731
    report = {"table1": {"xe": {"ResNet 7x7": cider(130.0), "Up-Down": cider(180.0)},
                         "scst": {"ResNet 7x7": cider(150.0), "Up-Down": cider(200.0)}},
              "table4": {"rows": {"ResNet 14x14": row(50.0, 70.0),
                                  "Up-Down (single model, seed 0)": row(60.0, updown_number),
                                  "Up-Down ensemble of 3": row(63.0, 72.0)},
                         "members": {"seed 0": 60.0, "seed 1": 61.0},
                         "single": "Up-Down (single model, seed 0)",
                         "ensemble": "Up-Down ensemble of 3"}}
    storage.write_json(f"{out}/stages/report.json", {"result": report})
    storage.write_json(f"{out}/stages/demo_config.json", {"seed": seed})
    storage.write_json(f"{out}/stages/detector.json",
                       {"result": {"metrics": {"epoch": 16, "val_map50": 0.97, "test_map50": 0.96}}})
    return out


def test_table_and_picture_show_each_world(tmp_path):
    runs = [demo_targets(_fake_demo(tmp_path, 0, 72.0)), demo_targets(_fake_demo(tmp_path, 1, 68.5))]
    table = targets_table(runs)
    number = next(line for line in table.splitlines() if "(number)" in line)
    assert "| met (72.00 vs best grid ResNet 14x14 70.00) |" in number
    assert "**missed** (68.50 vs best grid ResNet 14x14 70.00)" in number
    assert table.splitlines()[-1] == "| **targets met** | **7 of 7** | **6 of 7** |"
    assert runs[1]["targets"]["VQA: Up-Down > every grid baseline (number)"]["margin"] == -1.5
    draw_margins(runs, str(tmp_path / "margins.png"))
    assert Image.open(tmp_path / "margins.png").size[0] > 400


def test_a_folder_without_a_finished_demo_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no finished demo"):
        demo_targets(str(tmp_path))
