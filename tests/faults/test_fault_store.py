"""Corrupted shards in an existing store: a truncated features part, a truncated errors part,
a features part without its errors part. The reader names the damaged file; a re-run of the
extraction redoes exactly those shards and never reports a damaged store complete."""

from __future__ import annotations

import os

import pytest
from faultkit import assert_accounted, loose_file_extraction

from ray_updown.errors import DataError
from ray_updown.extraction.pipeline import run_extraction
from ray_updown.features.reader import FeatureStore

pytestmark = pytest.mark.usefixtures("local_ray")


def _truncate(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_damaged_shards_are_named_by_the_reader_and_repaired_by_a_rerun(tmp_path, detector):
    cfg = loose_file_extraction(tmp_path, detector, 9, batch_size=3)
    out = tmp_path / "store"
    assert run_extraction(cfg)["shards"] == 5
    intact = {p: p.read_bytes() for p in sorted(out.rglob("part-*.parquet"))}

    features, errors = out / "features", out / "errors"
    _truncate(features / "part-00001.parquet")
    with pytest.raises(DataError, match=r"features/part-00001\.parquet: not a readable Parquet"):
        FeatureStore(str(out))
    _truncate(features / "part-00001.parquet", keep=0.0)  # an empty file: the same
    with pytest.raises(DataError, match=r"features/part-00001\.parquet"):
        FeatureStore(str(out))
    os.remove(features / "part-00001.parquet")  # (the reader reads the others again)
    os.remove(errors / "part-00001.parquet")

    os.remove(errors / "part-00003.parquet")
    with pytest.raises(DataError, match=r"features/part-00003\.parquet: this features part has "
                                        r"no errors part \(errors/part-00003\.parquet\)"):
        FeatureStore(str(out))
    os.remove(features / "part-00003.parquet")

    _truncate(errors / "part-00004.parquet", keep=0.3)
    with pytest.raises(DataError, match=r"errors/part-00004\.parquet: not a readable Parquet"):
        FeatureStore(str(out)).errors()

    # Damage again as a user would find it, then re-run: those shards, and only they, redone.
    intact_1 = {p: b for p, b in intact.items() if "00001" in p.name}
    for p, b in intact_1.items():
        p.write_bytes(b)
    _truncate(features / "part-00001.parquet")
    (features / "part-00003.parquet").write_bytes(intact[features / "part-00003.parquet"])
    summary = run_extraction(cfg)
    assert summary["shards_processed"] == 3 and summary["images_processed"] == 5  # shards 1, 3, 4
    assert (summary["features"], summary["errors"]) == (9, 0)
    assert_accounted(str(out), 9)
    assert {p: p.read_bytes() for p in sorted(out.rglob("part-*.parquet"))}.keys() == intact.keys()
    assert run_extraction(cfg)["shards_processed"] == 0  # repaired: nothing left to do


def test_a_damaged_first_shard_and_a_shard_short_of_rows_are_redone(tmp_path, detector):
    """The first features part is what a re-run checks the model against: damaged, it must
    not stop the repair. A part that reads but holds fewer rows than planned (e.g. copied
    from another run) is not complete either."""
    cfg = loose_file_extraction(tmp_path, detector, 4, batch_size=2)
    out = tmp_path / "store"
    run_extraction(cfg)
    _truncate(out / "features" / "part-00000.parquet")
    (out / "errors" / "part-00001.parquet").write_bytes(
        (out / "errors" / "part-00000.parquet").read_bytes())  # readable, but the wrong rows
    (out / "features" / "part-00001.parquet").write_bytes(
        (out / "errors" / "part-00000.parquet").read_bytes())  # 0 rows instead of 2
    summary = run_extraction(cfg)
    assert summary["shards_processed"] == 2 and summary["features"] == 4
    assert_accounted(str(out), 4)
