"""Each port's final region selection (select_ports.py), pinned with small hand-made cases and
checked against the ports' own steps written with torchvision's NMS, which they call.

Rules: Caffe / MILVLG generate_tsv; py-bottom-up-attention's demo (per-class top 36, NMS
thresholds stepped); the Hugging Face FRCNN's do_nms (best class, class-agnostic NMS).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_detector_checkpoint import _write_published, small_published
from torchvision.ops import batched_nms, nms

from ray_updown.detector import BottomUpDetector, load_published, tiny_config
from ray_updown.detector.boxes import BoxCoder, clip_boxes
from ray_updown.detector.config import CONVENTIONS, DetectorConfig
from ray_updown.detector.converters import LAYOUTS, infer_config
from ray_updown.detector.select_ports import choose_regions, threshold_stepped_nms, top_k_regions
from ray_updown.detector.transform import ImageBatch
from ray_updown.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PER_CLASS = dict(region_selection="per_class_top_k", select_conf=0.2, select_nms_steps=(0.5,),
                 min_boxes=1, max_boxes=10)
BEST_CLASS = dict(region_selection="best_class_top_k", select_nms_steps=(0.5,), min_boxes=1,
                  max_boxes=10)


def _config(num_classes: int = 4, **rule) -> DetectorConfig:
    # 3 object classes; 64-px images stay 64 px (scale 1) unless a test says otherwise.
    return tiny_config(num_classes=num_classes, num_attributes=3, min_size=64, max_size=107,
                       **rule)


def _batch(original=(64, 64), scale=1.0, resized=(64, 64)) -> ImageBatch:
    return ImageBatch(torch.zeros(1, 3, *resized), [resized], [original], [scale])


def _probs(*rows: list[float]) -> torch.Tensor:
    """Class probabilities of each proposal, background first (rows padded with background)."""
    probs = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([1 - probs.sum(dim=1, keepdim=True), probs], dim=1)


def _select(config, proposals, probs, deltas=None, batch=None):
    proposals = torch.tensor(proposals, dtype=torch.float32)
    if deltas is None:
        deltas = torch.zeros(len(proposals), 4 * config.num_classes)
    coder = BoxCoder(config.box_weights, config.box_plus_one)
    return choose_regions(config, batch or _batch(), [proposals], probs, lambda: deltas, coder)


def _rows(chosen):
    k = int(chosen.num_kept[0])
    return (chosen.proposal_index[0, :k].tolist(), chosen.object_ids[0, :k].tolist(),
            chosen.boxes[0, :k].tolist())


# -- the rules, by hand -------------------------------------------------------------------------

OVERLAPPING = [[0, 0, 20, 20], [2, 2, 22, 22]]  # IoU 0.68


def test_overlapping_boxes_of_two_classes_are_kept_per_class_and_merged_across_classes():
    probs = _probs([0.7, 0.0, 0.0], [0.0, 0.6, 0.0])
    index, ids, _ = _rows(_select(_config(**PER_CLASS), OVERLAPPING, probs))
    assert (index, ids) == ([0, 1], [1, 2])
    index, ids, _ = _rows(_select(_config(**BEST_CLASS), OVERLAPPING, probs))
    assert (index, ids) == ([0], [1])


def test_a_detection_at_the_score_threshold_is_dropped_per_class_and_kept_by_best_class():
    boxes = [[0, 0, 20, 20], [40, 40, 60, 60]]
    probs = _probs([0.2, 0.0, 0.0], [0.0, 0.0, 0.3])  # the port keeps scores > 0.2
    assert _rows(_select(_config(**PER_CLASS), boxes, probs))[0] == [1]
    assert _rows(_select(_config(**BEST_CLASS), boxes, probs))[0] == [1, 0]  # best first


def test_one_proposal_gives_a_region_per_class_above_the_threshold():
    probs = _probs([0.3, 0.25, 0.1])
    index, ids, boxes = _rows(_select(_config(**PER_CLASS), [[5, 5, 30, 30]], probs))
    assert (index, ids) == ([0, 0], [1, 2])
    assert boxes == [[5, 5, 30, 30]] * 2


def test_nms_thresholds_are_stepped_until_the_count_is_reached():
    # Three same-class boxes overlapping each other at IoU ~0.55-0.7.
    boxes = [[0, 0, 20, 20], [3, 0, 23, 20], [6, 0, 26, 20]]
    probs = _probs([0.9, 0, 0], [0.8, 0, 0], [0.7, 0, 0])
    for rule in (PER_CLASS, BEST_CLASS):
        stepped = dict(rule, select_nms_steps=(0.5, 0.6, 0.7, 0.8), min_boxes=3, max_boxes=3)
        assert _rows(_select(_config(**stepped), boxes, probs))[0] == [0, 1, 2]  # at 0.8
        # At 0.6 two survive: enough for min_boxes = 2, so the stepping stops there.
        stepped.update(min_boxes=2)
        assert _rows(_select(_config(**stepped), boxes, probs))[0] == [0, 2]
        # No threshold reaches the count: the last one's result stays.
        stepped.update(select_nms_steps=(0.5, 0.6), min_boxes=3)
        assert _rows(_select(_config(**stepped), boxes, probs))[0] == [0, 2]


def test_the_count_is_capped_best_first():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    probs = _probs([0.5, 0, 0], [0.9, 0, 0], [0.7, 0, 0])
    for rule in (PER_CLASS, BEST_CLASS):
        assert _rows(_select(_config(**dict(rule, max_boxes=2)), boxes, probs))[0] == [1, 2]


def test_top_k_rules_return_regressed_class_boxes_and_generate_tsv_the_proposals():
    deltas = torch.zeros(1, 16)
    deltas[0, 4 * 2: 4 * 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # class 2 moves right 10%
    probs = _probs([0.1, 0.6, 0.1])
    expected = [[12.0, 10.0, 32.0, 30.0]]  # a 20-px box, dx 1 / weight 10
    for rule in (PER_CLASS, BEST_CLASS):
        _, ids, boxes = _rows(_select(_config(**rule), [[10, 10, 30, 30]], probs, deltas))
        assert ids == [2] and boxes[0] == pytest.approx(expected[0])
    _, ids, boxes = _rows(_select(_config(), [[10, 10, 30, 30]], probs, deltas))
    assert ids == [2] and boxes == [[10, 10, 30, 30]]


def test_boxes_go_back_to_original_pixels_per_axis():
    # 30 x 47 at min_size 64: scale 64/30, width round(100.27) = 100, so x scales by 47/100
    # (the ports' per-axis factor), not by 1/scale = 0.46875.
    config = _config(**BEST_CLASS)
    batch = _batch(original=(30, 47), scale=64 / 30, resized=(64, 100))
    _, _, boxes = _rows(_select(config, [[0, 0, 100, 64]], _probs([0.5, 0, 0]), batch=batch))
    assert boxes == [[0.0, 0.0, pytest.approx(47.0), pytest.approx(30.0)]]
    _, _, boxes = _rows(_select(_config(), [[0, 0, 100, 64]], _probs([0.5, 0, 0]), batch=batch))
    assert boxes[0][2] == pytest.approx(100 * 30 / 64)  # generate_tsv: proposals / scale


def test_an_empty_box_is_dropped_by_py_bottom_up_attention_only():
    # Class 1 pushes the box off the right edge: clipped, it has no width left.
    deltas = torch.zeros(2, 16)
    deltas[0, 4:8] = torch.tensor([30.0, 0.0, 0.0, 0.0])
    boxes = [[50, 10, 60, 20], [10, 10, 20, 20]]
    probs = _probs([0.6, 0, 0], [0.5, 0, 0])
    index, _, kept = _rows(_select(_config(**PER_CLASS), boxes, probs, deltas))
    assert index == [1] and kept == [[10, 10, 20, 20]]
    index, _, kept = _rows(_select(_config(**BEST_CLASS), boxes, probs, deltas))
    assert index == [0, 1] and kept[0] == [64, 10, 64, 20]


# -- against the ports' steps with torchvision -------------------------------------------------


def _port_per_class(probs, boxes, steps, threshold, top):
    """py-bottom-up-attention's demo loop around fast_rcnn_inference_single_image."""
    scores, boxes = probs[:, 1:], boxes[:, 1:]
    mask = scores > threshold
    pairs = mask.nonzero()
    for t in steps:
        keep = batched_nms(boxes[mask], scores[mask], pairs[:, 1], t)[:top]
        if len(keep) == top:
            break
    return pairs[keep, 0], pairs[keep, 1] + 1


