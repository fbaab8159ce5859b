"""Training-time matching and sampling shared by the RPN and the RoI heads (Faster R-CNN)."""

from __future__ import annotations

import torch
from torch import Tensor


def match_by_iou(iou: Tensor, low: float, high: float, allow_low_quality: bool
                 ) -> tuple[Tensor, Tensor]:
    """Match each prediction (column of the (gt, pred) IoU matrix) to its best ground truth.

    Returns (matched gt index, label) with label 1 = IoU >= high, 0 = IoU < low, -1 = between.
    With `allow_low_quality`, each ground truth's best predictions (ties included) are positive
    too (Faster R-CNN's RPN rule (i)).
    """
    num_pred = iou.shape[1]
    if iou.shape[0] == 0:
        zeros = torch.zeros(num_pred, dtype=torch.long, device=iou.device)
        return zeros, zeros.clone()
    best, matched = iou.max(dim=0)
    labels = torch.full((num_pred,), -1, dtype=torch.long, device=iou.device)
    labels[best < low] = 0
    labels[best >= high] = 1
    if allow_low_quality:
        best_per_gt = iou.max(dim=1, keepdim=True).values
        hit = (iou == best_per_gt) & (best_per_gt > 0)
        gt_idx, pred_idx = hit.nonzero(as_tuple=True)
        labels[pred_idx] = 1
        matched[pred_idx] = gt_idx
    return matched, labels


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random positives (label >= 1) up to the fraction, negatives (label 0) fill the rest."""
    positive = (labels >= 1).nonzero(as_tuple=True)[0]
    negative = (labels == 0).nonzero(as_tuple=True)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)]
    neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)]
    return pos, neg


def smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 (Fast R-CNN eq. 3); beta = 1 / sigma^2 in Caffe's terms."""
    diff = (pred - target).abs()
    if beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()
