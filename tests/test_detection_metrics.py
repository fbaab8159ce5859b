"""Object mAP@0.5 equals pycocotools' COCOeval AP@0.5; attribute accuracy on hand cases."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from ray_updown.errors import DataError
from ray_updown.metrics.detection import box_iou_coco, evaluate_detections


def coco_ap50(detections, ground_truths, max_dets=100) -> float:
    """COCOeval's AP@0.5 (stats[1]) of the same records (image i -> id i + 1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = sorted({int(c) for g in ground_truths for c in g["labels"]}
                     | {int(c) for d in detections for c in d["labels"]})
    images, anns, results = [], [], []
    for i, (d, g) in enumerate(zip(detections, ground_truths)):
        images.append({"id": i + 1, "width": 200, "height": 200})
        for box, label in zip(g["boxes"], g["labels"]):
            x1, y1, x2, y2 = map(float, box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"]):
            x1, y1, x2, y2 = map(float, box)
            results.append({"image_id": i + 1, "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": str(c)} for c in classes]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, min(10, max_dets), max_dets]  # COCOeval sorts them
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def _det(boxes, scores, labels, attrs=None):
    out = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
           "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int64)}
    if attrs is not None:
        out["attr_ids"] = np.asarray(attrs, np.int64)
    return out


def _gt(boxes, labels, attributes=None):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "attributes": attributes if attributes is not None else [() for _ in labels]}


def hand_case():
    """Three classes over three images: hits, a miss, duplicates, a wrong class, a loose box,
    a class with no ground truth and a ground truth no detection finds."""
    gts = [
        _gt([[10, 10, 50, 50], [60, 60, 100, 110], [120, 20, 160, 70]], [1, 2, 1]),
        _gt([[5, 5, 40, 45], [100, 100, 150, 140]], [3, 1]),
        _gt([[30, 30, 90, 80]], [2]),
    ]
    dets = [
        _det([[11, 9, 51, 50], [12, 12, 49, 52], [61, 58, 99, 112], [118, 22, 161, 69],
              [0, 0, 20, 20]], [0.9, 0.8, 0.7, 0.55, 0.3], [1, 1, 2, 1, 3]),
        _det([[5, 5, 40, 45], [100, 100, 150, 140], [102, 98, 150, 141], [10, 10, 30, 30]],
             [0.95, 0.6, 0.65, 0.4], [3, 1, 1, 4]),
        _det([[40, 40, 110, 90], [30, 30, 90, 80]], [0.85, 0.2], [2, 2]),
    ]
    return dets, gts


def test_map_equals_pycocotools_on_hand_case():
    dets, gts = hand_case()
    ours = evaluate_detections(dets, gts)
    assert ours.map == pytest.approx(coco_ap50(dets, gts), abs=1e-9)
    assert set(ours.ap_per_class) == {1, 2, 3}  # class 4 has no ground truth: no AP
    assert ours.ap_per_class[3] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 < ours.map < 1.0


def test_map_equals_pycocotools_on_random_cases():
    rng = np.random.default_rng(3)
    for trial in range(6):
        dets, gts = [], []
        for _ in range(int(rng.integers(2, 6))):
            m = int(rng.integers(0, 5))
            xy = rng.uniform(0, 150, size=(m, 2))
            wh = rng.uniform(8, 50, size=(m, 2))
            boxes = np.concatenate([xy, xy + wh], axis=1)
            labels = rng.integers(1, 4, size=m)
            gts.append(_gt(boxes, labels))
            # Jittered copies (some loose, some duplicated, some relabelled) plus clutter.
            keep = rng.random(m) < 0.8
            jitter = boxes[keep] + rng.normal(0, 4 + 4 * trial, size=(int(keep.sum()), 4))
            dup = jitter[: int(rng.integers(0, len(jitter) + 1))] + rng.normal(0, 2, size=(1, 4))
            clutter_xy = rng.uniform(0, 150, size=(int(rng.integers(0, 3)), 2))
            clutter = np.concatenate([clutter_xy, clutter_xy + 20], axis=1)
            all_boxes = np.concatenate([jitter, dup, clutter]).reshape(-1, 4)
            all_labels = np.concatenate([labels[keep], labels[keep][: len(dup)],
                                         rng.integers(1, 4, size=len(clutter))])
            flip = rng.random(len(all_labels)) < 0.1
            all_labels[flip] = rng.integers(1, 4, size=int(flip.sum()))
            dets.append(_det(all_boxes, rng.random(len(all_boxes)), all_labels))
        if not any(len(g["labels"]) for g in gts):
            continue
        assert evaluate_detections(dets, gts).map == pytest.approx(coco_ap50(dets, gts), abs=1e-9)


