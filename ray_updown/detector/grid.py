"""The ResNet grid baseline (paper section 4.2): a fixed grid instead of bottom-up regions.

The same trunk runs over the whole image, res5 (the detector's own res5 stage, stride 1,
dilation 2) is applied to the full res4 map, and each image's valid part of that final map is
bilinearly resized to g x g (10, 14, 7 or 1). Every cell becomes a region record with the cell's
box in original-image pixels, so downstream code compares regions against grids unchanged.
Grid cells carry no class: object/attribute ids are 0 with confidence 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ray_updown.detector.model import BottomUpDetector
from ray_updown.errors import ConfigError

GRID_SIZES = (1, 7, 10, 14)


def grid_boxes(height: int, width: int, grid: int) -> np.ndarray:
    """(g*g, 4) float32 cell boxes, row-major (top-left cell first)."""
    xs = np.linspace(0.0, float(width), grid + 1, dtype=np.float64)
    ys = np.linspace(0.0, float(height), grid + 1, dtype=np.float64)
    boxes = [[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(grid) for j in range(grid)]
    return np.asarray(boxes, dtype=np.float32)


class GridFeatureExtractor:
    """`extract_regions` with grid cells as regions, sharing a detector's trunk and res5."""

    def __init__(self, detector: BottomUpDetector, grid_size: int = 10):
        if grid_size < 1:
            raise ConfigError(f"grid size must be positive, got {grid_size}", record="grid_size")
        self.detector = detector
        self.grid_size = grid_size

    @property
    def name(self) -> str:
        return f"{self.detector.name}-grid{self.grid_size}"

    @property
    def config_hash(self) -> str:
        return f"{self.detector.config_hash}-g{self.grid_size}"

    @property
    def feature_dim(self) -> int:
        return self.detector.feature_dim

    @torch.no_grad()
    def extract_regions(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        det = self.detector
        was_training = det.training
        det.eval()
        try:
            batch = det.transform(images, det.device, det.dtype)
            sizes = batch.sizes_tensor if batch.padded else None
            res4, sizes4 = det.backbone(batch.tensor, sizes)
            res5, sizes5 = det.roi_heads.res5(res4, sizes4)
        finally:
            det.train(was_training)
        g = self.grid_size
        out = []
        for i in range(len(batch)):
            if sizes5 is None:
                h5, w5 = res5.shape[-2:]
            else:
                h5, w5 = (int(v) for v in sizes5[i].tolist())
            valid = res5[i: i + 1, :, :h5, :w5].float()
            # Antialiased bilinear: downsampling averages instead of skipping cells (1x1 = mean).
            cells = F.interpolate(valid, size=(g, g), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            h, w = batch.original_sizes[i]
            k = g * g
            out.append({
                "boxes": grid_boxes(h, w, g),
                "features": cells.permute(1, 2, 0).reshape(k, -1).cpu().numpy().astype(np.float32),
                "object_ids": np.zeros(k, dtype=np.int32),
                "object_conf": np.zeros(k, dtype=np.float32),
                "attr_ids": np.zeros(k, dtype=np.int32),
                "attr_conf": np.zeros(k, dtype=np.float32),
                "image_w": int(w),
                "image_h": int(h),
            })
        return out
