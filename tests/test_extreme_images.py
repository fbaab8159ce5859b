"""Extreme inputs: each becomes a feature row or one named error row, never nothing.

Extreme aspect ratios (a 3x2500 PNG, a 3000x4 JPEG) give feature rows; beyond
`max_aspect_ratio` an error row names the file's size; files that are not taken as inputs are
counted and named in the summary; suffixes match in any case; the bomb guard quotes the
configured limit; a run that fails its checks leaves no output folder.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import encode, png_chunks

from ray_updown.data.images import DecodeLimits, ImageDecodeError, decode_image
from ray_updown.detector import BottomUpDetector, save_detector, tiny_config
from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.extraction.inputs import list_images, list_inputs
from ray_updown.extraction.pipeline import SUMMARY_FILE, ExtractConfig, run_extraction
from ray_updown.features.reader import FeatureStore


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return BottomUpDetector(tiny_config()).eval()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- the detector's resize -------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(2500, 3), (4, 3000), (1000, 1), (1, 1000), (5, 300)])
def test_thin_images_get_a_padded_canvas_and_regions(detector, height, width):
    image = np.asarray(_noise(width, height))
    batch = detector.transform([image])
    (canvas_h, canvas_w), = batch.image_sizes
    assert min(canvas_h, canvas_w) >= detector.config.feature_stride
    assert max(canvas_h, canvas_w) <= detector.config.max_size
    # Padding is the mean colour: zero after the mean subtraction.
    resized_w = max(1, round(width * batch.scales[0]))
    if resized_w < canvas_w:
        assert float(batch.tensor[0, :, :, resized_w:].abs().sum()) == 0.0
    out = detector.extract_regions([image])[0]
    assert (out["image_w"], out["image_h"]) == (width, height)
    assert len(out["boxes"]) >= detector.config.min_boxes
    assert np.isfinite(out["features"]).all()


def test_a_padded_image_gives_the_same_regions_alone_and_in_a_batch(detector):
    thin = np.asarray(_noise(3, 700, seed=1))
    normal = np.asarray(_noise(60, 50, seed=2))
    alone = detector.extract_regions([thin])[0]
    both = detector.extract_regions([normal, thin])
    np.testing.assert_allclose(both[1]["boxes"], alone["boxes"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(both[1]["features"], alone["features"], rtol=1e-4, atol=1e-5)
    # ... and the normal image of that batch is what it is alone.
    np.testing.assert_allclose(both[0]["features"], detector.extract_regions([normal])[0]["features"],
                               rtol=1e-4, atol=1e-5)


def test_images_at_the_minimum_are_not_padded(detector):
    # tiny config: 107 px cap; 16 px (one res4 cell) is the smallest unpadded side.
    batch = detector.transform([np.zeros((16, 107, 3), np.uint8), np.zeros((64, 80, 3), np.uint8)])
    assert batch.image_sizes == [(16, 107), (64, 80)]


# -- decode: the aspect-ratio rule and the bomb guard ------------------------------------------
def test_aspect_ratio_beyond_the_limit_is_refused_with_the_file_size():
    with pytest.raises(ImageDecodeError, match=r"image is 2x4000 pixels: aspect ratio 1:2000 is "
                                               r"beyond max_aspect_ratio 1:1000"):
        decode_image(encode(_noise(2, 4000), "PNG"))
    assert decode_image(encode(_noise(2, 2000), "PNG")).pixels.shape == (1000, 1, 3)  # 1:1000 is in
    assert decode_image(encode(_noise(2, 4000), "PNG"), DecodeLimits(max_aspect_ratio=0)).height == 4000
    with pytest.raises(ImageDecodeError, match="1:50 is beyond max_aspect_ratio 1:20"):
        decode_image(encode(_noise(500, 10), "PNG"), DecodeLimits(max_aspect_ratio=20))


def test_bomb_guard_quotes_the_configured_limit_not_pillows():
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bomb = png_chunks(50_000, 50_000, 8, 2, zlib.compress(b""))  # over Pillow's own limit too
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, DecodeLimits(max_image_pixels=1_000_000))
    assert info.value.problem == ("decompression-bomb guard: 50000x50000 = 2500000000 pixels "
                                  "exceeds max_image_pixels 1000000")
    # A limit above Pillow's decides too: the header passes, the (missing) pixels then fail.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb, DecodeLimits(max_image_pixels=3_000_000_000))
    assert "bomb" not in info.value.problem and "truncated" in info.value.problem
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's global is left as it was


# -- listing -------------------------------------------------------------------------------
def test_listing_counts_and_names_what_it_skips(tmp_path):
    for name in ("1.JPG", "2.jpeg", "sub/3.Png", "drawing.svg", "notes.txt", ".DS_Store",
                 "sub/._3.jpg", ".cache/4.jpg", "noext"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = list_inputs(str(tmp_path))
    assert [i.image_id for i in listing.images] == [1, 2, 3]  # any case of a suffix counts
    assert sorted((u.rsplit("/", 1)[1], why) for u, why in listing.skipped) == [
        (".DS_Store", "hidden"), ("._3.jpg", "hidden"), ("4.jpg", "hidden"),
        ("drawing.svg", "suffix"), ("noext", "suffix"), ("notes.txt", "suffix")]
    summary = listing.skipped_summary(first=2)
    assert summary["count"] == 6 and summary["by_reason"] == {"hidden": 3, "suffix": 3}
    assert len(summary["first"]) == 2
    # Suffixes given in any case, with or without the dot; a prefix inside a hidden folder is fine.
    assert [i.image_id for i in list_images(str(tmp_path), ("PNG",))] == [3]
    assert [i.image_id for i in list_images(str(tmp_path / ".cache"))] == [4]


def test_object_keys_ending_in_a_slash_are_skipped_as_nameless(s3_bucket):
    import boto3

    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3")
    for key, body in (("imgs/5.jpg", b"x"), ("imgs/sub/", b""), ("imgs/readme.md", b"x")):
        client.put_object(Bucket=bucket, Key=key, Body=body)
    listing = list_inputs(f"{s3_bucket}/imgs/")
    assert [i.image_id for i in listing.images] == [5]
    reasons = dict((u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1], why)
                   for u, why in listing.skipped)
    assert reasons.get("imgs/readme.md") == "suffix"
    # s3fs may or may not list a folder marker; when it does, it is a nameless skip, not an input.
    assert set(reasons.values()) <= {"suffix", "no name"}


def test_only_skipped_files_say_so_before_any_work(tmp_path):
    from test_extract_units import PoisonModel

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "logo.svg").write_bytes(b"<svg/>")
    with pytest.raises(ConfigError, match=r"no input images found; 1 file\(s\) under the input "
                                          r"skipped as not images \(suffix 1\): logo.svg"):
        run_extraction(ExtractConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "store")),
                       model_factory=PoisonModel)
    assert not (tmp_path / "store").exists()


def test_a_run_that_fails_its_checks_leaves_no_output_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    out = tmp_path / "new" / "deeper" / "store"
    with pytest.raises(CheckpointError):
        run_extraction(ExtractConfig(images=str(tmp_path / "imgs"), out=str(out),
                                     checkpoint=str(tmp_path / "missing")))
    assert not (tmp_path / "new").exists()
    # An output folder that was there before stays, as it was.
    (tmp_path / "kept").mkdir()
    with pytest.raises(CheckpointError):
        run_extraction(ExtractConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "kept"),
                                     checkpoint=str(tmp_path / "missing")))
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


# -- the real pipeline ---------------------------------------------------------------------
def test_extreme_images_through_the_pipeline(ray_cluster, tmp_path, detector, capsys):
    save_detector(detector, str(tmp_path / "ckpt"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    files = {"1.png": encode(_noise(3, 2500, 1), "PNG"), "2.jpg": encode(_noise(3000, 4, 2), "JPEG"),
             "3.png": encode(_noise(2, 4000, 3), "PNG"), "4.JPG": encode(_noise(60, 40, 4), "JPEG"),
             "logo.svg": b"<svg/>", "notes.txt": b"hello", ".DS_Store": b"\0"}
    for name, data in files.items():
        (imgs / name).write_bytes(data)
    out = tmp_path / "store"
    cfg = ExtractConfig(images=str(imgs), out=str(out), checkpoint=str(tmp_path / "ckpt"),
                        batch_size=2)
    summary = run_extraction(cfg)
    assert (summary["inputs"], summary["features"], summary["errors"]) == (4, 3, 1)
    assert summary["skipped_files"]["count"] == 3
    assert summary["skipped_files"]["by_reason"] == {"hidden": 1, "suffix": 2}
    assert sorted(u.rsplit("/", 1)[1] for u in summary["skipped_files"]["first"]) == [
        ".DS_Store", "logo.svg", "notes.txt"]
    saved = json.loads((out / SUMMARY_FILE).read_text())
    assert saved["skipped_files"] == summary["skipped_files"]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 file(s) under the input skipped as not images (hidden 1, suffix 2)" in line

    store = FeatureStore(str(out))
    for image_id, (w, h) in ((1, (3, 2500)), (2, (3000, 4)), (4, (60, 40))):
        record = store.get(image_id)
        assert (record.image_w, record.image_h) == (w, h)
        assert record.num_boxes >= detector.config.min_boxes
        assert np.isfinite(record.features.astype(np.float32)).all()
        assert (record.boxes >= 0).all() and (record.boxes[:, [0, 2]] <= w).all()
        assert (record.boxes[:, [1, 3]] <= h).all()
    error, = store.errors()
    assert error["image_id"] == 3 and error["uri"].endswith("/3.png") and error["stage"] == "decode"
    assert "2x4000 pixels" in error["reason"] and "max_aspect_ratio" in error["reason"]


def test_a_detect_stage_reason_names_the_image_its_file_and_size():
    from test_extract_units import PoisonModel

    from ray_updown.extraction.model import ModelSpec
    from ray_updown.extraction.per_image import BatchDetector
    from ray_updown.features.schema import StoreMeta

    actor = BatchDetector(ModelSpec(factory=PoisonModel), StoreMeta(feature_dim=3, image_id_type="int64",
                                                                    detector="poison-test"))
    batch = {"image_id": np.array([7]), "uri": np.array(["s3://b/imgs/7.png"], dtype=object),
             "row": np.array([0]), "shard": np.array([0]), "stage": np.array([""], dtype=object),
             "reason": np.array([""], dtype=object),
             "pixels": np.array([np.full((1, 1000, 3), 13, np.uint8), None], dtype=object)[:1],
             "image_w": np.array([2500], np.int32), "image_h": np.array([3], np.int32)}
    row, = actor(batch).to_pylist()
    assert row["reason"] == "image 7 (7.png, 2500x3 pixels): ValueError: poisoned pixel"
