"""Each published port's inference conventions, pinned with small hand-made cases.

The rules are read from the ports' sources (config.py's module docstring names the functions):
Caffe / MILVLG / detectron2 proposal size filters, resize rounding, attribute confidence; and
a converted layout gets its own port's rules by default.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_detector_batched import assert_batched_proposals_equal, spread_rpn_model
from test_detector_checkpoint import _write_published, published_spec, small_published

from ray_updown.detector import BottomUpDetector, load_published, paper_config, tiny_config, world_config
from ray_updown.detector.boxes import box_sizes, clip_boxes
from ray_updown.detector.config import CONVENTIONS, DetectorConfig, conventions
from ray_updown.detector.converters import LAYOUTS, infer_config
from ray_updown.detector.roi_heads import inference_attribute_logits
from ray_updown.detector.rpn import RegionProposalNetwork, plus_one_nms, size_filter_keep
from ray_updown.detector.transform import ImageBatch, ImageTransform, resized_size
from ray_updown.errors import ConfigError

# -- configuration ---------------------------------------------------------------------------


def test_the_paper_config_keeps_caffe_conventions():
    config = paper_config()
    assert {k: getattr(config, k) for k in CONVENTIONS["caffe"]} == CONVENTIONS["caffe"]


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_conventions_round_trip_through_a_json_mapping(name):
    config = paper_config(**conventions(name))
    back = DetectorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config


def test_only_non_caffe_conventions_change_the_digest():
    assert paper_config(**conventions("caffe")).hash() == paper_config().hash()
    assert paper_config(**conventions("detectron2")).hash() != paper_config().hash()
    assert paper_config(rpn_size_filter="milvlg").hash() != paper_config().hash()


@pytest.mark.parametrize("key, value", [("rpn_size_filter", "hf"), ("resize_rule", "round"),
                                        ("attr_confidence", "400"), ("rpn_min_size", -1.0)])
def test_a_bad_convention_is_refused_naming_its_key(key, value):
    with pytest.raises(ConfigError) as err:
        DetectorConfig.from_dict({key: value})
    assert err.value.record == key


def test_an_unknown_conventions_name_is_refused():
    with pytest.raises(ConfigError) as err:
        conventions("hugging-face")
    assert err.value.record == "conventions"


# -- proposal size filter: the rule itself ----------------------------------------------------


def _boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_a_side_exactly_at_the_threshold_is_kept_by_caffe_and_dropped_by_milvlg():
    boxes = _boxes([0, 0, 15, 15], [0, 0, 14, 30])  # +1 sides: 16 x 16, 15 x 31
    threshold = torch.tensor(16.0)
    assert size_filter_keep(boxes, threshold, "caffe", plus_one=True).tolist() == [True, False]
    assert size_filter_keep(boxes, threshold, "milvlg", plus_one=True).tolist() == [False, False]
    just_above = _boxes([0, 0, 15.01, 15.01])
    assert size_filter_keep(just_above, threshold, "milvlg", plus_one=True).tolist() == [True]


def test_a_box_clipped_to_zero_height_survives_only_caffes_rule_at_threshold_zero():
    flat = _boxes([20, 100, 40, 100], [20, 10, 40, 60])  # the first clipped onto the bottom edge
    zero = torch.tensor(0.0)
    assert size_filter_keep(flat, zero, "caffe", plus_one=False).tolist() == [True, True]
    assert size_filter_keep(flat, zero, "detectron2", plus_one=False).tolist() == [False, True]


def test_milvlg_also_needs_a_positive_raw_extent():
    # Under +1 arithmetic a collapsed box still measures 1 px; MILVLG's filter_boxes drops it.
    collapsed = _boxes([5, 5, 5, 9])
    half = torch.tensor(0.5)
    assert size_filter_keep(collapsed, half, "caffe", plus_one=True).tolist() == [True]
    assert size_filter_keep(collapsed, half, "milvlg", plus_one=True).tolist() == [False]


# -- proposal size filter: where it sits relative to the top-k --------------------------------

# Anchors on a 100 x 100 image with zero deltas (no "+1" arithmetic: boxes decode to themselves).
_ANCHORS = _boxes([10, 10, 50, 50],    # big, kept by every rule
                  [60, 60, 62, 62],    # 2 px: under a 4-px threshold
                  [0, 0, 30, 30],      # overlaps the first below the NMS threshold
                  [20, 120, 40, 140])  # below the image: clips to zero height
_SCORES = torch.tensor([0.9, 0.8, 0.7, 0.95])  # the outside anchor ranks first


def _propose(rule: str, min_size: float, scores=_SCORES, pre_nms: int = 2, images: int = 1):
    config = tiny_config(rpn_size_filter=rule, rpn_min_size=min_size)
    rpn = RegionProposalNetwork(config, in_channels=8)
    batch = ImageBatch(torch.zeros(images, 3, 100, 100), [(100, 100)] * images,
                       [(100, 100)] * images, [1.0] * images)
    scores = scores.reshape(images, -1).float()
    deltas = torch.zeros(images, len(_ANCHORS), 4)
    valid = torch.ones_like(scores, dtype=torch.bool)
    return rpn.propose(_ANCHORS, deltas, scores, valid, batch, pre_nms, post_nms=10)


def test_filtering_before_the_top_k_frees_slots_that_filtering_after_does_not():
    caffe, _ = _propose("caffe", 4.0)
    detectron2, scores = _propose("detectron2", 4.0)
    # Caffe drops the clipped and the 2-px box first, so both good boxes fill the top 2.
    assert caffe[0].tolist() == [[10, 10, 50, 50], [0, 0, 30, 30]]
    # detectron2 takes the top 2 (outside box, big box), then drops the clipped one.
    assert detectron2[0].tolist() == [[10, 10, 50, 50]]
    assert scores[0].tolist() == pytest.approx([0.9])


def test_threshold_zero_with_caffes_comparison_is_not_detectron2s_rule():
    caffe_at_zero, _ = _propose("caffe", 0.0)
    detectron2, _ = _propose("detectron2", 0.0)
    # ">= 0" keeps the box clipped to zero height, and it takes a top-k slot.
    assert caffe_at_zero[0].tolist() == [[20, 100, 40, 100], [10, 10, 50, 50]]
    assert detectron2[0].tolist() == [[10, 10, 50, 50]]


def test_detectron2_rule_in_a_batch_equals_one_image_at_a_time():
    other = torch.tensor([0.1, 0.96, 0.97, 0.2])  # top 2: 2-px box and the third box
    together, together_scores = _propose("detectron2", 4.0, torch.stack([_SCORES, other]),
                                         images=2)
    for i, scores in enumerate((_SCORES, other)):
        alone, alone_scores = _propose("detectron2", 4.0, scores)
        assert torch.equal(together[i], alone[0])
        assert torch.equal(together_scores[i], alone_scores[0])
    assert together[1].tolist() == [[0, 0, 30, 30]]


def _port_proposals(rpn, anchors, deltas, scores, image_size, scale, pre_nms, post_nms):
    """One image, step by step in each port's order (detectron2 find_top_rpn_proposals,
    MILVLG find_top_bua_rpn_proposals)."""
    cfg = rpn.config
    boxes = rpn.coder.decode(deltas, anchors)
    if cfg.rpn_size_filter == "detectron2":  # top-k, clip, nonempty(MIN_SIZE)
        order = torch.sort(scores, descending=True, stable=True).indices[:pre_nms]
        boxes, scores = clip_boxes(boxes[order], *image_size, cfg.box_plus_one), scores[order]
        ws, hs = box_sizes(boxes, cfg.box_plus_one)
        keep = (ws > cfg.rpn_min_size) & (hs > cfg.rpn_min_size)
        boxes, scores = boxes[keep], scores[keep]
    else:  # clip, filter_boxes, nonempty(MIN_SIZE x scale), top-k
        boxes = clip_boxes(boxes, *image_size, cfg.box_plus_one)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        ws, hs = box_sizes(boxes, cfg.box_plus_one)
        threshold = np.float32(cfg.rpn_min_size * scale)
        keep &= (ws > threshold) & (hs > threshold)
        boxes, scores = boxes[keep], scores[keep]
        order = torch.sort(scores, descending=True, stable=True).indices[:pre_nms]
        boxes, scores = boxes[order], scores[order]
    kept = plus_one_nms(boxes, scores, cfg.rpn_nms, cfg.box_plus_one)[:post_nms]
    return boxes[kept], scores[kept]


@pytest.mark.parametrize("config", [
    world_config(5, 3, min_size=96, max_size=160, rpn_pre_nms_test=120, **conventions("detectron2")),
    world_config(5, 3, min_size=96, max_size=160, rpn_pre_nms_test=120, rpn_min_size=10.0,
                 rpn_size_filter="detectron2"),
    paper_config(min_size=96, max_size=160, **conventions("milvlg")),
], ids=["detectron2", "detectron2-min10", "milvlg"])
def test_batched_proposals_equal_the_ports_per_image_steps(config):
    assert_batched_proposals_equal(spread_rpn_model(config), _port_proposals,
                                   ([(120, 90), (60, 200), (300, 40)], [(40, 1000), (64, 64)]))


# -- resize ---------------------------------------------------------------------------------


def test_half_way_sides_round_half_to_even_in_caffe_and_up_in_detectron2():
    # 23 x 1.5 = 34.5: cv2 / Python round -> 34, int(34.5 + 0.5) -> 35.
    assert resized_size(20, 23, 30, 100, "caffe") == (1.5, 30, 34)
    assert resized_size(20, 23, 30, 100, "detectron2") == (1.5, 30, 35)
    for rule, width in (("caffe", 34), ("detectron2", 35)):
        transform = ImageTransform(tiny_config(min_size=30, max_size=100, resize_rule=rule))
        batch = transform([np.zeros((20, 23, 3), np.uint8)])
        assert batch.image_sizes == [(30, width)]


def test_the_long_side_cap_is_tested_rounded_by_caffe_and_unrounded_by_detectron2():
    # 1667 x 0.6 = 1000.2: rounds to 1000, no cap for Caffe; over 1000 for detectron2.
    assert resized_size(1000, 1667, 600, 1000, "caffe") == (0.6, 600, 1000)
    scale, h, w = resized_size(1000, 1667, 600, 1000, "detectron2")
    assert (h, w) == (600, 1000) and scale == pytest.approx(1000 / 1667) and scale != 0.6


# -- attribute confidence -------------------------------------------------------------------


def test_attribute_confidence_over_401_or_400_outputs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # index 0: "no attribute"
    e = [math.exp(v) for v in (2.0, 1.0, 0.0, -1.0)]
    expected = {"with_none": e[1] / sum(e), "without_none": e[1] / sum(e[1:])}
    for rule, conf in expected.items():
        scored = inference_attribute_logits(logits, tiny_config(attr_confidence=rule))
        best, index = scored.softmax(dim=1)[:, 1:].max(dim=1)
        assert int(index) + 1 == 1
        assert float(best) == pytest.approx(conf, rel=1e-6)
    p_none = e[0] / sum(e)
    assert expected["with_none"] == pytest.approx(expected["without_none"] * (1 - p_none))


def test_extraction_reports_the_ports_attribute_confidence():
    torch.manual_seed(0)
    with_none = BottomUpDetector(tiny_config()).eval()
    without_none = BottomUpDetector(tiny_config(attr_confidence="without_none")).eval()
    without_none.load_state_dict(with_none.state_dict())
    with torch.no_grad():
        with_none.roi_heads.attributes.score.bias[0] = 1.0  # a visible "no attribute" share
    without_none.load_state_dict(with_none.state_dict())
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    a, b = with_none.extract_regions([image])[0], without_none.extract_regions([image])[0]
    np.testing.assert_array_equal(a["attr_ids"], b["attr_ids"])
    np.testing.assert_array_equal(a["features"], b["features"])
    assert (b["attr_conf"] > a["attr_conf"]).all()
    logits = without_none.predict([image])[0].regions.attr_logits
    assert torch.isneginf(logits[:, 0]).all() and torch.isfinite(logits[:, 1:]).all()


# -- converted layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("layout, port", [("py-bottom-up-attention", "py-bottom-up-attention"),
                                          ("milvlg", "milvlg"), ("hf-frcnn", "detectron2")])
def test_a_converted_layout_gets_its_ports_conventions_by_default(layout, port):
    published = {k: torch.empty(s, device="meta") for k, s in published_spec(layout).items()}
    config = infer_config(published, layout)
    assert {k: getattr(config, k) for k in CONVENTIONS[port]} == CONVENTIONS[port]
    assert config.extra["conventions"] == port
    caffe = infer_config(published, layout, conventions="caffe")
    assert {k: getattr(caffe, k) for k in CONVENTIONS["caffe"]} == CONVENTIONS["caffe"]
    assert caffe.box_weights == config.box_weights  # the weights' own properties stay


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_published_with_caffe_conventions(tmp_path, layout):
    path = _write_published(tmp_path, layout, small_published(layout))
    assert load_published(path, conventions="caffe").config.rpn_size_filter == "caffe"
    default = load_published(path).config
    assert default.rpn_size_filter == ("milvlg" if layout == "milvlg" else "detectron2")
    assert default.resize_interpolation == ("pil" if layout == "py-bottom-up-attention"
                                            else "bilinear")


def test_pil_resize_is_pils_bilinear_on_8_bit_pixels():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, (90, 130, 3)), axis=1) + 128, 0, 255)
    for pixels in (image, smooth.astype(np.uint8)):
        for min_size in (40, 150):  # shrink (antialiased) and enlarge
            config = tiny_config(min_size=min_size, max_size=1000, input_format="RGB",
                                 pixel_mean=(0.0, 0.0, 0.0), **conventions("py-bottom-up-attention"))
            ours = ImageTransform(config)([pixels]).tensor[0].permute(1, 2, 0).numpy()
            h, w = ours.shape[:2]
            theirs = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR), np.float32)
            assert (ours == np.round(ours)).all()  # whole grey levels, as PIL's 8-bit output
            assert np.abs(ours - theirs).max() <= 1.0
            assert np.mean(ours != theirs) < 0.02
            plain = ImageTransform(tiny_config(min_size=min_size, max_size=1000, input_format="RGB",
                                               pixel_mean=(0.0, 0.0, 0.0)))([pixels])
            if min_size == 40:  # shrinking: antialiasing is a visible difference
                assert np.abs(plain.tensor[0].permute(1, 2, 0).numpy() - theirs).max() > 5
