"""Detection metrics for the bottom-up detector: object mAP@0.5 and attribute accuracy.

Object mAP follows pycocotools' COCOeval exactly at one IoU threshold (area "all", at most
`max_dets` detections per image), so the number equals COCOeval's AP@0.5 (``stats[1]``):

* per image and class, detections are ranked by score (stable) and cut to `max_dets`; each, in
  turn, takes the not-yet-matched ground truth of its class with the highest IoU >= threshold
  (a later ground truth wins a tie); unmatched detections are false positives;
* per class, the detections of all images (in image order) are ranked by score (stable),
  precision is made monotone from the right and read at the 101 recall points 0, 0.01, ..., 1
  ("coco101"), or integrated over all recall steps as PASCAL VOC 2010+ ("voc");
* mAP is the mean AP over the classes that have at least one ground-truth box (a class with
  ground truth but no detection scores 0).

IoU uses COCO's box arithmetic (width = x2 - x1, no "+1").

Attribute accuracy (Anderson et al. 3.1 train an attribute head; we score it the way the
region features are used): over the ground-truth objects with at least one attribute that a
detection of their class matched above, the fraction whose detection's top-1 predicted
attribute is one of the object's ground-truth attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ray_updown.errors import DataError

RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class DetectionMetrics:
    """What `evaluate_detections` measures."""

    map: float  # mean AP over classes with ground truth (0..1)
    ap_per_class: dict[int, float]  # class index -> AP, classes with ground truth only
    attribute_accuracy: float  # over matched objects that have attributes; nan when none
    attribute_objects: int  # matched objects the attribute accuracy is over
    num_ground_truth: int
    num_detections: int
    recall: float  # matched ground truths / ground truths (all classes)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for logging (`prefix` + name)."""
        return {f"{prefix}map50": self.map, f"{prefix}attr_acc": self.attribute_accuracy,
                f"{prefix}recall50": self.recall, f"{prefix}attr_objects": self.attribute_objects,
                f"{prefix}gt_objects": self.num_ground_truth}


def box_iou_coco(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1 y1 x2 y2 boxes, COCO arithmetic (area = w * h)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2])
                - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3])
                - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _array(record: Mapping[str, Any], key: str, dtype: Any, shape_tail: tuple[int, ...],
           where: str, required: bool = True) -> np.ndarray | None:
    if key not in record:
        if required:
            raise DataError(f"missing '{key}'", record=where)
        return None
    return np.asarray(record[key], dtype=dtype).reshape((-1, *shape_tail))


def _check(detections: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]]
           ) -> tuple[list[dict], list[dict]]:
    if len(detections) != len(ground_truths):
        raise DataError(f"{len(detections)} detection records for {len(ground_truths)} images")
    dets, gts = [], []
    for i, (d, g) in enumerate(zip(detections, ground_truths)):
        boxes = _array(d, "boxes", np.float64, (4,), f"detections[{i}]")
        scores = _array(d, "scores", np.float64, (), f"detections[{i}]")
        labels = _array(d, "labels", np.int64, (), f"detections[{i}]")
        attrs = _array(d, "attr_ids", np.int64, (), f"detections[{i}]", required=False)
        if not len(boxes) == len(scores) == len(labels) or (
                attrs is not None and len(attrs) != len(boxes)):
            raise DataError("boxes, scores, labels (and attr_ids) differ in length",
                            record=f"detections[{i}]")
        gt_boxes = _array(g, "boxes", np.float64, (4,), f"ground_truths[{i}]")
        gt_labels = _array(g, "labels", np.int64, (), f"ground_truths[{i}]")
        gt_attrs = [set(int(a) for a in row if int(a) > 0) for row in g.get("attributes", [])]
        if len(gt_boxes) != len(gt_labels) or (gt_attrs and len(gt_attrs) != len(gt_boxes)):
            raise DataError("boxes, labels (and attributes) differ in length",
                            record=f"ground_truths[{i}]")
        dets.append({"boxes": boxes, "scores": scores, "labels": labels, "attrs": attrs})
        gts.append({"boxes": gt_boxes, "labels": gt_labels,
                    "attrs": gt_attrs or [set() for _ in range(len(gt_boxes))]})
    return dets, gts


