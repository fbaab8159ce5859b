"""The per-region head: RoI pooling on res4, res5, mean-pooled feature, class/box/attribute heads.

Paper section 3.1 / supp. 6.1: each region's feature v_i is the mean over res5's 14x14 output
(2048-d for ResNet-101). The class head is a (num_classes)-way softmax with class-specific box
deltas (4 per class, background slot included as in Caffe). The attribute head concatenates
v_i with a 256-d embedding of a class (the ground-truth class in training, the argmax class at
test time), applies fc 512 + ReLU and a (num_attributes)-way softmax (index 0 = no attribute).

Attribute confidence follows the config's `attr_confidence`. Caffe's generate_tsv (and MILVLG)
take the softmax over all outputs and then drop "no attribute"; the detectron2 ports drop it
first and take the softmax over the real attributes. At inference the second is produced by
masking the "no attribute" logit to -inf (`inference_attribute_logits`): every consumer's
softmax-then-drop then yields the port's numbers, with the same argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from ray_updown.detector.backbone import build_res5, stage_channels
from ray_updown.detector.boxes import BoxCoder, box_iou
from ray_updown.detector.config import DetectorConfig
from ray_updown.detector.sampling import match_by_iou, sample_balanced, smooth_l1


@dataclass
class DetectionTarget:
    """Ground truth of one image, boxes in original-image pixels.

    labels: detector class indices in [1, num_classes). attributes: (M, K) attribute indices,
    -1 = padding; a box without attributes should carry [0, -1, ...] ("no attribute", trained as
    in the paper); a row of only -1 is left out of the attribute loss.
    """

    boxes: Tensor
    labels: Tensor
    attributes: Tensor


@dataclass
class RegionPredictions:
    """Head outputs for all regions of one image (boxes in resized-image pixels)."""

    boxes: Tensor  # (R, 4) the proposals the features were pooled from
    features: Tensor  # (R, D)
    class_logits: Tensor  # (R, C)
    box_deltas: Tensor  # (R, 4C)
    attr_logits: Tensor  # (R, A)


class BoxPredictor(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(features), self.bbox_pred(features)


class AttributeHead(nn.Module):
    """[v ; embed(class)] -> fc + ReLU -> attribute logits (Anderson et al. 3.1)."""

    def __init__(self, dim: int, num_classes: int, embed_dim: int, hidden: int, num_attributes: int):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(dim + embed_dim, hidden)
        self.score = nn.Linear(hidden, num_attributes)
        for layer in (self.class_embedding, self.fc, self.score):
            nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: Tensor, classes: Tensor) -> Tensor:
        joint = torch.cat([features, self.class_embedding(classes)], dim=1)
        return self.score(F.relu(self.fc(joint)))


class RoIHeads(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.res5 = build_res5(config)
        dim = config.feature_dim
        self.predictor = BoxPredictor(dim, config.num_classes)
        self.attributes = AttributeHead(dim, config.num_classes, config.attr_embed_dim,
                                        config.attr_hidden_dim, config.num_attributes)
        self.coder = BoxCoder(config.box_weights, config.box_plus_one)
        self.inference_chunk: int | None = None  # RoIs per res5 call; set for the device
        self.compiled_res5_means = None  # res5 + mean at inference, compiled (`compile_res5`)
        self.roi_block = 0  # when compiled: RoI counts are padded to a multiple of this

    def _res5_means(self, pooled: Tensor) -> Tensor:
        return self.res5(pooled)[0].mean(dim=(2, 3))

    def compile_res5(self, mode: str, roi_block: int = 256) -> None:
        """torch.compile res5 and its mean for inference, the head that dominates extraction
        (6.67 of 10.8 ms per image on an H200). RoI counts are padded with empty regions to a
        multiple of `roi_block`, so "reduce-overhead" records one CUDA graph per few sizes
        rather than one per batch."""
        self.compiled_res5_means = torch.compile(self._res5_means, mode=mode, dynamic=True)
        self.roi_block = roi_block

    def pool(self, features: Tensor, rois: Tensor) -> Tensor:
        """RoIPool (Caffe's, as torchvision implements it) or RoIAlign of (K, 5) rois on res4."""
        rois = rois.to(features.dtype)
        size = self.config.pooler_resolution
        scale = 1.0 / self.config.feature_stride
        if self.config.pooler == "roialign":
            return roi_align(features, rois, size, scale, self.config.pooler_sampling_ratio,
                             aligned=True)
        return roi_pool(features, rois, size, scale)

    def region_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(R, D): res5 on each pooled region, mean over its 14x14 map (the paper's v_i)."""
        if sum(len(b) for b in boxes) == 0:
            return features.new_zeros((0, self.config.feature_dim))
        rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b],
                                    dim=1) for i, b in enumerate(boxes)])
        if self.training:
            return self._res5_means(self.pool(features, rois))
        chunk = self.inference_chunk or self.config.res5_chunk
        if chunk <= 0:
            chunk = len(rois)
        # Inference slices the RoIs to bound memory; every RoI is computed independently.
        return torch.cat([self._padded_res5_means(self.pool(features, rois[s:s + chunk]))
                          for s in range(0, len(rois), chunk)])

    def _padded_res5_means(self, pooled: Tensor) -> Tensor:
        count = len(pooled)
        if self.roi_block and count % self.roi_block:
            pad = self.roi_block - count % self.roi_block
            pooled = torch.cat([pooled, pooled.new_zeros((pad,) + pooled.shape[1:])])
        if self.compiled_res5_means is None:
            return self._res5_means(pooled)[:count]
        # Under "reduce-overhead" each chunk is a new replay of a CUDA graph, whose output the
        # next replay overwrites: mark the step and copy the output out.
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled_res5_means(pooled)[:count].clone()

    def predict_flat(self, features: Tensor, proposals: list[Tensor]
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """Inference for the whole batch: (R, D) features, (R, C) class logits and (R, A)
        attribute logits of every proposal, images one after another (no box deltas)."""
        region = self.region_features(features, proposals)
        class_logits = self.predictor.cls_score(region)
        # At test time the attribute head is conditioned on the argmax class (all classes,
        # background included, as the released model and its ports do).
        attr_logits = self.attributes(region, class_logits.argmax(dim=1))
        return region, class_logits, inference_attribute_logits(attr_logits, self.config)

    def predict(self, features: Tensor, proposals: list[Tensor]) -> list[RegionPredictions]:
        """Inference: features, class logits, deltas and attribute logits of every proposal."""
        region, class_logits, attr_logits = self.predict_flat(features, proposals)
        box_deltas = self.predictor.bbox_pred(region)
        counts = [len(p) for p in proposals]
        return [RegionPredictions(b, f, c, d, a) for b, f, c, d, a in zip(
            proposals, region.split(counts), class_logits.split(counts),
            box_deltas.split(counts), attr_logits.split(counts))]

    def losses(self, features: Tensor, proposals: list[Tensor], targets: list[DetectionTarget]
               ) -> dict[str, Tensor]:
        """Classification CE, class-specific smooth-L1 and the attribute loss over sampled RoIs."""
        cfg = self.config
        sampled_boxes, sampled_labels, matched_boxes, matched_attrs = [], [], [], []
        for props, target in zip(proposals, targets):
            gt = target.boxes.to(props)
            # Ground truths join the proposals so the head sees positives from the first step.
            candidates = torch.cat([props, gt])
            iou = box_iou(gt, candidates, cfg.box_plus_one)
            thr = cfg.roi_iou_threshold
            matched, fg = match_by_iou(iou, thr, thr, allow_low_quality=False)
            labels = target.labels.to(props.device)[matched] * fg if len(gt) else fg * 0
            pos, neg = sample_balanced(labels, cfg.roi_batch_per_image, cfg.roi_positive_fraction)
            keep = torch.cat([pos, neg])
            sampled_boxes.append(candidates[keep])
            sampled_labels.append(labels[keep])
            if len(gt):
                matched_boxes.append(gt[matched[keep]])
                matched_attrs.append(target.attributes.to(props.device).long()
                                     .reshape(len(gt), -1)[matched[keep]])
            else:
                matched_boxes.append(candidates[keep])
                matched_attrs.append(torch.full((len(keep), 1), -1, dtype=torch.long,
                                                device=props.device))
        region = self.region_features(features, sampled_boxes)
        class_logits, box_deltas = self.predictor(region)
        labels = torch.cat(sampled_labels)
        loss_cls = F.cross_entropy(class_logits.float(), labels)
        fg = (labels > 0).nonzero(as_tuple=True)[0]
        fg_labels = labels[fg]
        rois = torch.cat(sampled_boxes)
        goal = self.coder.encode(rois[fg], torch.cat(matched_boxes)[fg])
        cols = 4 * fg_labels[:, None] + torch.arange(4, device=labels.device)
        pred = box_deltas[fg[:, None], cols].float()
        loss_box = smooth_l1(pred, goal, cfg.roi_smooth_l1_beta) / max(1, labels.numel())
        loss_attr = self.attribute_loss(region[fg], fg_labels, self._pad_cat(matched_attrs)[fg])
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_attr": loss_attr}

    @staticmethod
    def _pad_cat(rows: list[Tensor]) -> Tensor:
        width = max(r.shape[1] for r in rows)
        return torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])

    def attribute_loss(self, region: Tensor, classes: Tensor, attributes: Tensor) -> Tensor:
        """Softmax CE over attributes, conditioned on the ground-truth class embedding.

        A box with several attributes contributes the mean CE over them; boxes are averaged;
        the whole is weighted by `attr_loss_weight` (0.5, as MILVLG's port of the Caffe model).
        """
        logits = self.attributes(region, classes).float()
        valid = attributes >= 0
        has_any = valid.any(dim=1)
        if not bool(has_any.any()):
            return logits.sum() * 0.0
        logp = F.log_softmax(logits, dim=1)
        picked = logp.gather(1, attributes.clamp(min=0)) * valid
        per_box = -picked.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        return self.config.attr_loss_weight * per_box[has_any].mean()