def _port_best_class(probs, boxes, steps, least, most):
    """The Hugging Face FRCNN's do_nms over its thresholds."""
    scores, classes = probs[:, 1:].max(dim=1)
    best = boxes[torch.arange(len(boxes)), classes + 1]
    for t in steps:
        keep = nms(best, scores, t)[:most]
        if len(keep) >= least:
            break
    return keep, classes[keep] + 1


@pytest.mark.parametrize("seed", range(4))
def test_top_k_rules_equal_the_ports_steps_with_torchvision(seed):
    gen = torch.Generator().manual_seed(seed)
    steps = (0.3, 0.4, 0.5)
    for count in (0, 1, 7, 40):
        xy = torch.rand(count, 2, generator=gen) * 50
        proposals = torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=gen) * 30], dim=1)
        logits = torch.randn(count, 6, generator=gen) * 2
        probs = logits.softmax(dim=1)
        deltas = torch.randn(count, 24, generator=gen) * 0.5
        config = _config(num_classes=6, region_selection="per_class_top_k", select_conf=0.15,
                         select_nms_steps=steps, min_boxes=8, max_boxes=8)
        coder = BoxCoder(config.box_weights, False)
        regressed = clip_boxes(coder.decode(deltas, proposals).reshape(-1, 4), 64, 64, False)
        regressed = regressed.reshape(count, 6, 4)
        for rule in ("per_class_top_k", "best_class_top_k"):
            config.region_selection = rule
            chosen = top_k_regions(config, _batch(), [proposals], probs, deltas, coder)
            if rule == "per_class_top_k":
                index, ids = _port_per_class(probs, regressed, steps, 0.15, 8)
            else:
                index, ids = _port_best_class(probs, regressed, steps, 8, 8)
            k = int(chosen.num_kept[0])
            assert chosen.proposal_index[0, :k].tolist() == index.tolist()
            assert chosen.object_ids[0, :k].tolist() == ids.tolist()
            assert torch.equal(chosen.boxes[0, :k], regressed[index, ids])
            assert torch.equal(chosen.object_conf[0, :k], probs[index, ids])


