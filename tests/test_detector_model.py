"""The detector's forward: shapes, dtypes, determinism, padding exactness, training, grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_updown.detector import (BottomUpDetector, DetectionTarget, GridFeatureExtractor,
                                 grid_boxes, paper_config, tiny_config)
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


def test_read_only_arrays_are_accepted(tiny_model):
    image = _images()[0]
    image.setflags(write=False)  # Ray Data hands out read-only blocks
    assert len(tiny_model.extract_regions([image])) == 1


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
    dets = tiny_model.detect(_images()[:2], score_threshold=0.0, max_per_image=7)
    for det in dets:
        n = len(det["scores"])
        assert 0 < n <= 7 and det["boxes"].shape == (n, 4)
        assert (np.diff(det["scores"]) <= 1e-6).all()  # sorted by score
        assert (det["labels"] >= 1).all()


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
        assert (record["object_ids"] == 0).all() and record["attr_conf"].shape == (k,)
    alone = extractor.extract_regions(images[1:])[0]
    np.testing.assert_allclose(out[1]["features"], alone["features"], rtol=1e-4, atol=1e-5)


def test_grid_boxes_tile_the_image():
    boxes = grid_boxes(30, 40, 3)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert boxes.shape == (9, 4) and area == pytest.approx(1200)
    assert boxes[0].tolist() == pytest.approx([0, 0, 40 / 3, 10])
