"""Region proposal network on the stride-16 res4 map (Faster R-CNN, Ren et al. 2015).

A 3x3 conv (512 channels in the released model) + ReLU feeds two 1x1 convs: objectness and
four box deltas per anchor. Objectness is Caffe's 2-way softmax (2A channels: the A background
scores, then the A foreground scores) or detectron2's single logit (A channels). The test-time
proposal step is Caffe's proposal layer: decode, clip, drop boxes smaller than `rpn_min_size`
original-image pixels, keep the best `pre_nms`, NMS at 0.7, keep the best `post_nms`; run for
the whole batch at once (`RegionProposalNetwork.propose`).

The size test follows the config's `rpn_size_filter`, the rule of the port a model reproduces
(`size_filter_keep`): py-faster-rcnn's `_filter_boxes` ("caffe": sides >= 16 x im_scale,
before the top-k), MILVLG's `find_top_bua_rpn_proposals` ("milvlg": x2 > x1 and y2 > y1,
then sides > 16 x im_scale, before the top-k) or detectron2's `find_top_rpn_proposals`
("detectron2": top-k first, then clip, then sides > MIN_SIZE = 0). The order matters: a box
dropped before the top-k frees its slot for the next anchor, one dropped after does not; and
under "> 0" a box clipped to zero height (an anchor wholly outside the image) is dropped, which
">= 0" would keep.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from ray_updown.detector.boxes import BoxCoder, box_iou, box_sizes, clip_boxes_per_image
from ray_updown.detector.config import DetectorConfig
from ray_updown.detector.sampling import match_by_iou, sample_balanced, smooth_l1
from ray_updown.detector.transform import ImageBatch


def caffe_cell_anchors(sizes: tuple[float, ...], ratios: tuple[float, ...], stride: int = 16
                       ) -> Tensor:
    """py-faster-rcnn's generate_anchors: ratios of a stride-sized base box, then scales.

    Ratio-major order; sides are rounded as in Caffe; centred on ((stride-1)/2, (stride-1)/2).
    """
    centre = (stride - 1) / 2.0
    area = float(stride * stride)
    anchors = []
    for ratio in ratios:
        base_w = round(math.sqrt(area / ratio))
        base_h = round(base_w * ratio)
        for size in sizes:
            scale = size / stride
            w, h = base_w * scale, base_h * scale
            anchors.append([centre - 0.5 * (w - 1), centre - 0.5 * (h - 1),
                            centre + 0.5 * (w - 1), centre + 0.5 * (h - 1)])
    return torch.tensor(anchors, dtype=torch.float32)


def detectron2_cell_anchors(sizes: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
    """detectron2's DefaultAnchorGenerator cells: exact areas, size-major, centred on 0."""
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def plus_one_nms(boxes: Tensor, scores: Tensor, threshold: float, plus_one: bool) -> Tensor:
    """torchvision NMS under either box convention (x2 + 1 turns one into the other)."""
    if plus_one:
        boxes = boxes.clone()
        boxes[:, 2:] += 1.0
    return nms(boxes.float(), scores.float(), threshold)


def size_filter_keep(boxes: Tensor, min_size: Tensor, rule: str, plus_one: bool) -> Tensor:
    """Which clipped (..., 4) boxes pass a port's size test; `min_size` broadcasts against
    the boxes' leading dims (the threshold in network-input pixels)."""
    ws, hs = box_sizes(boxes, plus_one)
    if rule == "caffe":
        return (ws >= min_size) & (hs >= min_size)
    keep = (ws > min_size) & (hs > min_size)
    if rule == "milvlg":  # BUABoxes.filter_boxes: the raw extent must be positive as well
        keep &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return keep