def test_a_batch_selects_as_its_images_one_at_a_time():
    gen = torch.Generator().manual_seed(3)
    counts = [12, 0, 30]
    proposals = []
    for count in counts:
        xy = torch.rand(count, 2, generator=gen) * 50
        proposals.append(torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=gen) * 30], 1))
    probs = (torch.randn(sum(counts), 4, generator=gen) * 2).softmax(dim=1)
    deltas = torch.randn(sum(counts), 16, generator=gen) * 0.5
    batch = ImageBatch(torch.zeros(3, 3, 64, 64), [(64, 64)] * 3, [(64, 64)] * 3, [1.0] * 3)
    for rule in (PER_CLASS, BEST_CLASS):
        config = _config(**dict(rule, select_nms_steps=(0.3, 0.6), min_boxes=5, max_boxes=6))
        coder = BoxCoder(config.box_weights, False)
        together = top_k_regions(config, batch, proposals, probs, deltas, coder)
        start = 0
        for i, count in enumerate(counts):
            alone = top_k_regions(config, _batch(), [proposals[i]], probs[start:start + count],
                                  deltas[start:start + count], coder)
            k = int(alone.num_kept[0])
            assert int(together.num_kept[i]) == k
            assert torch.equal(together.proposal_index[i, :k], alone.proposal_index[0, :k])
            assert torch.equal(together.boxes[i, :k], alone.boxes[0, :k])
            start += count


def test_stepped_nms_of_nothing():
    index, kept = threshold_stepped_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0),
                                        torch.zeros(2, 0, dtype=torch.bool), None, (0.5,), 1, 36)
    assert index.shape == (2, 0) and kept.tolist() == [0, 0]


