"""Exports to self-critical.pytorch's folders and bottom-up-attention-vqa's HDF5, and the HDF5 import.

Exported files are read back the way those projects read them (np.load(...)['feat'],
pickle id map + pos_boxes + h5py slices) and compared with the store's records.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError
from ray_updown.features import reader
from ray_updown.features.export import export_store
from ray_updown.features.hdf5 import import_hdf5
from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard

D = 8


def make_records(n=7, seed=0, k=None, string_ids=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kk = k if k is not None else int(rng.integers(1, 6))
        w, h = int(rng.integers(40, 200)), int(rng.integers(30, 150))
        xy = rng.uniform(0, 0.5, (kk, 2)) * [w, h]
        wh = rng.uniform(0.05, 0.5, (kk, 2)) * [w, h]
        out.append(FeatureRecord(
            image_id=f"COCO_val2014_{i:012d}" if string_ids else 100 + i, image_w=w, image_h=h,
            boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
            features=(np.maximum(rng.normal(size=(kk, D)), 0) * 5).astype(np.float32),
            object_ids=rng.integers(1, 50, kk), object_conf=rng.uniform(0, 1, kk)))
    return out


def write_store(uri, records, per_shard=3, row_group_rows=2, **meta_kw):
    meta = StoreMeta(feature_dim=D, image_id_type="string" if isinstance(records[0].image_id, str) else "int64",
                     detector="test-detector", detector_config={"min_boxes": 1}, checkpoint_hash="abc", **meta_kw)
    for shard, start in enumerate(range(0, len(records), per_shard)):
        write_feature_shard(records[start:start + per_shard], feature_shard_uri(uri, shard), meta,
                            row_group_rows=row_group_rows)
    return FeatureStore(uri)  # builds index.parquet


@pytest.fixture
def store(tmp_path):
    records = make_records()
    write_store(str(tmp_path / "store"), records)
    return str(tmp_path / "store"), records


def stored(records):
    """What the store gives back: features rounded to float16."""
    return {r.image_id: r.features.astype(np.float16) for r in records}


def spatial6(boxes, w, h):
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], 1)


def no_temporaries(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


# -- self-critical ---------------------------------------------------------------------------

def test_self_critical_layout_read_like_its_dataloader(store, tmp_path):
    uri, records = store
    out = tmp_path / "sc"
    summary = export_store(uri, "self-critical", str(out))
    assert summary["written"] == len(records) and summary["skipped"] == 0
    assert sorted(os.listdir(out)) == ["cocobu_att", "cocobu_box", "cocobu_fc", "ray-updown-export.json"]
    halfs = stored(records)
    for r in records:
        att = np.load(out / "cocobu_att" / f"{r.image_id}.npz")
        assert att.files == ["feat"]
        feat = att["feat"]
        assert feat.dtype == np.float32 and feat.shape == (r.num_boxes, D)
        np.testing.assert_array_equal(feat, halfs[r.image_id].astype(np.float32))
        fc = np.load(out / "cocobu_fc" / f"{r.image_id}.npy")
        assert fc.dtype == np.float32 and fc.shape == (D,)
        np.testing.assert_allclose(fc, halfs[r.image_id].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
        box = np.load(out / "cocobu_box" / f"{r.image_id}.npy")
        assert box.dtype == np.float32 and box.shape == (r.num_boxes, 4)
        np.testing.assert_array_equal(box, r.boxes)
    assert no_temporaries(out) == []


def test_self_critical_rerun_skips_and_fills_gaps(store, tmp_path):
    uri, records = store
    out = tmp_path / "sc"
    export_store(uri, "self-critical", str(out))
    stamps = {p: os.stat(p).st_mtime_ns for p in (out / "cocobu_att").iterdir()}
    again = export_store(uri, "self-critical", str(out))
    assert again["written"] == 0 and again["skipped"] == len(records) and again["files_written"] == 0
    assert {p: os.stat(p).st_mtime_ns for p in (out / "cocobu_att").iterdir()} == stamps
    missing = out / "cocobu_fc" / f"{records[2].image_id}.npy"
    missing.unlink()
    third = export_store(uri, "self-critical", str(out))
    assert (third["written"], third["files_written"]) == (1, 1)
    assert missing.exists() and {p: os.stat(p).st_mtime_ns for p in (out / "cocobu_att").iterdir()} == stamps
    for sub in ("cocobu_att", "cocobu_fc", "cocobu_box"):
        assert len(os.listdir(out / sub)) == len(records)  # nothing duplicated


def _other_store(uri, records, per_shard=3, **changes):
    """The same images in a store whose features were made otherwise (`changes` to StoreMeta)."""
    fields = {"feature_dim": D, "detector": "test-detector", "detector_config": {"min_boxes": 1},
              "checkpoint_hash": "abc", **changes}
    for shard, start in enumerate(range(0, len(records), per_shard)):
        write_feature_shard(records[start:start + per_shard], feature_shard_uri(uri, shard),
                            StoreMeta(**fields))
    return uri


def test_self_critical_refuses_a_folder_exported_from_another_store(store, tmp_path, capsys):
    from ray_updown.cli import main

    uri, records = store
    out = tmp_path / "sc"
    export_store(uri, "self-critical", str(out))
    stamps = {p: os.stat(p).st_mtime_ns for p in (out / "cocobu_att").iterdir()}
    other = _other_store(str(tmp_path / "other"), make_records(seed=9), checkpoint_hash="def")
    theirs = out / "cocobu_fc" / "100.npy.tmp-1a2b3c4d"  # the folder's owner may still be writing
    theirs.write_bytes(b"half")
    with pytest.raises(DataError, match="holds an export of another store .*checkpoint_hash") as err:
        export_store(other, "self-critical", str(out))
    assert err.value.file == str(out) and theirs.exists()
    theirs.unlink()
    capsys.readouterr()
    assert main(["export", "--store", other, "--format", "self-critical", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"ray-updown export: error: {out}: holds")
    assert {p: os.stat(p).st_mtime_ns for p in (out / "cocobu_att").iterdir()} == stamps
    # More images made the same way (another split of the same extraction) may join the folder.
    more = [FeatureRecord(image_id=500 + i, image_w=r.image_w, image_h=r.image_h, boxes=r.boxes,
                          features=r.features) for i, r in enumerate(make_records(2, seed=4))]
    assert export_store(write_store(str(tmp_path / "more"), more).uri, "self-critical", str(out))["written"] == 2


def test_self_critical_refuses_a_folder_of_files_without_its_marker(store, tmp_path):
    uri, records = store
    out = tmp_path / "sc"
    export_store(uri, "self-critical", str(out))
    (out / "ray-updown-export.json").unlink()
    with pytest.raises(DataError, match="holds exported files but no ray-updown-export.json"):
        export_store(uri, "self-critical", str(out))


def test_self_critical_rewrites_incomplete_files_and_removes_temporaries(store, tmp_path):
    uri, records = store
    out = tmp_path / "sc"
    export_store(uri, "self-critical", str(out))
    a, b, c, d = (r.image_id for r in records[:4])
    att = out / "cocobu_att" / f"{a}.npz"
    att.write_bytes(att.read_bytes()[:-30])  # truncated: the zip's directory is cut off
    (out / "cocobu_fc" / f"{b}.npy").write_bytes(b"")  # empty
    (out / "cocobu_box" / f"{c}.npy").write_bytes(b"junk of an interrupted copy")
    np.save(out / "cocobu_fc" / f"{d}.npy", np.zeros(D + 1, np.float32))  # another dimension
    tmp = out / "cocobu_att" / f"{a}.npz.tmp-1a2b3c4d"
    tmp.write_bytes(b"half")
    again = export_store(uri, "self-critical", str(out))
    assert (again["written"], again["files_written"], again["files_rewritten"]) == (4, 4, 4)
    assert again["skipped"] == len(records) - 4 and again["temporary_files_removed"] == 1
    assert no_temporaries(out) == []
    halfs = stored(records)
    np.testing.assert_array_equal(np.load(att)["feat"], halfs[a].astype(np.float32))
    for image_id in (b, d):
        np.testing.assert_allclose(np.load(out / "cocobu_fc" / f"{image_id}.npy"),
                                   halfs[image_id].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.load(out / "cocobu_box" / f"{c}.npy"), records[2].boxes)
    assert export_store(uri, "self-critical", str(out))["files_written"] == 0


@pytest.mark.parametrize("fmt", ["self-critical", "hdf5"])
def test_exports_refuse_a_store_whose_parts_were_made_differently(tmp_path, fmt):
    records = make_records(6)
    uri = str(tmp_path / "mixed")
    write_store(uri, records[:3])  # part 0
    write_feature_shard(records[3:], feature_shard_uri(uri, 1),
                        StoreMeta(feature_dim=D, detector="another-detector",
                                  detector_config={"min_boxes": 1}, checkpoint_hash="abc"))
    with pytest.raises(DataError, match=r"parts were made differently \(part-00001.parquet differs "
                                        r"from part-00000.parquet in detector;") as err:
        export_store(uri, fmt, str(tmp_path / "out"))
    assert err.value.file == uri and not (tmp_path / "out").exists()


def test_self_critical_rejects_ids_that_are_not_file_names(tmp_path):
    rec = make_records(2, string_ids=True)
    rec[1].image_id = "../escape"
    uri = str(tmp_path / "store")
    write_store(uri, rec)
    with pytest.raises(DataError, match=r"part-00000\.parquet: image '\.\./escape': image id cannot be a file"):
        export_store(uri, "self-critical", str(tmp_path / "sc"))
    assert not (tmp_path / "escape.npy").exists()


# -- HDF5 ------------------------------------------------------------------------------------

def test_hdf5_adaptive_layout_read_like_the_vqa_loader(store, tmp_path):
    uri, records = store
    summary = export_store(uri, "hdf5", str(tmp_path / "h5"), name="train")
    assert summary["images"] == len(records) and summary["boxes"] == sum(r.num_boxes for r in records)
    with open(tmp_path / "h5" / "train_imgid2idx.pkl", "rb") as f:
        img_id2idx = pickle.load(f)  # our own output, written by this test
    assert type(img_id2idx) is dict and all(type(k) is int and type(v) is int for k, v in img_id2idx.items())
    ids_json = json.loads((tmp_path / "h5" / "train_imgid2idx.json").read_text())
    assert ids_json == {str(k): v for k, v in img_id2idx.items()}
    halfs = stored(records)
    with h5py.File(tmp_path / "h5" / "train.hdf5", "r") as hf:
        features = np.array(hf.get("image_features"))
        spatials = np.array(hf.get("spatial_features"))
        pos_boxes = np.array(hf.get("pos_boxes"))
        bb = hf["image_bb"]
        total = sum(r.num_boxes for r in records)
        assert features.shape == (total, D) and features.dtype == np.float32
        assert spatials.shape == (total, 6) and bb.shape == (total, 4) and bb.dtype == np.float32
        assert pos_boxes.shape == (len(records), 2) and pos_boxes.dtype == np.int32
        for r in records:
            start, end = pos_boxes[img_id2idx[r.image_id]]
            np.testing.assert_array_equal(features[start:end], halfs[r.image_id].astype(np.float32))
            np.testing.assert_array_equal(bb[start:end], r.boxes)
            np.testing.assert_allclose(spatials[start:end], spatial6(r.boxes, r.image_w, r.image_h),
                                       rtol=1e-6, atol=1e-7)
        # every box row belongs to exactly one image
        assert sorted(map(tuple, pos_boxes))[0][0] == 0 and int(pos_boxes[:, 1].max()) == total


def test_hdf5_out_file_name_and_fixed_layout(tmp_path):
    records = make_records(5, k=4)
    uri = str(tmp_path / "store")
    write_store(uri, records)
    summary = export_store(uri, "hdf5", str(tmp_path / "data" / "train36.hdf5"), layout="fixed")
    assert summary["ids_pickle"].endswith("train36_imgid2idx.pkl")
    with open(tmp_path / "data" / "train36_imgid2idx.pkl", "rb") as f:
        img_id2idx = pickle.load(f)
    with h5py.File(tmp_path / "data" / "train36.hdf5", "r") as hf:
        assert "pos_boxes" not in hf
        features, spatials = np.array(hf.get("image_features")), np.array(hf.get("spatial_features"))
        assert features.shape == (5, 4, D) and spatials.shape == (5, 4, 6)
        for r in records:
            np.testing.assert_array_equal(features[img_id2idx[r.image_id]], r.features.astype(np.float16))
    back = tmp_path / "back"
    result = import_hdf5(str(tmp_path / "data" / "train36.hdf5"), str(back))
    assert result["layout"] == "fixed" and result["images"] == 5
    got = FeatureStore(str(back))
    for r in records:
        np.testing.assert_array_equal(got.get(r.image_id).boxes, r.boxes)


def test_hdf5_fixed_layout_needs_equal_box_counts(store, tmp_path):
    uri, records = store
    with pytest.raises(DataError, match=r"part-\d+\.parquet: image \d+: has \d boxes, but the fixed layout"
                                        r".*\(export with --layout adaptive\)"):
        export_store(uri, "hdf5", str(tmp_path / "h5"), layout="fixed")
    assert not (tmp_path / "h5" / "features.hdf5").exists()
    assert no_temporaries(tmp_path) == []


def test_hdf5_rerun_replaces_without_duplicates(store, tmp_path):
    uri, records = store
    export_store(uri, "hdf5", str(tmp_path / "h5"))
    first = (tmp_path / "h5" / "features_imgid2idx.json").read_text()
    export_store(uri, "hdf5", str(tmp_path / "h5"))
    assert sorted(os.listdir(tmp_path / "h5")) == ["features.hdf5", "features_imgid2idx.json",
                                                    "features_imgid2idx.pkl"]
    assert (tmp_path / "h5" / "features_imgid2idx.json").read_text() == first
    with h5py.File(tmp_path / "h5" / "features.hdf5", "r") as hf:
        assert hf["pos_boxes"].shape[0] == len(records)
        assert hf["image_features"].shape[0] == sum(r.num_boxes for r in records)


@pytest.mark.parametrize("string_ids", [False, True])
def test_hdf5_round_trip_gives_the_same_records(tmp_path, string_ids):
    records = make_records(6, seed=3, string_ids=string_ids)
    uri = str(tmp_path / "store")
    # Vocabularies travel in the file's store_metadata when the store has them.
    vocab = ({"object_vocab": ["__background__", "dog"], "attribute_vocab": ["__no_attribute__", "red"]}
             if "object_vocab" in StoreMeta.__dataclass_fields__ else {})
    write_store(uri, records, **vocab)
    export_store(uri, "hdf5", str(tmp_path / "h5"))
    summary = import_hdf5(str(tmp_path / "h5" / "features.hdf5"), str(tmp_path / "back"))
    assert summary["images"] == 6 and summary["image_sizes"] == "image_size dataset"
    back = FeatureStore(str(tmp_path / "back"))
    original = FeatureStore(uri)
    assert sorted(back.image_ids) == sorted(original.image_ids)
    assert back.metadata["detector"] == "test-detector" and back.metadata["checkpoint_hash"] == "abc"
    assert back.metadata["image_id_type"] == ("string" if string_ids else "int64")
    assert all(back.metadata[k] == v for k, v in vocab.items())
    for r in original.iter_records():
        g = back.get(r.image_id)
        assert (g.image_id, g.image_w, g.image_h, g.num_boxes) == (r.image_id, r.image_w, r.image_h, r.num_boxes)
        np.testing.assert_array_equal(g.boxes, r.boxes)
        assert g.features.dtype == np.float16
        np.testing.assert_array_equal(g.features, r.features)
        assert not g.object_ids.any() and not g.attr_conf.any()  # the HDF5 layout has no labels
    # a second import writes the same shards again: no duplicate ids
    import_hdf5(str(tmp_path / "h5" / "features.hdf5"), str(tmp_path / "back"))
    assert len(FeatureStore(str(tmp_path / "back"))) == 6


def converter_style_file(path, records, unused_rows=0):
    """An HDF5 as adaptive_detection_features_converter.py writes it: no sizes, no attributes."""
    total = sum(r.num_boxes for r in records)
    with h5py.File(path, "w") as h:
        feats = h.create_dataset("image_features", (total, D), "f")
        bb = h.create_dataset("image_bb", (total, 4), "f")
        sp = h.create_dataset("spatial_features", (total, 6), "f")
        pos = h.create_dataset("pos_boxes", (len(records) + unused_rows, 2), dtype="int32")
        n = 0
        for i, r in enumerate(records):
            b = r.boxes
            w, h_ = float(r.image_w), float(r.image_h)
            bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            sx, sy, sw, sh = b[:, 0] / w, b[:, 1] / h_, bw / w, bh / h_
            pos[i] = [n, n + r.num_boxes]
            bb[n:n + r.num_boxes] = b
            feats[n:n + r.num_boxes] = r.features
            sp[n:n + r.num_boxes] = np.stack([sx, sy, sx + sw, sy + sh, sw, sh], 1)
            n += r.num_boxes
    ids = {r.image_id: i for i, r in enumerate(records)}
    return ids


def test_import_converter_file_derives_image_sizes(tmp_path):
    records = make_records(5, seed=9)
    ids = converter_style_file(tmp_path / "val.hdf5", records, unused_rows=2)
    (tmp_path / "val_imgid2idx.json").write_text(json.dumps({str(k): v for k, v in ids.items()}))
    summary = import_hdf5(str(tmp_path / "val.hdf5"), str(tmp_path / "store"))
    assert summary["image_sizes"] == "derived from spatial_features" and summary["rows_without_id"] == 2
    got = FeatureStore(str(tmp_path / "store"))
    assert got.metadata["detector"] == "bottom-up-attention (imported HDF5)"
    for r in records:
        g = got.get(r.image_id)
        assert (g.image_w, g.image_h) == (r.image_w, r.image_h)
        np.testing.assert_array_equal(g.features, r.features.astype(np.float16))


def test_import_explicit_ids_file(tmp_path):
    records = make_records(3, seed=4)
    ids = converter_style_file(tmp_path / "x.hdf5", records)
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in ids.items()}))
    assert import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "store"), ids=str(tmp_path / "map.json"))["images"] == 3


def _break(path, how):
    with h5py.File(path, "r+") as h:
        if how == "missing":
            del h["image_features"]
        elif how == "lengths":
            del h["image_bb"]
            h.create_dataset("image_bb", (3, 4), "f")
        elif how == "pos_range":
            h["pos_boxes"][1] = [0, 10_000]
        elif how == "no_pos":
            del h["pos_boxes"]


@pytest.mark.parametrize("how,message", [
    ("missing", r"x\.hdf5: missing dataset\(s\) image_features"),
    ("lengths", r"x\.hdf5: image_bb has shape \(3, 4\), expected"),
    ("pos_range", r"x\.hdf5: image 101 \(row 1\): pos_boxes \[0, 10000\) is outside"),
    ("no_pos", r"x\.hdf5: image_features is 2-D .* no pos_boxes"),
])
def test_malformed_hdf5_is_one_data_error(tmp_path, how, message):
    records = make_records(4)
    ids = converter_style_file(tmp_path / "x.hdf5", records)
    (tmp_path / "x_imgid2idx.json").write_text(json.dumps({str(k): v for k, v in ids.items()}))
    _break(tmp_path / "x.hdf5", how)
    with pytest.raises(DataError, match=message):
        import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("mapping,message", [
    ({"100": 0, "101": 9}, r"x\.hdf5: image 101 \(row 9\): the id map points at row 9, but the file has 4"),
    ({"100": 0, "101": 0}, r"x_imgid2idx\.json: image 101: row 0 is claimed by images 100 and 101"),
    ({"100": "zero"}, r"x_imgid2idx\.json: image '100': row must be a non-negative integer"),
])
def test_id_map_not_matching_rows_is_one_data_error(tmp_path, mapping, message):
    converter_style_file(tmp_path / "x.hdf5", make_records(4))
    (tmp_path / "x_imgid2idx.json").write_text(json.dumps(mapping))
    with pytest.raises(DataError, match=message):
        import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "store"))


def test_import_never_loads_a_pickle_map(tmp_path, monkeypatch):
    ids = converter_style_file(tmp_path / "x.hdf5", make_records(2))
    with open(tmp_path / "x_imgid2idx.pkl", "wb") as f:
        pickle.dump(ids, f)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    with pytest.raises(DataError, match=r"x\.hdf5: no image-id map .*x_imgid2idx\.json; only .*\.pkl exists, "
                                        r"and pickles are not loaded"):
        import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "store"))


def test_not_an_hdf5_file(tmp_path):
    (tmp_path / "x.hdf5").write_bytes(b"not hdf5 at all")
    (tmp_path / "x_imgid2idx.json").write_text('{"1": 0}')
    with pytest.raises(DataError, match=r"x\.hdf5: not a readable HDF5 file"):
        import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "store"))


def test_size_derivation_detects_inconsistent_spatial_features(tmp_path):
    records = make_records(3, k=3)
    ids = converter_style_file(tmp_path / "x.hdf5", records)
    (tmp_path / "x_imgid2idx.json").write_text(json.dumps({str(k): v for k, v in ids.items()}))
    with h5py.File(tmp_path / "x.hdf5", "r+") as h:
        s, e = h["pos_boxes"][1]
        sp = h["spatial_features"][s:e]
        sp[0, 2] *= 1.5  # one box's x2/w no longer matches the others'
        h["spatial_features"][s:e] = sp
    with pytest.raises(DataError, match=r"x\.hdf5: image 101 \(row 1\): .*image width"):
        import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "store"))


# -- bounded memory, errors of use ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["self-critical", "hdf5"])
def test_exports_stream_one_row_group_at_a_time(tmp_path, monkeypatch, fmt):
    records = make_records(11, seed=5)
    uri = str(tmp_path / "store")
    write_store(uri, records, per_shard=4, row_group_rows=2)  # 3 shards, 6 row groups
    groups = [(f, rg) for f in range(3) for rg in range(pq.ParquetFile(feature_shard_uri(uri, f)).num_row_groups)]
    assert len(groups) == 6
    decoded = []
    original_decode = reader.FeatureStore._decode

    def spy(self, f, rg):
        rows = original_decode(self, f, rg)
        decoded.append((f, rg, len(rows)))
        return rows

    def whole_file(*a, **k):
        raise AssertionError("an export read a whole shard")

    original_init = reader.FeatureStore.__init__

    def init(self, uri, in_memory=False, **kw):
        assert not in_memory, "an export asked for the whole store in memory"
        original_init(self, uri, in_memory=in_memory, **kw)

    monkeypatch.setattr(reader.FeatureStore, "_decode", spy)
    monkeypatch.setattr(reader.FeatureStore, "__init__", init)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    summary = export_store(uri, fmt, str(tmp_path / "out"))
    assert summary["images"] == 11
    assert [(f, rg) for f, rg, _ in decoded] == groups  # each row group once, in order
    assert max(n for _, _, n in decoded) <= 2


def test_missing_h5py_is_a_config_error(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ray-updown\[hdf5\]'"):
        export_store(uri, "hdf5", str(tmp_path / "h5"))
    with pytest.raises(ConfigError, match=r"pip install 'ray-updown\[hdf5\]'"):
        import_hdf5(str(tmp_path / "x.hdf5"), str(tmp_path / "back"))


def test_unknown_format_is_a_config_error(store, tmp_path):
    with pytest.raises(ConfigError, match="unknown export format 'npz'"):
        export_store(store[0], "npz", str(tmp_path / "o"))


def test_exports_and_import_through_s3_with_progress_on_stderr(s3_bucket, capsys):
    records = make_records(4, seed=2)
    uri = f"{s3_bucket}/store"
    write_store(uri, records)
    out = f"{s3_bucket}/exports"
    assert export_store(uri, "self-critical", out)["written"] == 4
    assert export_store(uri, "self-critical", out)["skipped"] == 4
    r = records[1]
    att = np.load(io.BytesIO(storage.read_bytes(f"{out}/cocobu_att/{r.image_id}.npz")))["feat"]
    np.testing.assert_array_equal(att, r.features.astype(np.float16).astype(np.float32))
    export_store(uri, "hdf5", out)
    import_hdf5(f"{out}/features.hdf5", f"{s3_bucket}/back")
    back = FeatureStore(f"{s3_bucket}/back")
    for r in records:
        np.testing.assert_array_equal(back.get(r.image_id).features, r.features.astype(np.float16))
    err = capsys.readouterr().err
    assert "export self-critical" in err and "100%" in err  # the tqdm bars
    assert err.rstrip().splitlines()[-1] == f"import hdf5: 4 images, {sum(x.num_boxes for x in records)} " \
                                            f"boxes (adaptive) into 1 shard(s) of {s3_bucket}/back"