def inference_attribute_logits(attr_logits: Tensor, config: DetectorConfig) -> Tensor:
    """Attribute logits as the port scores them (module docstring): under "without_none" the
    "no attribute" logit (index 0) is -inf, so a softmax over all outputs equals the port's
    softmax over the real attributes and gives "no attribute" probability 0."""
    if config.attr_confidence == "with_none":
        return attr_logits
    return torch.cat([torch.full_like(attr_logits[:, :1], float("-inf")), attr_logits[:, 1:]],
                     dim=1)


def res5_chunk_for_memory(config: DetectorConfig, device: torch.device, dtype: torch.dtype,
                          share: float = 0.5) -> int:
    """RoIs per res5 call that fit in `share` of the device's free memory.

    Fewer, larger calls keep the Tensor Cores busy (all RoIs in one call: 8.4 -> 7.6 ms per
    image on an H200). Per RoI, a bottleneck block holds at most ~12 maps of the stage's
    output size at once (input, three convs, shortcut, sum, and the allocator's slack).
    """
    free, _ = torch.cuda.mem_get_info(device)
    # Dilation 2 keeps res5 at the pooled size; otherwise its first block has stride 2.
    side = config.pooler_resolution if config.res5_dilation == 2 else -(-config.pooler_resolution // 2)
    channels = stage_channels(config, 5)[0]
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_roi = 12 * channels * side * side * itemsize
    return max(1, int(free * share) // per_roi)