# -- configuration and converted layouts ---------------------------------------------------------


def test_top_k_rules_need_thresholds_and_per_class_a_positive_score_threshold():
    with pytest.raises(ConfigError) as err:
        DetectorConfig.from_dict({"region_selection": "best_class_top_k"})
    assert err.value.record == "select_nms_steps"
    with pytest.raises(ConfigError) as err:
        DetectorConfig.from_dict({"region_selection": "per_class_top_k", "select_conf": 0.0,
                                  "select_nms_steps": [0.5]})
    assert err.value.record == "select_conf"
    with pytest.raises(ConfigError) as err:
        DetectorConfig.from_dict({"region_selection": "top_36"})
    assert err.value.record == "region_selection"
    back = DetectorConfig.from_dict({"region_selection": "best_class_top_k",
                                     "select_nms_steps": [0.5, 1]})
    assert back.select_nms_steps == (0.5, 1.0)


SELECTION = ("region_selection", "select_nms_steps", "min_boxes", "max_boxes", "select_conf")


@pytest.mark.parametrize("layout, rule, count", [
    ("py-bottom-up-attention", "per_class_top_k", 36), ("hf-frcnn", "best_class_top_k", 36),
    ("milvlg", "generate_tsv", 100)])
def test_a_converted_layout_selects_as_its_port_and_caffe_conventions_as_generate_tsv(
        tmp_path, layout, rule, count):
    path = _write_published(tmp_path, layout, small_published(layout))
    default = load_published(path).config
    assert (default.region_selection, default.max_boxes) == (rule, count)
    caffe = load_published(path, conventions="caffe").config
    assert {k: getattr(caffe, k) for k in SELECTION} == {k: CONVENTIONS["caffe"][k] for k in SELECTION}


def test_milvlg_k36_file_keeps_generate_tsv_with_36_regions(tmp_path):
    path = _write_published(tmp_path, "milvlg", small_published("milvlg"))
    k36 = tmp_path / "bua-caffe-frcn-r101-k36.pth"
    k36.write_bytes(open(path, "rb").read())
    config = load_published(str(k36)).config
    assert (config.region_selection, config.min_boxes, config.max_boxes) == ("generate_tsv", 36, 36)


@pytest.mark.parametrize("rule", [PER_CLASS, BEST_CLASS])
def test_extraction_follows_the_rule_end_to_end(rule):
    torch.manual_seed(0)
    model = BottomUpDetector(tiny_config(**dict(rule, select_nms_steps=(0.3, 0.5, 0.7),
                                                min_boxes=4, max_boxes=6))).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
              rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    outputs = model.extract_regions(images)
    for image, out in zip(images, outputs):
        region = model.predict([image])[0].regions
        batch = model.transform([image])
        chosen = top_k_regions(model.config, batch, [region.boxes],
                               region.class_logits.float().softmax(dim=1), region.box_deltas,
                               model.roi_heads.coder)
        k = int(chosen.num_kept[0])
        assert 0 < k <= 6 and len(out["boxes"]) == k
        np.testing.assert_allclose(out["boxes"], chosen.boxes[0, :k].numpy(), rtol=1e-6, atol=1e-4)
        assert out["object_ids"].tolist() == chosen.object_ids[0, :k].tolist()
        np.testing.assert_allclose(out["object_conf"], chosen.object_conf[0, :k].numpy(), rtol=1e-5)
        index = chosen.proposal_index[0, :k]
        np.testing.assert_allclose(out["features"], region.features[index].numpy(), rtol=1e-4,
                                   atol=1e-5)
        assert list(out["object_conf"]) == sorted(out["object_conf"], reverse=True)


def test_every_layout_is_known_to_the_selection_table():
    assert set(LAYOUTS) == {"py-bottom-up-attention", "milvlg", "hf-frcnn"}
    from test_detector_checkpoint import published_spec

    for layout in LAYOUTS:
        published = {k: torch.empty(s, device="meta") for k, s in published_spec(layout).items()}
        assert infer_config(published, layout).region_selection in (
            "generate_tsv", "per_class_top_k", "best_class_top_k")
