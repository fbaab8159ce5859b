"""Region selection (generate_tsv's rule) on hand-built boxes and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_updown.detector import per_class_nms_best_scores, select_regions
from ray_updown.detector.boxes import box_iou

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_best_scores(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    """generate_tsv written plainly: per class, greedy NMS with +1 areas, record the max."""
    def nms(dets_scores: np.ndarray) -> list[int]:
        x1, y1, x2, y2 = boxes.T
        areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        order = np.argsort(-dets_scores, kind="stable")
        keep = []
        while order.size:
            i = order[0]
            keep.append(i)
            xx1 = np.maximum(x1[i], x1[order[1:]])
            yy1 = np.maximum(y1[i], y1[order[1:]])
            xx2 = np.minimum(x2[i], x2[order[1:]])
            yy2 = np.minimum(y2[i], y2[order[1:]])
            inter = np.maximum(0, xx2 - xx1 + 1) * np.maximum(0, yy2 - yy1 + 1)
            ovr = inter / (areas[i] + areas[order[1:]] - inter)
            order = order[1:][ovr <= thr]
        return keep

    best = np.zeros(len(boxes))
    for c in range(scores.shape[1]):
        keep = np.array(nms(scores[:, c]))
        best[keep] = np.maximum(best[keep], scores[keep, c])
    return best


def test_per_class_nms_suppresses_within_a_class_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    # Class A prefers box 0 (so box 1 is suppressed in A); class B prefers box 1.
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.5], [0.3, 0.05]])
    best = per_class_nms_best_scores(boxes, scores, 0.3, plus_one=True)
    # Box 1 loses class A to box 0 but survives in class B with 0.5.
    torch.testing.assert_close(best, torch.tensor([0.9, 0.5, 0.3]))


def test_matches_plain_generate_tsv_on_random_scores():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 80, (60, 2))
    wh = rng.uniform(5, 40, (60, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.dirichlet(np.ones(9), 60).astype(np.float32)[:, 1:]
    got = per_class_nms_best_scores(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3, True)
    np.testing.assert_allclose(got.numpy(), _reference_best_scores(boxes, scores, 0.3), atol=1e-7)


def test_threshold_keeps_original_order_between_bounds():
    boxes = torch.tensor([[i * 20.0, 0, i * 20.0 + 10, 10] for i in range(6)])  # disjoint
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.1, 0.9], [0.5, 0.5], [0.85, 0.15],
                          [0.0, 1.0]])  # column 0 = background
    keep, best = select_regions(boxes, probs, conf_threshold=0.2, min_boxes=1, max_boxes=10)
    assert keep.tolist() == [1, 2, 3, 5]  # >= 0.2, in proposal order
    torch.testing.assert_close(best, probs[:, 1])


def test_min_and_max_clamp_by_rank():
    boxes = torch.tensor([[i * 20.0, 0, i * 20.0 + 10, 10] for i in range(6)])
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.99, 0.01], [0.5, 0.5], [0.85, 0.15],
                          [0.7, 0.3]])
    keep, _ = select_regions(boxes, probs, conf_threshold=0.2, min_boxes=4, max_boxes=10)
    assert keep.tolist() == [3, 5, 4, 1]  # too few above 0.2: the top 4 by score
    keep, _ = select_regions(boxes, probs, conf_threshold=0.0, min_boxes=1, max_boxes=2)
    assert keep.tolist() == [3, 5]  # too many: the top 2
    keep, _ = select_regions(boxes, probs, conf_threshold=0.2, min_boxes=36, max_boxes=36)
    assert len(keep) == 6  # fewer proposals than the fixed count: all of them


def test_nms_threshold_and_background_ignored():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 12]], dtype=torch.float32)
    iou = float(box_iou(boxes[:1], boxes[1:], plus_one=True))
    probs = torch.tensor([[0.0, 0.6, 0.4], [0.99, 0.01, 0.0]])
    # Above the IoU: box 1 is suppressed in class 1 and has 0 in class 2 -> 0.
    keep, best = select_regions(boxes, probs, nms_threshold=iou - 0.01, conf_threshold=0.2,
                                min_boxes=1, max_boxes=5)
    assert keep.tolist() == [0] and float(best[1]) == 0.0  # background's 0.99 never counts
    # Below: both survive class 1.
    _, best = select_regions(boxes, probs, nms_threshold=iou + 0.01, min_boxes=1, max_boxes=5)
    torch.testing.assert_close(best, torch.tensor([0.6, 0.01]))


def test_empty_input():
    keep, best = select_regions(torch.zeros((0, 4)), torch.zeros((0, 5)), min_boxes=10)
    assert keep.numel() == 0 and best.numel() == 0
