"""Which regions an image keeps: the original `generate_tsv` rule (Anderson et al., supp. 6.1).

For every object class (background excluded) run NMS at 0.3 over the proposals with that
class's scores; each proposal records the best score it kept in any class. Proposals whose best
score is >= 0.2 are kept; if fewer than `min_boxes` (10) or more than `max_boxes` (100) are
left, the top `min_boxes` / `max_boxes` by that score are taken instead (fixed 36: min = max
= 36). Between the bounds the proposals stay in their original order, as in generate_tsv.

Everything runs batched over the images of a forward and over all classes at once, with no
host synchronisation: on a GPU each `.item()` or `bool(tensor)` inside the 300-step greedy
loop stalls the device (52 ms per image measured on an H200, against 7.9 ms without). Images
with fewer proposals are padded; padding neither suppresses nor is kept.

The greedy NMS of all classes shares one IoU matrix per image. Step r takes, for every
(image, class), the box ranked r-th in that class; if it is still kept, it suppresses every
box it overlaps. Suppressing only *later* boxes, as greedy NMS does, needs no rank test: an
earlier box that overlaps a kept head would already have suppressed it (IoU is symmetric),
so the head would not be kept. On CUDA `greedy_scan="triton"` runs the same scan as one fused
kernel (ray_updown.detector.select_kernel); the torch loop stays the CPU path and the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ray_updown.detector.boxes import box_iou

GreedyScan = Literal["torch", "triton"]


def _pad_mask(counts: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=counts.device)[None, :] < counts[:, None]


def overlap_matrix(boxes: Tensor, counts: Tensor, nms_threshold: float, plus_one: bool) -> Tensor:
    """(N, R, R) bool: IoU above the threshold between two real, distinct boxes of an image."""
    n, r = boxes.shape[:2]
    valid = _pad_mask(counts, r)
    over = box_iou(boxes.float(), boxes.float(), plus_one) > nms_threshold
    over &= valid[:, :, None] & valid[:, None, :]
    over &= ~torch.eye(r, dtype=torch.bool, device=boxes.device)
    return over


def greedy_scan_torch(over: Tensor, order: Tensor) -> Tensor:
    """Greedy NMS of every (image, class) at once: kept (N, K, R) in box order.

    over: (N, R, R) from `overlap_matrix`; order: (N, K, R) box index at each rank per class.
    """
    n, k, r = order.shape
    suppressed = torch.zeros((n, k, r), dtype=torch.bool, device=over.device)
    images = torch.arange(n, device=over.device)[:, None]
    for rank in range(r - 1):  # the last-ranked box has nothing left to suppress
        head = order[:, :, rank]  # (N, K)
        active = ~suppressed.gather(2, head[:, :, None])  # (N, K, 1) head still kept
        suppressed |= over[images, head] & active
    return ~suppressed


def per_class_nms_best_scores(boxes: Tensor, class_scores: Tensor, nms_threshold: float,
                              plus_one: bool, counts: Tensor | None = None,
                              greedy_scan: GreedyScan = "torch") -> Tensor:
    """Each box's best score among the classes in which it survives NMS.

    Batched: boxes (N, R, 4), class_scores (N, R, K) for the K object classes (background
    removed), counts (N,) real boxes per image (the rest is padding; default all) -> (N, R),
    0 on padding. One image: (R, 4) and (R, K) -> (R,).
    Greedy NMS per class: in descending score order (ties by box index), a kept box
    suppresses later boxes whose IoU with it exceeds the threshold (py-faster-rcnn's rule).
    """
    if boxes.dim() == 2:
        return per_class_nms_best_scores(boxes[None], class_scores[None], nms_threshold,
                                         plus_one, None, greedy_scan)[0]
    n, r, k = class_scores.shape
    if counts is None:
        counts = torch.full((n,), r, dtype=torch.long, device=boxes.device)
    if r == 0 or k == 0:
        return class_scores.new_zeros((n, r), dtype=torch.float32)
    valid = _pad_mask(counts, r)
    scores = class_scores.float().masked_fill(~valid[:, :, None], -1.0)  # padding ranks last
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices.transpose(1, 2)
    over = overlap_matrix(boxes, counts, nms_threshold, plus_one)
    if greedy_scan == "triton":
        from ray_updown.detector.select_kernel import greedy_scan_triton

        kept = greedy_scan_triton(over, order.contiguous(), counts)
    else:
        kept = greedy_scan_torch(over, order)
    best = (scores.transpose(1, 2) * kept).amax(dim=1)
    return best.clamp(min=0.0) * valid


@dataclass
class Selection:
    """The regions each image of a batch keeps.

    index: (N, M) proposal indices, each image's kept ones first, in generate_tsv's order;
    num_kept: (N,) how many of each row are real; best: (N, R) best surviving scores.
    """

    index: Tensor
    num_kept: Tensor
    best: Tensor


def select_regions_batched(boxes: Tensor, class_probs: Tensor, counts: Tensor, *,
                           nms_threshold: float = 0.3, conf_threshold: float = 0.2,
                           min_boxes: int = 10, max_boxes: int = 100, plus_one: bool = True,
                           greedy_scan: GreedyScan = "torch") -> Selection:
    """generate_tsv's selection for padded (N, R, 4) boxes and (N, R, C) class probabilities
    (background at index 0), `counts` real proposals per image. No host synchronisation."""
    n, r = boxes.shape[:2]
    best = per_class_nms_best_scores(boxes, class_probs[:, :, 1:], nms_threshold, plus_one,
                                     counts, greedy_scan)
    valid = _pad_mask(counts, r)
    ranking = torch.sort(best.masked_fill(~valid, -1.0), dim=1, descending=True, stable=True).indices
    rank_of = torch.empty_like(ranking).scatter_(
        1, ranking, torch.arange(r, device=boxes.device).expand(n, r))
    above = (best >= conf_threshold) & valid
    num_above = above.sum(dim=1, keepdim=True)
    too_few, too_many = num_above < min_boxes, num_above > max_boxes
    keep = torch.where(too_few, (rank_of < min_boxes) & valid,
                       torch.where(too_many, rank_of < max_boxes, above))
    # Clamped images list their regions by rank, the others in proposal order.
    position = torch.where(too_few | too_many, rank_of,
                           torch.arange(r, device=boxes.device).expand(n, r))
    position = position.masked_fill(~keep, r)
    width = min(r, max(min_boxes, max_boxes))
    index = torch.sort(position, dim=1, stable=True).indices[:, :width]
    return Selection(index, keep.sum(dim=1), best)


def select_regions(boxes: Tensor, class_probs: Tensor, *, nms_threshold: float = 0.3,
                   conf_threshold: float = 0.2, min_boxes: int = 10, max_boxes: int = 100,
                   plus_one: bool = True) -> tuple[Tensor, Tensor]:
    """One image: indices of the kept regions and every region's best surviving score.

    class_probs: (R, C) softmax over classes with background at index 0.
    """
    counts = torch.tensor([len(boxes)], device=boxes.device)
    chosen = select_regions_batched(boxes[None], class_probs[None], counts,
                                    nms_threshold=nms_threshold, conf_threshold=conf_threshold,
                                    min_boxes=min_boxes, max_boxes=max_boxes, plus_one=plus_one)
    return chosen.index[0, : int(chosen.num_kept[0])], chosen.best[0]
