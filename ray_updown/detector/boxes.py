"""Box arithmetic shared by the RPN, the RoI heads and region selection.

Boxes are (x1, y1, x2, y2). Caffe's Faster R-CNN (and MILVLG's port of it) measure a box as
x2 - x1 + 1 pixels ("legacy plus one"); detectron2 and the Hugging Face port as x2 - x1. The
flag is carried through every function so a converted model computes what its source did.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# dw, dh are clamped so that a 16-px box can grow to at most 1000 px (as every port does).
SCALE_CLAMP = math.log(1000.0 / 16)


def box_sizes(boxes: Tensor, plus_one: bool) -> tuple[Tensor, Tensor]:
    """Widths and heights of (..., 4) boxes."""
    extra = 1.0 if plus_one else 0.0
    return boxes[..., 2] - boxes[..., 0] + extra, boxes[..., 3] - boxes[..., 1] + extra


def box_area(boxes: Tensor, plus_one: bool) -> Tensor:
    w, h = box_sizes(boxes, plus_one)
    return w.clamp(min=0) * h.clamp(min=0)


def box_iou(a: Tensor, b: Tensor, plus_one: bool) -> Tensor:
    """Pairwise IoU of (..., R, 4) and (..., S, 4) boxes -> (..., R, S); leading dims batch."""
    extra = 1.0 if plus_one else 0.0
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt + extra).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a, plus_one)[..., :, None] + box_area(b, plus_one)[..., None, :] - inter
    return inter / union.clamp(min=1e-9)


def clip_boxes(boxes: Tensor, height: float, width: float, plus_one: bool) -> Tensor:
    """Clip to the image: [0, w - 1] under the legacy convention, [0, w] otherwise."""
    extra = 1.0 if plus_one else 0.0
    x = boxes[:, 0::2].clamp(min=0, max=width - extra)
    y = boxes[:, 1::2].clamp(min=0, max=height - extra)
    out = torch.empty_like(boxes)
    out[:, 0::2] = x
    out[:, 1::2] = y
    return out


def clip_boxes_per_image(boxes: Tensor, sizes: Tensor, plus_one: bool) -> Tensor:
    """`clip_boxes` for a batch: (N, P, 4) boxes, (N, 2) valid (h, w) of each image."""
    extra = 1.0 if plus_one else 0.0
    limits = (sizes.to(boxes.dtype) - extra).flip(-1).repeat(1, 2)[:, None, :]  # (N, 1, 4) w h w h
    return torch.minimum(boxes.clamp(min=0), limits)


class BoxCoder:
    """The R-CNN box parameterisation (dx, dy, dw, dh) with per-coordinate weights."""

    def __init__(self, weights: tuple[float, float, float, float], plus_one: bool):
        self.weights = tuple(float(w) for w in weights)
        self.plus_one = plus_one

    def _centres(self, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w, h = box_sizes(boxes, self.plus_one)
        return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h

    def encode(self, reference: Tensor, target: Tensor) -> Tensor:
        """Deltas that move each `reference` box onto its `target` box, (N, 4)."""
        rx, ry, rw, rh = self._centres(reference)
        tx, ty, tw, th = self._centres(target)
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (tx - rx) / rw, wy * (ty - ry) / rh,
                            ww * torch.log(tw / rw), wh * torch.log(th / rh)), dim=1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Apply (N, 4k) deltas to (N, 4) reference boxes -> (N, 4k) boxes."""
        reference = reference.to(deltas.dtype)
        cx, cy, w, h = self._centres(reference)
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=SCALE_CLAMP)
        dh = (deltas[:, 3::4] / wh).clamp(max=SCALE_CLAMP)
        pcx = dx * w[:, None] + cx[:, None]
        pcy = dy * h[:, None] + cy[:, None]
        pw = torch.exp(dw) * w[:, None]
        ph = torch.exp(dh) * h[:, None]
        # As in Caffe's bbox_transform_inv and MILVLG, x2 = cx + w/2 even under the legacy
        # convention (an off-by-one the released model was trained with).
        out = torch.empty_like(deltas)
        out[:, 0::4] = pcx - 0.5 * pw
        out[:, 1::4] = pcy - 0.5 * ph
        out[:, 2::4] = pcx + 0.5 * pw
        out[:, 3::4] = pcy + 0.5 * ph
        return out
