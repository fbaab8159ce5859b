"""The bottom-up attention detector, composed like torchvision's GeneralizedRCNN.

transform (Caffe blob) -> ResNet C4 trunk (res4, stride 16) -> RPN -> RoI heads (res5, class,
box and attribute heads) -> region selection. In train mode, given targets, the forward returns
the four Faster R-CNN losses plus the attribute loss (paper section 3.1); in eval mode it
returns the per-proposal head outputs. `extract_regions` is what the feature pipeline calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from ray_updown.detector.backbone import ResNetC4Trunk
from ray_updown.detector.boxes import clip_boxes
from ray_updown.detector.config import DetectorConfig
from ray_updown.detector.roi_heads import DetectionTarget, RegionPredictions, RoIHeads
from ray_updown.detector.rpn import RegionProposalNetwork
from ray_updown.detector.select import select_regions
from ray_updown.detector.transform import ImageBatch, ImageTransform
from ray_updown.errors import ConfigError


@dataclass
class ImagePredictions:
    """Eval-mode output for one image: head outputs plus the geometry to undo the resize."""

    regions: RegionPredictions  # boxes in resized-image pixels
    proposal_scores: Tensor  # (R,) RPN objectness of each proposal
    scale: float  # resized / original
    image_size: tuple[int, int]  # original (h, w)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class BottomUpDetector(nn.Module):
    def __init__(self, config: DetectorConfig, object_vocab: list[str] | None = None,
                 attribute_vocab: list[str] | None = None):
        super().__init__()
        config.validate()  # built in code, by a converter or from a checkpoint's JSON
        self.config = config
        self.object_vocab = list(object_vocab) if object_vocab else None
        self.attribute_vocab = list(attribute_vocab) if attribute_vocab else None
        self.checkpoint_hash: str | None = None  # set by load_detector / converters
        self.transform = ImageTransform(config)
        self.backbone = ResNetC4Trunk(config)
        self.rpn = RegionProposalNetwork(config, self.backbone.out_channels)
        self.roi_heads = RoIHeads(config)

    # -- identity ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def config_hash(self) -> str:
        return self.config.hash()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prepare_inference(self, device: str | torch.device = "auto", half: bool = False
                          ) -> "BottomUpDetector":
        """Move to `device` ("auto" = CUDA when present), eval mode, optional float16 (CUDA)."""
        target = pick_device(device)
        if half and target.type != "cuda":
            raise ConfigError("half precision needs a CUDA device", record="half")
        self.to(target)
        if half:
            self.half()
        return self.eval()

    # -- the forward ---------------------------------------------------------------------
    def forward(self, images: list, targets: list[DetectionTarget] | None = None
                ) -> dict[str, Tensor] | list[ImagePredictions]:
        """Train mode with targets: {loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_attr}.
        Otherwise: one ImagePredictions per image."""
        batch = self.transform(images, self.device, self.dtype)
        features, feature_sizes = self.backbone(batch.tensor,
                                                batch.sizes_tensor if batch.padded else None)
        if self.training and targets is not None:
            return self._losses(batch, features, feature_sizes, targets)
        proposals, scores, _ = self.rpn(features, feature_sizes, batch)
        regions = self.roi_heads.predict(features, proposals)
        return [ImagePredictions(r, s, batch.scales[i], batch.original_sizes[i])
                for i, (r, s) in enumerate(zip(regions, scores))]

    def _losses(self, batch: ImageBatch, features: Tensor, feature_sizes: Tensor | None,
                targets: list[DetectionTarget]) -> dict[str, Tensor]:
        if len(targets) != len(batch):
            raise ConfigError(f"{len(targets)} targets for {len(batch)} images", record="targets")
        scaled = [DetectionTarget(t.boxes.to(self.device, torch.float32) * batch.scales[i],
                                  t.labels.to(self.device).long(),
                                  t.attributes.to(self.device).long())
                  for i, t in enumerate(targets)]
        proposals, _, rpn_losses = self.rpn(features, feature_sizes, batch,
                                            [t.boxes for t in scaled])
        return {**rpn_losses, **self.roi_heads.losses(features, proposals, scaled)}

    @torch.no_grad()
    def predict(self, images: list) -> list[ImagePredictions]:
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)

    # -- what the feature pipeline calls -------------------------------------------------
    @torch.no_grad()
    def extract_regions(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """Bottom-up region features of HxWx3 uint8 RGB images (one padded forward).

        Per image: boxes (k, 4) float32 x1 y1 x2 y2 in original pixels (the proposals the
        features were pooled from), features (k, D) float32, object_ids (k,) int32 detector
        class indices (1.., background excluded), object_conf (k,) float32, attr_ids (k,) int32
        attribute indices (1.., "no attribute" excluded), attr_conf (k,) float32, image_w,
        image_h. Regions are chosen by `select_regions` (generate_tsv's rule).
        """
        cfg = self.config
        out = []
        for pred in self.predict(images):
            regions = pred.regions
            boxes = regions.boxes.float() / pred.scale
            class_probs = regions.class_logits.float().softmax(dim=1)
            keep, _ = select_regions(boxes, class_probs, nms_threshold=cfg.select_nms,
                                     conf_threshold=cfg.select_conf, min_boxes=cfg.min_boxes,
                                     max_boxes=cfg.max_boxes, plus_one=cfg.box_plus_one)
            object_conf, object_ids = class_probs[keep, 1:].max(dim=1)
            attr_probs = regions.attr_logits.float().softmax(dim=1)[keep]
            attr_conf, attr_ids = attr_probs[:, 1:].max(dim=1)
            h, w = pred.image_size
            out.append({
                "boxes": boxes[keep].cpu().numpy().astype(np.float32),
                "features": regions.features[keep].float().cpu().numpy(),
                "object_ids": (object_ids + 1).cpu().numpy().astype(np.int32),
                "object_conf": object_conf.cpu().numpy().astype(np.float32),
                "attr_ids": (attr_ids + 1).cpu().numpy().astype(np.int32),
                "attr_conf": attr_conf.cpu().numpy().astype(np.float32),
                "image_w": int(w),
                "image_h": int(h),
            })
        return out

    @torch.no_grad()
    def detect(self, images: list[np.ndarray], score_threshold: float = 0.05,
               nms_threshold: float = 0.3, max_per_image: int = 100) -> list[dict[str, np.ndarray]]:
        """Classic detections (regressed class-specific boxes, per-class NMS) for mAP.

        Per image: boxes (n, 4) original pixels, scores (n,), labels (n,) detector classes,
        attr_ids (n,) and attr_conf (n,) of the region each detection came from.
        """
        cfg = self.config
        results = []
        for pred in self.predict(images):
            r = pred.regions
            probs = r.class_logits.float().softmax(dim=1)
            n, c = probs.shape
            h, w = pred.image_size
            boxes = self.roi_heads.coder.decode(r.box_deltas.float(), r.boxes.float()) / pred.scale
            boxes = clip_boxes(boxes.reshape(-1, 4), h, w, cfg.box_plus_one).reshape(n, c, 4)
            scores = probs[:, 1:]
            region_idx, cls = (scores > score_threshold).nonzero(as_tuple=True)
            cand_scores = scores[region_idx, cls]
            cand_boxes = boxes[region_idx, cls + 1]
            nms_boxes = cand_boxes.clone()
            if cfg.box_plus_one:
                nms_boxes[:, 2:] += 1.0
            keep = batched_nms(nms_boxes, cand_scores, cls, nms_threshold)[:max_per_image]
            attr_probs = r.attr_logits.float().softmax(dim=1)[:, 1:]
            attr_conf, attr_ids = attr_probs.max(dim=1)
            ridx = region_idx[keep]
            results.append({
                "boxes": cand_boxes[keep].cpu().numpy().astype(np.float32),
                "scores": cand_scores[keep].cpu().numpy().astype(np.float32),
                "labels": (cls[keep] + 1).cpu().numpy().astype(np.int32),
                "attr_ids": (attr_ids[ridx] + 1).cpu().numpy().astype(np.int32),
                "attr_conf": attr_conf[ridx].cpu().numpy().astype(np.float32),
            })
        return results