def test_max_dets_cut_matches_pycocotools():
    gts = [_gt([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 1])]
    dets = [_det([[60, 60, 70, 70], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]],
                 [0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1])]
    ours = evaluate_detections(dets, gts, max_dets=2)
    assert ours.map == pytest.approx(coco_ap50(dets, gts, max_dets=2), abs=1e-9)
    assert evaluate_detections(dets, gts).map > ours.map


def test_perfect_and_empty_detections():
    dets, gts = hand_case()
    perfect = [_det(g["boxes"], np.ones(len(g["labels"])), g["labels"]) for g in gts]
    assert evaluate_detections(perfect, gts).map == pytest.approx(1.0)
    assert evaluate_detections(perfect, gts).recall == pytest.approx(1.0)
    empty = [_det(np.zeros((0, 4)), [], []) for _ in gts]
    assert evaluate_detections(empty, gts).map == 0.0


def test_voc_interpolation_on_a_known_curve():
    # Ranked: TP, FP, TP with 2 ground truths -> VOC all-point AP = 0.5*1 + 0.5*(2/3).
    gts = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    dets = [_det([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1])]
    assert evaluate_detections(dets, gts, interpolation="voc").map == pytest.approx(0.5 + 1 / 3)


def test_attribute_accuracy_hand_case():
    gts = [_gt([[0, 0, 20, 20], [30, 30, 60, 60], [70, 0, 90, 20], [0, 70, 20, 90]],
               [1, 2, 1, 2], attributes=[(3, 5), (2,), (), (4,)])]
    dets = [_det([[0, 0, 20, 20],       # matched, predicts 5: among (3, 5) -> right
                  [1, 1, 20, 21],       # duplicate of the first: not a match, not counted
                  [30, 30, 60, 60],     # matched, predicts 1, gt (2,) -> wrong
                  [70, 0, 90, 20],      # matched, object has no attributes -> not counted
                  [0, 70, 20, 90]],     # wrong class for (4,): unmatched -> not counted
                 [0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 2, 1, 1], attrs=[5, 3, 1, 2, 4])]
    m = evaluate_detections(dets, gts)
    assert m.attribute_objects == 2
    assert m.attribute_accuracy == pytest.approx(0.5)
    assert m.recall == pytest.approx(3 / 4)
    without = evaluate_detections([{k: v for k, v in dets[0].items() if k != "attr_ids"}], gts)
    assert math.isnan(without.attribute_accuracy) and without.attribute_objects == 0


def test_iou_uses_coco_arithmetic():
    iou = box_iou_coco(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30]]))
    assert iou[0, 0] == pytest.approx(50 / 150) and iou[0, 1] == 0.0


def test_malformed_records_are_data_errors():
    dets, gts = hand_case()
    with pytest.raises(DataError, match="3 images"):
        evaluate_detections(dets[:2], gts)
    bad = dict(dets[0], scores=dets[0]["scores"][:2])
    with pytest.raises(DataError, match=r"detections\[0\]"):
        evaluate_detections([bad, *dets[1:]], gts)
    with pytest.raises(DataError, match="missing 'labels'"):
        evaluate_detections(dets, [{"boxes": g["boxes"]} for g in gts])
