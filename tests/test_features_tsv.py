"""TSV import/export: the original bottom-up-attention layout and the LXMERT variant."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from ray_updown.errors import DataError
from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord
from ray_updown.features.tsv import export_tsv, format_tsv_line, import_tsv, parse_tsv_line

D = 12


def records(n=5, seed=0, string_ids=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 6))
        xy = rng.uniform(0, 30, (k, 2)).astype(np.float32)
        out.append(FeatureRecord(
            image_id=f"COCO_val2014_{i:012d}" if string_ids else 42 + i, image_w=64, image_h=48,
            boxes=np.concatenate([xy, xy + 5], 1),
            features=np.maximum(rng.normal(size=(k, D)), 0).astype(np.float32),
            object_ids=rng.integers(1, 1601, k), object_conf=rng.uniform(0, 1, k),
            attr_ids=rng.integers(1, 401, k), attr_conf=rng.uniform(0, 1, k)))
    return out


def write_tsv(path, recs, variant):
    path.write_text("".join(format_tsv_line(r, variant) for r in recs))


def test_original_layout_field_order_and_dtypes():
    r = records(1)[0]
    fields = format_tsv_line(r, "original").rstrip("\n").split("\t")
    assert fields[:4] == ["42", "64", "48", str(r.num_boxes)]
    boxes = np.frombuffer(base64.b64decode(fields[4]), np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(boxes, r.boxes)
    assert len(base64.b64decode(fields[5])) == r.num_boxes * D * 4  # float32


def test_lxmert_layout_field_order_and_dtypes():
    r = records(1, string_ids=True)[0]
    fields = format_tsv_line(r, "lxmert").rstrip("\n").split("\t")
    assert len(fields) == 10
    assert fields[:3] == ["COCO_val2014_000000000000", "48", "64"]  # img_h before img_w
    # LXMERT counts objects and attributes from 0, without background / "no attribute".
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(fields[3]), np.int64), r.object_ids - 1)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(fields[5]), np.int64), r.attr_ids - 1)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(fields[6]), np.float32), r.attr_conf)
    assert fields[7] == str(r.num_boxes)


def test_lxmert_refuses_regions_without_a_label():
    r = records(1)[0]
    r.object_ids[0] = 0  # background / a store without labels
    with pytest.raises(DataError, match="image 42: object_ids holds 0 .* export the 'original'"):
        format_tsv_line(r, "lxmert")


@pytest.mark.parametrize("variant,string_ids", [("original", False), ("lxmert", True)])
def test_tsv_round_trip(tmp_path, variant, string_ids):
    recs = records(5, string_ids=string_ids)
    src = tmp_path / "in.tsv"
    write_tsv(src, recs, variant)
    store_uri = str(tmp_path / "store")
    assert import_tsv(str(src), store_uri, variant=variant, rows_per_shard=2) == 5
    store = FeatureStore(store_uri)
    assert len(store) == 5 and len(store.feature_files()) == 3
    assert store.metadata["detector_config"]["tsv_variant"] == variant
    for r in recs:
        got = store.get(r.image_id)
        np.testing.assert_array_equal(got.boxes, r.boxes)
        np.testing.assert_allclose(got.features.astype(np.float32), r.features, rtol=2 ** -11, atol=1e-7)
        if variant == "lxmert":
            np.testing.assert_array_equal(got.object_ids, r.object_ids)
            np.testing.assert_array_equal(got.attr_conf, r.attr_conf)
    out = tmp_path / "out.tsv"
    assert export_tsv(store_uri, str(out), variant=variant) == 5
    lines = out.read_text().splitlines()
    back = [parse_tsv_line(line, variant, str(out), n) for n, line in enumerate(lines, 1)]
    assert [b.image_id for b in back] == [r.image_id for r in recs]
    for b, r in zip(back, recs):
        # Exported float32 values are the float16-rounded originals.
        np.testing.assert_array_equal(b.features, r.features.astype(np.float16).astype(np.float32))
        assert (b.image_w, b.image_h) == (r.image_w, r.image_h)


def test_tsv_on_s3(s3_bucket, tmp_path):
    src = tmp_path / "in.tsv"
    recs = records(3)
    write_tsv(src, recs, "original")
    import_tsv(str(src), f"{s3_bucket}/store", rows_per_shard=10)
    assert export_tsv(f"{s3_bucket}/store", f"{s3_bucket}/out.tsv") == 3
    assert FeatureStore(f"{s3_bucket}/store").get(43).num_boxes == recs[1].num_boxes


def test_malformed_lines_name_file_and_line(tmp_path):
    good = format_tsv_line(records(1)[0], "original")
    cases = {
        "too few": (good.split("\t", 1)[1], r"line 2: expected 6 tab-separated fields"),
        "bad base64": (good.rsplit("\t", 1)[0] + "\t@@notbase64@@\n", r"line 2: field features is not valid base64"),
        "bad width": ("42\tsixty\t48\t1\tAAAA\tAAAA\n", r"line 2: field image_w is not an integer"),
        "short boxes": ("\t".join(good.split("\t")[:3] + ["99"] + good.split("\t")[4:]),
                        r"line 2: field boxes has \d+ bytes, expected 1584"),
    }
    for name, (bad_line, pattern) in cases.items():
        src = tmp_path / f"{name.replace(' ', '_')}.tsv"
        src.write_text(good + bad_line)
        with pytest.raises(DataError, match=f"{src.name}: {pattern}"):
            import_tsv(str(src), str(tmp_path / f"store_{name.replace(' ', '_')}"))
    with pytest.raises(DataError, match="unknown TSV variant"):
        parse_tsv_line(good, "detectron")
