"""The detector's forward: shapes, dtypes, determinism, padding exactness, training, grid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ray_updown.detector import (
    BottomUpDetector,
    DetectionTarget,
    GridFeatureExtractor,
    grid_boxes,
    paper_config,
    tiny_config,
)
from ray_updown.detector.backbone import ResNetC4Trunk
from ray_updown.detector.rpn import caffe_cell_anchors, detectron2_cell_anchors
from ray_updown.detector.transform import ImageTransform, caffe_scale
from ray_updown.errors import ConfigError, DataError

KEYS = {"boxes", "features", "object_ids", "object_conf", "attr_ids", "attr_conf", "image_w",
        "image_h"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
            rng.integers(0, 256, (48, 70, 3), dtype=np.uint8),
            rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def tiny_model() -> BottomUpDetector:
    torch.manual_seed(0)
    model = BottomUpDetector(tiny_config(num_classes=6, num_attributes=5)).eval()
    # Random heads with larger weights so scores are well separated (no near-ties in NMS).
    with torch.no_grad():
        for p in model.roi_heads.predictor.parameters():
            p.normal_(0, 0.5)
        model.rpn.head.objectness_logits.weight.normal_(0, 0.3)
    return model


def test_extract_regions_shapes_and_dtypes(tiny_model):
    cfg = tiny_model.config
    out = tiny_model.extract_regions(_images())
    assert len(out) == 3
    for record, image in zip(out, _images()):
        assert set(record) == KEYS
        k = len(record["boxes"])
        assert cfg.min_boxes <= k <= cfg.max_boxes
        assert record["boxes"].shape == (k, 4) and record["boxes"].dtype == np.float32
        assert record["features"].shape == (k, cfg.feature_dim)
        assert record["features"].dtype == np.float32
        for key, dtype in (("object_ids", np.int32), ("attr_ids", np.int32),
                           ("object_conf", np.float32), ("attr_conf", np.float32)):
            assert record[key].shape == (k,) and record[key].dtype == dtype
        assert (record["object_ids"] >= 1).all() and (record["object_ids"] < cfg.num_classes).all()
        assert (record["attr_ids"] >= 1).all() and (record["attr_ids"] < cfg.num_attributes).all()
        assert ((record["object_conf"] > 0) & (record["object_conf"] <= 1)).all()
        assert (record["image_h"], record["image_w"]) == image.shape[:2]
        # Boxes are in original-image pixels (Caffe clip: 0 .. size - 1).
        b = record["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= image.shape[1]).all()
        assert (b[:, 1] >= 0).all() and (b[:, 3] <= image.shape[0]).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert np.isfinite(record["features"]).all()
        assert ((record["attr_conf"] > 0) & (record["attr_conf"] <= 1)).all()
        assert len(np.unique(b, axis=0)) == k  # k distinct regions, not one repeated


def test_extracted_rows_are_the_heads_outputs_of_one_region(tiny_model):
    """Each record row is one proposal: its box (undone resize), pooled feature, best
    foreground class and best real attribute, all taken from the same region."""
    images = _images(3)
    records = tiny_model.extract_regions(images)
    for record, pred in zip(records, tiny_model.predict(images)):
        regions = pred.regions
        all_boxes = (regions.boxes.float() / pred.scale).numpy()
        class_probs = regions.class_logits.float().softmax(dim=1).numpy()
        attr_probs = regions.attr_logits.float().softmax(dim=1).numpy()
        features = regions.features.float().numpy()
        for j, box in enumerate(record["boxes"]):
            matches = np.nonzero(np.abs(all_boxes - box).max(axis=1) < 1e-4)[0]
            assert len(matches) >= 1, f"region {j} is not one of the proposals"
            i = matches[0]
            np.testing.assert_allclose(record["features"][j], features[i], rtol=1e-5, atol=1e-6)
            assert record["object_ids"][j] == 1 + int(class_probs[i, 1:].argmax())
            assert record["object_conf"][j] == pytest.approx(float(class_probs[i, 1:].max()),
                                                             rel=1e-5)
            assert record["attr_ids"][j] == 1 + int(attr_probs[i, 1:].argmax())
            assert record["attr_conf"][j] == pytest.approx(float(attr_probs[i, 1:].max()),
                                                           rel=1e-5)


def test_extract_is_deterministic(tiny_model):
    a = tiny_model.extract_regions(_images(1))
    b = tiny_model.extract_regions(_images(1))
    for x, y in zip(a, b):
        for key in KEYS - {"image_w", "image_h"}:
            np.testing.assert_array_equal(x[key], y[key])


def test_batched_equals_one_at_a_time(tiny_model):
    images = _images(2)
    batched = tiny_model.extract_regions(images)
    for image, got in zip(images, batched):
        alone = tiny_model.extract_regions([image])[0]
        np.testing.assert_allclose(got["boxes"], alone["boxes"], atol=1e-3)
        np.testing.assert_allclose(got["features"], alone["features"], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got["object_ids"], alone["object_ids"])
        np.testing.assert_array_equal(got["attr_ids"], alone["attr_ids"])
        np.testing.assert_allclose(got["object_conf"], alone["object_conf"], atol=1e-5)


def test_padded_trunk_matches_unpadded_trunk():
    torch.manual_seed(1)
    cfg = tiny_config(norm="frozen_bn", depth=18)
    trunk = ResNetC4Trunk(cfg).eval()
    with torch.no_grad():
        for m in trunk.modules():  # non-trivial frozen statistics so padding would leak
            if hasattr(m, "running_mean"):
                m.running_mean.normal_(0, 0.5)
                m.bias.normal_(0, 0.5)
    transform = ImageTransform(cfg)
    images = [np.full((64, 64, 3), 200, np.uint8), np.full((40, 90, 3), 30, np.uint8)]
    batch = transform(images)
    assert batch.padded
    with torch.no_grad():
        feats, sizes = trunk(batch.tensor, batch.sizes_tensor)
        for i, image in enumerate(images):
            alone, _ = trunk(transform([image]).tensor, None)
            h, w = (int(v) for v in sizes[i])
            assert (h, w) == tuple(alone.shape[-2:])
            torch.testing.assert_close(feats[i, :, :h, :w], alone[0], rtol=1e-4, atol=1e-5)
            assert float(feats[i, :, h:, :].abs().sum()) == 0.0
            assert float(feats[i, :, :, w:].abs().sum()) == 0.0


def test_caffe_anchors_are_py_faster_rcnn_anchors():
    # The nine anchors py-faster-rcnn prints for scales 8, 16, 32 (sizes 128, 256, 512).
    expected = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
                [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
                [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    got = caffe_cell_anchors((128.0, 256.0, 512.0), (0.5, 1.0, 2.0))
    assert got.tolist() == [[float(v) for v in row] for row in expected]
    assert caffe_cell_anchors(paper_config().anchor_sizes, (0.5, 1.0, 2.0)).shape == (12, 4)
    d2 = detectron2_cell_anchors((64.0,), (1.0, 2.0))
    torch.testing.assert_close(d2[0], torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    w, h = d2[1, 2] - d2[1, 0], d2[1, 3] - d2[1, 1]
    assert abs(float(h / w) - 2.0) < 1e-5 and abs(float(w * h) - 64 * 64) < 1e-2


def test_transform_is_caffe_blob():
    cfg = paper_config()
    assert caffe_scale(480, 640, 600, 1000) == 600 / 480
    assert caffe_scale(300, 1000, 600, 1000) == 1.0  # 600/300 would make the long side 2000
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = 255  # pure red RGB
    batch = ImageTransform(cfg)([image])
    assert batch.image_sizes == [(600, 900)] and batch.scales == [30.0]
    pixel = batch.tensor[0, :, 300, 450]
    torch.testing.assert_close(pixel, torch.tensor([0 - 102.9801, 0 - 115.9465, 255 - 122.7717]))
    with pytest.raises(DataError):
        ImageTransform(cfg)([np.zeros((20, 30), np.uint8)])
    with pytest.raises(DataError):
        ImageTransform(cfg)([np.zeros((20, 30, 3), np.float32)])


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)  # Ray Data hands out read-only blocks
    return array


def _assert_same_records(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == set(b) == KEYS
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_read_only_arrays_give_the_same_regions_as_writable_ones(tiny_model):
    images = _images(4)
    writable = tiny_model.extract_regions([im.copy() for im in images])
    # A read-only strided view (every other row of a taller block) as well as plain arrays.
    tall = np.repeat(images[1], 2, axis=0)
    read_only = [_read_only(images[0].copy()), _read_only(tall)[::2], _read_only(images[2].copy())]
    assert not read_only[1].flags.writeable and not read_only[1].flags.c_contiguous
    before = [im.copy() for im in read_only]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = tiny_model.extract_regions(read_only)
    assert not [w for w in caught if "writ" in str(w.message)], [str(w.message) for w in caught]
    _assert_same_records(got, writable)
    assert all(len(r["boxes"]) >= tiny_model.config.min_boxes for r in got)
    for im, kept in zip(read_only, before):  # the caller's pixels are left alone
        assert not im.flags.writeable and np.array_equal(im, kept)
    # The grid baseline and classic detections take the same blocks.
    grid = GridFeatureExtractor(tiny_model, 7)
    _assert_same_records(grid.extract_regions(read_only), grid.extract_regions(images))
    for a, b in zip(tiny_model.detect(read_only, score_threshold=0.0),
                    tiny_model.detect(images, score_threshold=0.0)):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_paper_architecture_shapes():
    cfg = paper_config()
    assert cfg.feature_dim == 2048 and cfg.num_anchors == 12
    with torch.device("meta"):
        model = BottomUpDetector(cfg)
        x = torch.empty(1, 3, 600, 1000)
        res4, _ = model.backbone(x, None)
        pooled = torch.empty(3, 1024, 14, 14)
        res5, _ = model.roi_heads.res5(pooled, None)
    assert tuple(res4.shape) == (1, 1024, 38, 63)  # stride 16 with Caffe's ceil-mode pool
    assert tuple(res5.shape) == (3, 2048, 14, 14)  # stride 1, dilation 2: no downsampling
    conv2 = model.roi_heads.res5[0].conv2
    assert conv2.dilation == (2, 2) and model.roi_heads.res5[0].conv1.stride == (1, 1)
    assert model.backbone.res3[0].conv1.stride == (2, 2)  # stride in the 1x1 conv (MSRA)
    assert model.rpn.head.objectness_logits.out_channels == 24  # Caffe 2-way softmax
    assert model.roi_heads.predictor.bbox_pred.out_features == 6404
    assert model.roi_heads.attributes.fc.in_features == 2304
    assert not any(p.requires_grad for p in model.backbone.res2.parameters())
    assert model.name == "bua-caffe-r101" and len(model.config_hash) == 16


def test_half_precision_needs_cuda(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is CPU-only")
    with pytest.raises(ConfigError):
        BottomUpDetector(tiny_config()).prepare_inference("cpu", half=True)


def _draw_scene() -> tuple[np.ndarray, DetectionTarget]:
    image = np.full((64, 64, 3), 40, np.uint8)
    image[8:30, 6:34] = (220, 30, 30)  # class 1, attribute 1
    image[36:60, 30:58] = (30, 200, 40)  # class 2, attribute 2
    image[10:26, 44:60] = (40, 40, 230)  # class 3, no attribute
    target = DetectionTarget(
        boxes=torch.tensor([[6.0, 8.0, 33.0, 29.0], [30.0, 36.0, 57.0, 59.0],
                            [44.0, 10.0, 59.0, 25.0]]),
        labels=torch.tensor([1, 2, 3]),
        attributes=torch.tensor([[1, -1], [2, 3], [0, -1]]))
    return image, target


def test_training_losses_fall():
    torch.manual_seed(0)
    model = BottomUpDetector(tiny_config(num_classes=4, num_attributes=4,
                                         roi_batch_per_image=32)).train()
    image, target = _draw_scene()
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(20):
        losses = model([image], [target])
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_attr"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        optim.zero_grad()
        total.backward()
        optim.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first = sum(sum(h.values()) for h in history[:3]) / 3
    last = sum(sum(h.values()) for h in history[-3:]) / 3
    assert last < 0.7 * first
    for key in ("loss_rpn_cls", "loss_cls", "loss_attr"):
        assert np.mean([h[key] for h in history[-3:]]) < np.mean([h[key] for h in history[:3]])


def test_detect_returns_classic_detections(tiny_model):
    images = _images()[:2]
    cfg = tiny_model.config
    dets = tiny_model.detect(images, score_threshold=0.0, max_per_image=7)
    full = tiny_model.detect(images, score_threshold=0.0, max_per_image=1000)
    for det, all_dets, image in zip(dets, full, images):
        n = len(det["scores"])
        assert n == 7 < len(all_dets["scores"])
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == np.float32
        for key in ("scores", "labels", "attr_ids", "attr_conf"):
            assert det[key].shape == (n,)
        assert (np.diff(det["scores"]) <= 1e-6).all()  # sorted by score
        assert ((det["scores"] > 0) & (det["scores"] <= 1)).all()
        assert ((det["labels"] >= 1) & (det["labels"] < cfg.num_classes)).all()
        assert ((det["attr_ids"] >= 1) & (det["attr_ids"] < cfg.num_attributes)).all()
        assert ((det["attr_conf"] > 0) & (det["attr_conf"] <= 1)).all()
        b = all_dets["boxes"]  # regressed boxes clipped to the original image
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= image.shape[1]).all()
        assert (b[:, 3] <= image.shape[0]).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        # max_per_image keeps the best detections: the first n of the untruncated list.
        for key in det:
            np.testing.assert_array_equal(det[key], all_dets[key][:n], err_msg=key)
    # A score threshold drops the detections below it and changes nothing else (NMS only
    # ever suppresses a box for a better-scoring one, which the threshold keeps).
    threshold = float(np.median(full[0]["scores"]))
    if threshold >= 1.0:
        threshold = float(np.unique(full[0]["scores"])[-2])
    above = tiny_model.detect(images, score_threshold=threshold, max_per_image=1000)[0]
    kept = full[0]["scores"] > threshold
    assert 0 < kept.sum() < len(kept)
    for key in above:
        np.testing.assert_array_equal(above[key], full[0][key][kept], err_msg=key)


@pytest.mark.parametrize("grid", [1, 7, 10, 14])
def test_grid_baseline_shapes(tiny_model, grid):
    extractor = GridFeatureExtractor(tiny_model, grid)
    images = _images()[:2]
    out = extractor.extract_regions(images)
    for record, image in zip(out, images):
        assert set(record) == KEYS
        k = grid * grid
        assert record["features"].shape == (k, tiny_model.feature_dim)
        assert record["boxes"].shape == (k, 4) and record["boxes"].dtype == np.float32
        assert record["boxes"][-1].tolist() == pytest.approx(
            [image.shape[1] * (grid - 1) / grid, image.shape[0] * (grid - 1) / grid,
             image.shape[1], image.shape[0]])
        np.testing.assert_allclose(record["boxes"], grid_boxes(*image.shape[:2], grid))
        for key in ("object_ids", "attr_ids", "object_conf", "attr_conf"):
            assert record[key].shape == (k,) and not record[key].any(), key
        assert (record["image_h"], record["image_w"]) == image.shape[:2]
        assert np.isfinite(record["features"]).all()
        if grid > 1:  # the cells see different parts of the image
            assert np.ptp(record["features"], axis=0).max() > 1e-3
    alone = extractor.extract_regions(images[1:])[0]
    np.testing.assert_allclose(out[1]["features"], alone["features"], rtol=1e-4, atol=1e-5)


def test_grid_cells_are_the_res5_map_in_row_major_order(tiny_model):
    """When the grid matches res5's own size the resize is the identity: cell r * g + c is
    the res5 column at row r, column c, and its box is that tile of the image."""
    image = _images(5)[0][:64, :64]
    with torch.no_grad():
        batch = tiny_model.transform([image])
        res4, _ = tiny_model.backbone(batch.tensor, None)
        res5 = tiny_model.roi_heads.res5(res4, None)[0][0]
    g = res5.shape[-1]
    assert res5.shape[-2] == g > 1
    record = GridFeatureExtractor(tiny_model, g).extract_regions([image])[0]
    expected = res5.permute(1, 2, 0).reshape(g * g, -1).numpy()
    np.testing.assert_allclose(record["features"], expected, rtol=1e-5, atol=1e-5)
    step = 64 / g
    r, c = 0, 1  # the second cell is to the right of the first, not below it
    assert record["boxes"][r * g + c].tolist() == pytest.approx(
        [c * step, r * step, (c + 1) * step, (r + 1) * step])
    # A 1x1 grid is one weighted average of the map: between its smallest and largest cell.
    one = GridFeatureExtractor(tiny_model, 1).extract_regions([image])[0]["features"][0]
    assert (one >= expected.min(axis=0) - 1e-5).all() and (one <= expected.max(axis=0) + 1e-5).all()


def test_grid_boxes_tile_the_image():
    boxes = grid_boxes(30, 40, 3)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert boxes.shape == (9, 4) and area == pytest.approx(1200)
    assert boxes[0].tolist() == pytest.approx([0, 0, 40 / 3, 10])
    assert boxes[1].tolist() == pytest.approx([40 / 3, 0, 80 / 3, 10])  # row-major
    assert boxes[3].tolist() == pytest.approx([0, 10, 40 / 3, 20])
    assert boxes[-1].tolist() == pytest.approx([80 / 3, 20, 40, 30])
    # Neighbouring cells share edges: no gaps, no overlaps.
    grid = boxes.reshape(3, 3, 4)
    np.testing.assert_allclose(grid[:, 1:, 0], grid[:, :-1, 2])
    np.testing.assert_allclose(grid[1:, :, 1], grid[:-1, :, 3])
