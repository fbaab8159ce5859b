"""The batched, sync-free inference steps equal the per-image rules they replaced.

The oracles are the former implementations, kept in tests/detector_reference.py.
"""

from __future__ import annotations

import detector_reference as ref
import numpy as np
import pytest
import torch

from ray_updown.detector import BottomUpDetector, paper_config, tiny_config, world_config
from ray_updown.detector.backbone import fold_frozen_batchnorm
from ray_updown.detector.select import per_class_nms_best_scores, select_regions_batched

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_image_case(rng: np.random.Generator, r: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes with duplicates, zero-size and out-of-image boxes; scores with ties."""
    xy = rng.uniform(-20, 80, (r, 2))
    wh = rng.uniform(0, 40, (r, 2))
    wh[rng.random(r) < 0.1] = 0.0  # degenerate
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    if rng.random() < 0.5:
        boxes = np.round(boxes)  # integer boxes: exact IoU ties
    if r > 3:
        boxes[1] = boxes[0]  # a duplicate
    probs = rng.dirichlet(np.ones(k + 1) * rng.choice([0.2, 1.0]), r).astype(np.float32)
    if rng.random() < 0.4:
        probs = np.round(probs, 1)  # tied scores
    return torch.from_numpy(boxes), torch.from_numpy(probs)


def _padded_batch(rng, counts: list[int], k: int):
    r = max(counts) if counts else 0
    boxes = torch.full((len(counts), r, 4), 7.0)  # padding that would overlap real boxes
    probs = torch.full((len(counts), r, k + 1), 0.9)
    for i, count in enumerate(counts):
        boxes[i, :count], probs[i, :count] = _random_image_case(rng, count, k)
    return boxes, probs


@pytest.mark.parametrize("seed", range(6))
def test_batched_selection_equals_per_image_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        k = int(rng.choice([1, 2, 5, 9]))  # one class included
        counts = [int(rng.integers(0, 45)) for _ in range(int(rng.integers(1, 5)))]
        counts[0] = int(rng.choice([0, counts[0]]))  # images with zero proposals
        boxes, probs = _padded_batch(rng, counts, k)
        min_boxes = int(rng.integers(0, 15))  # often more than an image's proposals
        max_boxes = int(rng.integers(max(min_boxes, 1), 30))
        conf = float(rng.choice([0.0, 0.2, 0.5]))
        plus_one = bool(rng.random() < 0.5)
        chosen = select_regions_batched(boxes, probs, torch.tensor(counts), nms_threshold=0.3,
                                        conf_threshold=conf, min_boxes=min_boxes,
                                        max_boxes=max_boxes, plus_one=plus_one)
        for i, count in enumerate(counts):
            keep, best = ref.select_regions(boxes[i, :count], probs[i, :count], nms_threshold=0.3,
                                            conf_threshold=conf, min_boxes=min_boxes,
                                            max_boxes=max_boxes, plus_one=plus_one)
            assert chosen.index[i, : int(chosen.num_kept[i])].tolist() == keep.tolist()
            assert torch.equal(chosen.best[i, :count], best)
            assert not chosen.best[i, count:].any()  # padding scores nothing


def test_selection_of_a_batch_without_proposals():
    chosen = select_regions_batched(torch.zeros((3, 0, 4)), torch.zeros((3, 0, 5)),
                                    torch.zeros(3, dtype=torch.long), min_boxes=10)
    assert chosen.index.shape == (3, 0) and chosen.num_kept.tolist() == [0, 0, 0]


def test_selection_at_paper_size_equals_reference():
    rng = np.random.default_rng(7)
    boxes, probs = _padded_batch(rng, [300, 211], 1600)
    chosen = select_regions_batched(boxes, probs, torch.tensor([300, 211]))
    for i, count in enumerate([300, 211]):
        keep, best = ref.select_regions(boxes[i, :count], probs[i, :count])
        assert chosen.index[i, : int(chosen.num_kept[i])].tolist() == keep.tolist()
        assert torch.equal(chosen.best[i, :count], best)


def _rpn_inputs(model: BottomUpDetector, rng: np.random.Generator, sizes: list[tuple[int, int]]):
    batch = model.transform([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes])
    stride = model.config.feature_stride
    feature_sizes = torch.tensor([[-(-h // stride), -(-w // stride)] for h, w in batch.image_sizes])
    height, width = (int(v) for v in feature_sizes.max(dim=0).values)
    features = torch.randn(len(sizes), model.rpn.head.conv.in_channels, height, width)
    return batch, features, feature_sizes


def spread_rpn_model(config) -> BottomUpDetector:
    """A detector whose RPN weights spread scores and deltas: boxes clip, shrink, overlap."""
    torch.manual_seed(0)
    model = BottomUpDetector(config).eval()
    with torch.no_grad():
        for p in model.rpn.head.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("config", [
    paper_config(min_size=96, max_size=160),  # Caffe: 2-way softmax, +1 boxes, size filter
    world_config(num_classes=5, num_attributes=3, min_size=96, max_size=160),  # detectron2 style
], ids=["caffe", "detectron2"])
def test_batched_proposals_equal_per_image_reference(config):
    assert_batched_proposals_equal(spread_rpn_model(config), ref.propose_one_image,
                                   ([(120, 90), (60, 200), (300, 40)], [(80, 80)],
                                    [(40, 1000), (64, 64)]))


def assert_batched_proposals_equal(model: BottomUpDetector, propose_one_image, size_sets) -> None:
    """The RPN's batched proposals for each batch of image sizes equal `propose_one_image`
    (rpn, anchors, deltas, scores, image size, scale, pre_nms, post_nms) image by image."""
    rng = np.random.default_rng(0)
    rpn, config = model.rpn, model.config
    for sizes in size_sets:
        batch, features, feature_sizes = _rpn_inputs(model, rng, sizes)
        with torch.no_grad():
            proposals, scores, _ = rpn(features, feature_sizes, batch)
            objectness, _, deltas = rpn._flatten(*rpn.head(features))
        anchors = rpn.grid_anchors(*features.shape[-2:])
        valid = rpn._valid_anchors(len(sizes), *features.shape[-2:], feature_sizes)
        for i in range(len(sizes)):
            boxes, kept = propose_one_image(
                rpn, anchors[valid[i]], deltas[i][valid[i]].float(), objectness[i][valid[i]].float(),
                batch.image_sizes[i], batch.scales[i], config.rpn_pre_nms_test,
                config.rpn_post_nms_test)
            assert len(boxes) > 0
            assert torch.equal(proposals[i], boxes) and torch.equal(scores[i], kept)


def _separated(model: BottomUpDetector) -> BottomUpDetector:
    with torch.no_grad():
        for p in model.roi_heads.predictor.parameters():
            p.normal_(0, 0.5)
        model.rpn.head.objectness_logits.weight.normal_(0, 0.3)
    return model


def _images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 80), (48, 70), (90, 60))]


def test_extract_regions_equals_the_per_image_composition():
    """The batched forward (one selection, one host copy) returns exactly what the former
    per-image loop over `predict` + `select_regions` returned."""
    torch.manual_seed(0)
    model = _separated(BottomUpDetector(tiny_config(num_classes=6, num_attributes=5)))
    model.prepare_inference("cpu", fold_norms=False)
    cfg = model.config
    images = _images(3)
    got = model.extract_regions(images)
    for pred, record in zip(model.predict(images), got):
        r = pred.regions
        boxes = r.boxes.float() / pred.scale
        probs = r.class_logits.float().softmax(dim=1)
        keep, _ = ref.select_regions(boxes, probs, nms_threshold=cfg.select_nms,
                                     conf_threshold=cfg.select_conf, min_boxes=cfg.min_boxes,
                                     max_boxes=cfg.max_boxes, plus_one=cfg.box_plus_one)
        conf, ids = probs[keep, 1:].max(dim=1)
        attr_conf, attr_ids = r.attr_logits.float().softmax(dim=1)[keep][:, 1:].max(dim=1)
        np.testing.assert_array_equal(record["boxes"], boxes[keep].numpy())
        np.testing.assert_array_equal(record["features"], r.features[keep].numpy())
        np.testing.assert_array_equal(record["object_ids"], (ids + 1).numpy())
        np.testing.assert_array_equal(record["object_conf"], conf.numpy())
        np.testing.assert_array_equal(record["attr_ids"], (attr_ids + 1).numpy())
        np.testing.assert_array_equal(record["attr_conf"], attr_conf.numpy())
        assert (record["image_h"], record["image_w"]) == pred.image_size


def test_folded_batchnorm_keeps_the_features():
    torch.manual_seed(0)
    cfg = tiny_config(num_classes=6, num_attributes=5, norm="frozen_bn")
    plain = _separated(BottomUpDetector(cfg)).eval()
    with torch.no_grad():  # non-trivial frozen statistics, as a trained model has
        for m in plain.modules():
            if isinstance(m, torch.nn.Module) and hasattr(m, "running_var"):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.2)
                m.weight.uniform_(0.5, 1.5)
    folded = BottomUpDetector(cfg)
    folded.load_state_dict(plain.state_dict())
    folded.prepare_inference("cpu")
    assert not any(hasattr(m, "running_var") for m in folded.modules())
    images = _images(4)
    batch = plain.transform(images)
    with torch.no_grad():
        a, _ = plain.backbone(batch.tensor, batch.sizes_tensor)
        b, _ = folded.backbone(batch.tensor, batch.sizes_tensor)
        boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0], [10.0, 10.0, 30.0, 60.0]])] * len(images)
        fa = plain.roi_heads.region_features(a, boxes)
        fb = folded.roi_heads.region_features(b, boxes)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(fa, fb, dim=1)
    assert float(cosine.min()) > 0.99999
    assert fold_frozen_batchnorm(folded) == 0  # nothing left to fold


def test_prepare_inference_refuses_an_unknown_scan():
    from ray_updown.errors import ConfigError

    with pytest.raises(ConfigError, match="greedy_scan"):
        BottomUpDetector(tiny_config()).prepare_inference("cpu", greedy_scan="cuda-graph")


def test_best_scores_of_one_image_keep_their_shape():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11]], dtype=torch.float32)
    best = per_class_nms_best_scores(boxes, torch.tensor([[0.9], [0.8]]), 0.3, True)
    assert best.tolist() == pytest.approx([0.9, 0.0])


def test_given_boxes_get_the_features_a_normal_forward_gives_them():
    """Features for given boxes equal those of the same boxes inside a normal forward."""
    torch.manual_seed(0)
    model = _separated(BottomUpDetector(tiny_config(num_classes=6, num_attributes=5)))
    model.prepare_inference("cpu")
    images = _images(5)
    normal = model.extract_regions(images)
    given = model.extract_given_boxes(images, [r["boxes"] for r in normal])
    for a, b in zip(normal, given):
        np.testing.assert_array_equal(b["boxes"], a["boxes"])  # returned as given, in order
        np.testing.assert_allclose(b["features"], a["features"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(b["object_ids"], a["object_ids"])
        np.testing.assert_array_equal(b["attr_ids"], a["attr_ids"])
        np.testing.assert_allclose(b["object_conf"], a["object_conf"], rtol=1e-5)
    # A box list of any length, an image without boxes, and order kept.
    boxes = [np.array([[0, 0, 10, 10], [5, 5, 60, 40], [0, 0, 10, 10]], np.float32),
             np.zeros((0, 4), np.float32), np.array([[1, 2, 30, 50]], np.float32)]
    out = model.extract_given_boxes(images, boxes)
    assert [len(r["boxes"]) for r in out] == [3, 0, 1]
    np.testing.assert_array_equal(out[0]["features"][0], out[0]["features"][2])
    assert out[1]["features"].shape == (0, model.feature_dim)