class RPNHead(nn.Module):
    def __init__(self, in_channels: int, hidden: int, num_anchors: int, two_way: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors * (2 if two_way else 1), 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = F.relu(self.conv(x))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class RegionProposalNetwork(nn.Module):
    def __init__(self, config: DetectorConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.two_way = config.rpn_objectness == "softmax2"
        self.head = RPNHead(in_channels, config.rpn_channels, config.num_anchors, self.two_way)
        cells = (caffe_cell_anchors(config.anchor_sizes, config.anchor_ratios, config.feature_stride)
                 if config.anchor_style == "caffe"
                 else detectron2_cell_anchors(config.anchor_sizes, config.anchor_ratios))
        # Persistent: published checkpoints may carry their own cell anchors, which then win.
        self.register_buffer("cell_anchors", cells)
        self.coder = BoxCoder(config.rpn_box_weights, config.box_plus_one)

    def grid_anchors(self, height: int, width: int) -> Tensor:
        """All anchors of an (H, W) map in (H, W, A) order, as Caffe enumerates them."""
        stride = self.config.feature_stride
        cells = self.cell_anchors.float()
        ys = torch.arange(height, device=cells.device, dtype=torch.float32) * stride
        xs = torch.arange(width, device=cells.device, dtype=torch.float32) * stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
        return (shifts + cells.view(1, -1, 4)).reshape(-1, 4)

    def _flatten(self, logits: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> objectness score (N, HWA), raw objectness logits, deltas (N, HWA, 4)."""
        n, _, h, w = deltas.shape
        a = self.config.num_anchors
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        if self.two_way:
            pair = logits.view(n, 2, a, h, w).permute(0, 3, 4, 2, 1).reshape(n, -1, 2)
            return pair.float().softmax(-1)[..., 1], pair, deltas
        flat = logits.permute(0, 2, 3, 1).reshape(n, -1)
        return flat, flat, deltas

    def _valid_anchors(self, n: int, h: int, w: int, feature_sizes: Tensor | None) -> Tensor:
        """(N, HWA) bool: anchors on each image's valid (unpadded) part of the map."""
        device = self.cell_anchors.device
        if feature_sizes is None:
            return torch.ones((n, h * w * self.config.num_anchors), dtype=torch.bool, device=device)
        sizes = feature_sizes.to(device)
        rows = torch.arange(h, device=device)[None, :] < sizes[:, :1]
        cols = torch.arange(w, device=device)[None, :] < sizes[:, 1:]
        valid = rows[:, :, None] & cols[:, None, :]
        return valid[..., None].expand(n, h, w, self.config.num_anchors).reshape(n, -1)

    def forward(self, features: Tensor, feature_sizes: Tensor | None, batch: ImageBatch,
                gt_boxes: list[Tensor] | None = None
                ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Proposals per image (resized-image pixels) with their scores, and the RPN losses."""
        logits, deltas = self.head(features)
        n, _, h, w = features.shape
        scores, raw_logits, flat_deltas = self._flatten(logits, deltas)
        anchors = self.grid_anchors(h, w)
        valid = self._valid_anchors(n, h, w, feature_sizes)
        training = self.training and gt_boxes is not None
        pre_nms = self.config.rpn_pre_nms_train if training else self.config.rpn_pre_nms_test
        post_nms = self.config.rpn_post_nms_train if training else self.config.rpn_post_nms_test
        with torch.no_grad():
            proposals, proposal_scores = self.propose(anchors, flat_deltas.float(), scores.float(),
                                                      valid, batch, pre_nms, post_nms)
        losses: dict[str, Tensor] = {}
        if training:
            losses = self.losses(anchors, list(valid), raw_logits, flat_deltas, batch, gt_boxes)
        return proposals, proposal_scores, losses

    def propose(self, anchors: Tensor, deltas: Tensor, scores: Tensor, valid: Tensor,
                batch: ImageBatch, pre_nms: int, post_nms: int) -> tuple[list[Tensor], list[Tensor]]:
        """The proposal layer for the whole batch: decode, clip, size filter, top-k, NMS.

        anchors (A, 4) shared; deltas (N, A, 4), scores (N, A), valid (N, A) for the batch.
        Decoding, clipping, the size filter and the pre-NMS top-k run once for all images
        (rejected anchors sort last, so each image keeps the order a per-image sort gives).
        A filter after the top-k ("detectron2") moves the rejected boxes of the top-k behind
        the kept ones, in order. NMS then runs on each image's kept slice: torchvision's
        `batched_nms` would offset each image's coordinates, which changes float32 IoUs in the
        last bit and with them a few proposals; per-image calls keep them identical to the
        unbatched rule.
        """
        cfg = self.config
        n = deltas.shape[0]
        boxes = self.coder.decode(deltas.reshape(-1, 4), anchors.repeat(n, 1)).view(n, -1, 4)
        sizes = torch.tensor(batch.image_sizes, dtype=torch.long, device=boxes.device)
        boxes = clip_boxes_per_image(boxes, sizes, cfg.box_plus_one)
        after_top_k = cfg.rpn_size_filter == "detectron2"
        if after_top_k:  # detectron2's MIN_SIZE is in network-input pixels
            min_size = torch.full((n, 1), cfg.rpn_min_size, dtype=torch.float32)
        else:  # like the float scalar Caffe compares with: computed in double, then float32
            scales = torch.tensor(batch.scales, dtype=torch.float64)
            min_size = (scales * cfg.rpn_min_size).float()[:, None]
        min_size = min_size.to(boxes.device)
        keep = valid if after_top_k else valid & size_filter_keep(
            boxes, min_size, cfg.rpn_size_filter, cfg.box_plus_one)
        ranked = torch.sort(scores.masked_fill(~keep, float("-inf")), dim=1, descending=True,
                            stable=True)
        top = ranked.indices[:, :pre_nms]
        top_boxes = boxes.gather(1, top[:, :, None].expand(-1, -1, 4))
        top_scores = ranked.values[:, :pre_nms]
        top_keep = keep.gather(1, top)
        if after_top_k:
            top_keep &= size_filter_keep(top_boxes, min_size, cfg.rpn_size_filter, cfg.box_plus_one)
            order = torch.sort((~top_keep).to(torch.uint8), dim=1, stable=True).indices
            top_boxes = top_boxes.gather(1, order[:, :, None].expand(-1, -1, 4))
            top_scores = top_scores.gather(1, order)
        counts = top_keep.sum(dim=1).tolist()  # the one host sync
        proposals, proposal_scores = [], []
        for i, count in enumerate(counts):
            b, s = top_boxes[i, :count], top_scores[i, :count]
            kept = plus_one_nms(b, s, cfg.rpn_nms, cfg.box_plus_one)[:post_nms]
            proposals.append(b[kept])
            proposal_scores.append(s[kept])
        return proposals, proposal_scores

    def losses(self, anchors: Tensor, valids: list[Tensor], raw_logits: Tensor, deltas: Tensor,
               batch: ImageBatch, gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        """Objectness (softmax or sigmoid CE) and smooth-L1 box loss over sampled anchors."""
        cfg = self.config
        low, high = cfg.rpn_iou_thresholds
        obj_terms, box_terms = [], []
        for i, valid in enumerate(valids):
            img_anchors = anchors[valid]
            gt = gt_boxes[i].to(img_anchors)
            iou = box_iou(gt, img_anchors, cfg.box_plus_one)
            inside = torch.ones(len(img_anchors), dtype=torch.bool, device=iou.device)
            if cfg.rpn_boundary_thresh >= 0:
                t = cfg.rpn_boundary_thresh
                img_h, img_w = batch.image_sizes[i]
                inside = ((img_anchors[:, 0] >= -t) & (img_anchors[:, 1] >= -t)
                          & (img_anchors[:, 2] < img_w + t) & (img_anchors[:, 3] < img_h + t))
                iou[:, ~inside] = -1.0  # never the best match of a ground truth (Caffe)
            matched, labels = match_by_iou(iou, low, high, allow_low_quality=True)
            labels[~inside] = -1
            pos, neg = sample_balanced(labels, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction)
            sampled = torch.cat([pos, neg])
            target = (labels[sampled] == 1).long()
            img_logits = raw_logits[i][valid][sampled]
            if self.two_way:
                obj_terms.append(F.cross_entropy(img_logits.float(), target, reduction="sum"))
            else:
                obj_terms.append(F.binary_cross_entropy_with_logits(
                    img_logits.float(), target.float(), reduction="sum"))
            if len(pos):
                goal = self.coder.encode(img_anchors[pos], gt[matched[pos]])
                box_terms.append(smooth_l1(deltas[i][valid][pos].float(), goal,
                                           cfg.rpn_smooth_l1_beta))
        normaliser = float(cfg.rpn_batch_per_image * len(valids))
        zero = raw_logits.sum() * 0.0
        return {
            "loss_rpn_cls": sum(obj_terms, zero) / normaliser,
            "loss_rpn_box": sum(box_terms, zero + deltas.sum() * 0.0) / normaliser,
        }
