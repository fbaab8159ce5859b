"""Inputs that change between runs into one store: new boxes or another id for an image
already done, a file replaced by another image under its name, other decode settings, and an
export folder that another store filled. Each is refused in one line naming what changed;
`redo_changed=true` redoes exactly the shards that hold the changes (every shard for changed
settings), and inputs = features + errors holds after every run. A tar shard replaced under
its name likewise."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultkit import assert_accounted, loose_file_extraction, write_images
from PIL import Image

from ray_updown.detector import save_detector
from ray_updown.errors import ConfigError, RayUpdownError
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
from ray_updown.features.export import export_store
from ray_updown.features.reader import FeatureStore

pytestmark = pytest.mark.usefixtures("local_ray")


def _manifest(path, ids, boxes) -> str:
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.int64()),
                             "uri": [f"imgs/{n}.png" for n in range(1, len(ids) + 1)],
                             "boxes": boxes}), path)
    return str(path)


def _part_bytes(out) -> dict:
    return {p.name + p.parent.name: p.read_bytes() for p in sorted(out.rglob("part-*.parquet"))}


def test_changed_boxes_and_ids_are_refused_then_redone_shard_by_shard(tmp_path, detector):
    write_images(str(tmp_path / "imgs"), 6)
    save_detector(detector, str(tmp_path / "ckpt"))
    boxes = [[[0, 0, 20, 20]], None, None, None, [[2, 2, 30, 30]], None]
    out = tmp_path / "store"
    cfg = ExtractConfig(manifest=_manifest(tmp_path / "m.parquet", [1, 2, 3, 4, 5, 6], boxes),
                        out=str(out), checkpoint=str(tmp_path / "ckpt"), rows_per_shard=2, batch_size=2)
    assert run_extraction(cfg)["shards"] == 3
    before = _part_bytes(out)

    # Image 1 gets other boxes, and file 4 another id: both already done.
    boxes[0] = [[4, 4, 40, 36]]
    _manifest(tmp_path / "m.parquet", [1, 2, 3, 40, 5, 6], boxes)
    with pytest.raises(ConfigError, match=r"2 image\(s\) this store already planned changed since.*"
                                          r"ids 1, 40.*redo_changed=true"):
        run_extraction(cfg)
    assert _part_bytes(out) == before  # refused before anything moved

    summary = run_extraction(dataclasses.replace(cfg, redo_changed=True))
    assert (summary["shards_redone"], summary["shards_processed"]) == (2, 2)  # shards 0 and 1
    after = _part_bytes(out)  # (an errors part rewritten with no errors reads the same)
    assert {k for k in before if before[k] != after.get(k)} == {
        "part-00000.parquetfeatures", "part-00001.parquetfeatures"}
    store = FeatureStore(str(out))
    assert sorted(store.image_ids) == [1, 2, 3, 5, 6, 40]
    np.testing.assert_array_equal(store.get(1).boxes, [[4, 4, 40, 36]])
    assert summary["inputs"] == summary["features"] + summary["errors"] == 6
    assert run_extraction(cfg)["shards_processed"] == 0  # the same inputs again: nothing to do


def test_a_replaced_file_and_other_decode_settings_are_refused_then_redone(tmp_path, detector):
    cfg = loose_file_extraction(tmp_path, detector, 5, batch_size=2)
    out = tmp_path / "store"
    run_extraction(cfg)
    old = assert_accounted(str(out), 5).get(3)

    # 3.png replaced by another picture of another size under the same name.
    Image.fromarray(np.full((30, 52, 3), 200, np.uint8)).save(tmp_path / "imgs" / "3.png")
    with pytest.raises(ConfigError, match=r"1 image\(s\) this store already planned changed since.*ids 3\b"):
        run_extraction(cfg)
    summary = run_extraction(dataclasses.replace(cfg, redo_changed=True))
    assert (summary["shards_redone"], summary["shards_processed"]) == (1, 1)
    new = assert_accounted(str(out), 5).get(3)
    assert (new.image_w, new.image_h) == (52, 30) != (old.image_w, old.image_h)

    # Another decode setting: every shard's features would change.
    smaller = dataclasses.replace(cfg, min_side=24, max_side=32)
    with pytest.raises(ConfigError, match=r"decode or model settings differ.*max_side: 1000 -> 32"):
        run_extraction(smaller)
    summary = run_extraction(dataclasses.replace(smaller, redo_changed=True))
    assert (summary["shards_redone"], summary["shards_processed"]) == (3, 3)
    assert_accounted(str(out), 5)
    assert run_extraction(smaller)["shards_processed"] == 0


def test_an_export_folder_filled_from_another_store_is_refused(tmp_path, detector):
    write_images(str(tmp_path / "imgs"), 3)
    save_detector(detector, str(tmp_path / "ckpt"))
    stores = []
    for name, side in (("a", 1000), ("b", 32)):
        cfg = ExtractConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / name),
                            checkpoint=str(tmp_path / "ckpt"), rows_per_shard=3, batch_size=3,
                            min_side=24, max_side=side)
        run_extraction(cfg)
        stores.append(str(tmp_path / name))
    folder = str(tmp_path / "export")
    export_store(stores[0], "self-critical", folder)
    with pytest.raises(RayUpdownError, match="holds an export of another store.*other extraction_settings"):
        export_store(stores[1], "self-critical", folder)
    assert os.path.exists(folder)


def test_a_tar_replaced_under_its_name_is_refused_then_redone(tmp_path, detector):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    from containers_kit import image_samples, make_images, write_tar

    images = make_images(5)
    tars = str(tmp_path / "tars")
    write_tar(f"{tars}/00000.tar", image_samples(images[:2]))
    write_tar(f"{tars}/00001.tar", image_samples(images[2:4]))
    save_detector(detector, str(tmp_path / "ckpt"))
    out = str(tmp_path / "store")
    cfg = ExtractConfig(images=f"{tars}/*.tar", out=out, checkpoint=str(tmp_path / "ckpt"), batch_size=2)
    assert run_extraction(cfg)["features"] == 4
    write_tar(f"{tars}/00001.tar", image_samples(images[3:5]))  # another tar, same name
    with pytest.raises(ConfigError, match=r"1 tar shard\(s\) or table\(s\) .*changed since.*00001\.tar"):
        run_extraction(cfg)
    summary = run_extraction(dataclasses.replace(cfg, redo_changed=True))
    assert (summary["shards_redone"], summary["inputs"], summary["features"]) == (1, 4, 4)
    assert sorted(FeatureStore(out).image_ids) == sorted(k for k, _, _ in images[:2] + images[3:5])
