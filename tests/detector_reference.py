"""The detector's inference steps as they were before they were batched: the oracles.

`per_class_nms_best_scores` / `select_regions` (one image, a host sync per step) and
`propose_one_image` (the RPN's proposal step, one image at a time) are kept verbatim here so
the batched, sync-free versions in ray_updown.detector can be checked against them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_updown.detector.boxes import box_iou, box_sizes, clip_boxes
from ray_updown.detector.rpn import plus_one_nms


def per_class_nms_best_scores(boxes: Tensor, class_scores: Tensor, nms_threshold: float,
                              plus_one: bool) -> Tensor:
    num_boxes, num_classes = class_scores.shape
    if num_boxes == 0 or num_classes == 0:
        return class_scores.new_zeros((num_boxes,))
    scores = class_scores.float()
    iou = box_iou(boxes.float(), boxes.float(), plus_one)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    order_t = order.t().contiguous()
    suppressed = torch.zeros((num_classes, num_boxes), dtype=torch.bool, device=scores.device)
    later = torch.ones((num_boxes,), dtype=torch.bool, device=scores.device)
    for rank in range(num_boxes - 1):
        later[rank] = False
        active = ~suppressed[:, rank]
        if not bool(active.any()):
            continue
        cls = active.nonzero(as_tuple=True)[0]
        head = order_t[cls, rank]
        overlaps = iou[head[:, None], order_t[cls]]
        suppressed[cls] |= (overlaps > nms_threshold) & later[None, :]
    kept = torch.zeros_like(suppressed)
    kept.scatter_(1, order_t, ~suppressed)
    best = (scores.t() * kept).max(dim=0).values
    return best.clamp(min=0.0)


def select_regions(boxes: Tensor, class_probs: Tensor, *, nms_threshold: float = 0.3,
                   conf_threshold: float = 0.2, min_boxes: int = 10, max_boxes: int = 100,
                   plus_one: bool = True) -> tuple[Tensor, Tensor]:
    best = per_class_nms_best_scores(boxes, class_probs[:, 1:], nms_threshold, plus_one)
    keep = (best >= conf_threshold).nonzero(as_tuple=True)[0]
    if len(keep) < min_boxes:
        keep = torch.sort(best, descending=True, stable=True).indices[:min_boxes]
    elif len(keep) > max_boxes:
        keep = torch.sort(best, descending=True, stable=True).indices[:max_boxes]
    return keep, best


def propose_one_image(rpn, anchors: Tensor, deltas: Tensor, scores: Tensor,
                      image_size: tuple[int, int], scale: float, pre_nms: int, post_nms: int
                      ) -> tuple[Tensor, Tensor]:
    """The RPN's former per-image `_propose` (Caffe's proposal layer)."""
    cfg = rpn.config
    img_h, img_w = image_size
    boxes = clip_boxes(rpn.coder.decode(deltas, anchors), img_h, img_w, cfg.box_plus_one)
    ws, hs = box_sizes(boxes, cfg.box_plus_one)
    min_size = cfg.rpn_min_size * scale
    keep = (ws >= min_size) & (hs >= min_size)
    boxes, scores = boxes[keep], scores[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[:pre_nms]
    boxes, scores = boxes[order], scores[order]
    keep = plus_one_nms(boxes, scores, cfg.rpn_nms, cfg.box_plus_one)[:post_nms]
    return boxes[keep], scores[keep]