def _match_image_class(det_boxes: np.ndarray, gt_boxes: np.ndarray, threshold: float
                       ) -> np.ndarray:
    """COCOeval.evaluateImg at one threshold: matched gt index per detection (-1 = none)."""
    matched = np.full(len(det_boxes), -1, dtype=np.int64)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return matched
    iou = box_iou_coco(det_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    limit = min(threshold, 1 - 1e-10)
    for d in range(len(det_boxes)):
        best, m = limit, -1
        for g in range(len(gt_boxes)):
            if taken[g] or iou[d, g] < best:
                continue
            best, m = iou[d, g], g
        if m >= 0:
            taken[m] = True
            matched[d] = m
    return matched


def _precision_curve(tp: np.ndarray, fp: np.ndarray, num_gt: int,
                     interpolation: Literal["coco101", "voc"]) -> float:
    """AP of ranked true/false positives (COCOeval.accumulate, or VOC's all-point area)."""
    tp_sum, fp_sum = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    recall = tp_sum / num_gt
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    if interpolation == "voc":
        # Area under the monotone curve: sum of recall steps times the precision there.
        steps = np.diff(np.concatenate([[0.0], recall]))
        return float(np.sum(steps * precision))
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    values = np.zeros(len(RECALL_POINTS))
    valid = at < len(precision)
    values[valid] = precision[at[valid]]
    return float(values.mean())


def evaluate_detections(detections: Sequence[Mapping[str, Any]],
                        ground_truths: Sequence[Mapping[str, Any]], iou_threshold: float = 0.5,
                        max_dets: int = 100,
                        interpolation: Literal["coco101", "voc"] = "coco101") -> DetectionMetrics:
    """Object mAP at `iou_threshold` and attribute accuracy of per-image detections.

    detections[i]: {"boxes" (n, 4) x1 y1 x2 y2, "scores" (n,), "labels" (n,) class indices,
    optional "attr_ids" (n,) top-1 attribute} (what `BottomUpDetector.detect` returns).
    ground_truths[i]: {"boxes" (m, 4), "labels" (m,), optional "attributes": m rows of
    attribute indices (0 / negative entries are padding)}. Image i of both lists is one image.
    """
    if interpolation not in ("coco101", "voc"):
        raise DataError(f"interpolation must be 'coco101' or 'voc', got {interpolation!r}")
    dets, gts = _check(detections, ground_truths)
    classes = sorted({int(c) for g in gts for c in g["labels"]})
    per_class_scores: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    per_class_tp: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    num_gt = {c: 0 for c in classes}
    attr_hits = attr_total = matched_total = 0
    for d, g in zip(dets, gts):
        for c in set(int(x) for x in d["labels"]) | set(int(x) for x in g["labels"]):
            gi = np.nonzero(g["labels"] == c)[0]
            di = np.nonzero(d["labels"] == c)[0]
            di = di[np.argsort(-d["scores"][di], kind="mergesort")][:max_dets]
            if c not in num_gt:
                continue  # a class nobody annotated has no AP (COCOeval: precision -1)
            num_gt[c] += len(gi)
            matched = _match_image_class(d["boxes"][di], g["boxes"][gi], iou_threshold)
            per_class_scores[c].append(d["scores"][di])
            per_class_tp[c].append(matched >= 0)
            matched_total += int((matched >= 0).sum())
            if d["attrs"] is None:
                continue
            for det_index, gt_local in zip(di[matched >= 0], matched[matched >= 0]):
                truth = g["attrs"][gi[gt_local]]
                if truth:
                    attr_total += 1
                    attr_hits += int(int(d["attrs"][det_index]) in truth)
    ap: dict[int, float] = {}
    for c in classes:
        scores = np.concatenate(per_class_scores[c]) if per_class_scores[c] else np.zeros(0)
        tp = np.concatenate(per_class_tp[c]) if per_class_tp[c] else np.zeros(0, dtype=bool)
        order = np.argsort(-scores, kind="mergesort")
        ap[c] = _precision_curve(tp[order], ~tp[order], num_gt[c], interpolation)
    total_gt = sum(num_gt.values())
    return DetectionMetrics(
        map=float(np.mean(list(ap.values()))) if ap else float("nan"),
        ap_per_class=ap,
        attribute_accuracy=attr_hits / attr_total if attr_total else float("nan"),
        attribute_objects=attr_total,
        num_ground_truth=total_gt,
        num_detections=int(sum(len(d["boxes"]) for d in dets)),
        recall=matched_total / total_gt if total_gt else float("nan"))
