"""Which regions an image keeps: the original `generate_tsv` rule (Anderson et al., supp. 6.1).

For every object class (background excluded) run NMS at 0.3 over the proposals with that
class's scores; each proposal records the best score it kept in any class. Proposals whose best
score is >= 0.2 are kept; if fewer than `min_boxes` (10) or more than `max_boxes` (100) are
left, the top `min_boxes` / `max_boxes` by that score are taken instead (fixed 36: min = max
= 36). Between the bounds the proposals stay in their original order, as in generate_tsv.

The per-class NMS runs for all classes at once: the proposals are shared, so one IoU matrix
serves every class, and the greedy suppression advances one rank at a time for all classes in
parallel (R steps over (R, C) tensors instead of C separate NMS calls -- the CPU bottleneck of
MILVLG's extractor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_updown.detector.boxes import box_iou


def per_class_nms_best_scores(boxes: Tensor, class_scores: Tensor, nms_threshold: float,
                              plus_one: bool) -> Tensor:
    """Each box's best score among the classes in which it survives NMS, (R,).

    `class_scores` is (R, K) for the K object classes (background already removed).
    Greedy NMS per class: in descending score order, a kept box suppresses later boxes whose
    IoU with it exceeds the threshold (py-faster-rcnn's rule).
    """
    num_boxes, num_classes = class_scores.shape
    if num_boxes == 0 or num_classes == 0:
        return class_scores.new_zeros((num_boxes,))
    scores = class_scores.float()
    iou = box_iou(boxes.float(), boxes.float(), plus_one)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices  # (R, K): rank -> box
    order_t = order.t().contiguous()  # (K, R)
    suppressed = torch.zeros((num_classes, num_boxes), dtype=torch.bool, device=scores.device)
    later = torch.ones((num_boxes,), dtype=torch.bool, device=scores.device)
    for rank in range(num_boxes - 1):
        later[rank] = False  # `later` marks the ranks after the current one
        active = ~suppressed[:, rank]  # classes whose rank-th box is still kept
        if not bool(active.any()):
            continue
        cls = active.nonzero(as_tuple=True)[0]
        head = order_t[cls, rank]  # (k,) the kept box of each active class
        overlaps = iou[head[:, None], order_t[cls]]  # (k, R) IoU with boxes in rank order
        suppressed[cls] |= (overlaps > nms_threshold) & later[None, :]
    kept = torch.zeros_like(suppressed)
    kept.scatter_(1, order_t, ~suppressed)  # back from rank order to box order
    best = (scores.t() * kept).max(dim=0).values
    return best.clamp(min=0.0)


def select_regions(boxes: Tensor, class_probs: Tensor, *, nms_threshold: float = 0.3,
                   conf_threshold: float = 0.2, min_boxes: int = 10, max_boxes: int = 100,
                   plus_one: bool = True) -> tuple[Tensor, Tensor]:
    """Indices of the kept regions and every region's best surviving score.

    class_probs: (R, C) softmax over classes with background at index 0.
    """
    best = per_class_nms_best_scores(boxes, class_probs[:, 1:], nms_threshold, plus_one)
    keep = (best >= conf_threshold).nonzero(as_tuple=True)[0]
    if len(keep) < min_boxes:
        keep = torch.sort(best, descending=True, stable=True).indices[:min_boxes]
    elif len(keep) > max_boxes:
        keep = torch.sort(best, descending=True, stable=True).indices[:max_boxes]
    return keep, best
