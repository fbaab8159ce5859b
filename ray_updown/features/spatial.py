"""Spatial box features that downstream models concatenate to region features.

Layout of the last axis (7 values, all relative to the image, no clipping):

    0 x1 / w    1 y1 / h    2 x2 / w    3 y2 / h
    4 (x2 - x1) / w         5 (y2 - y1) / h
    6 (x2 - x1) (y2 - y1) / (w h)          (relative area)

This is the usual encoding of the public Up-Down / LXMERT-style models (normalised corners plus
relative width, height and area). Boxes are x1 y1 x2 y2 in original-image pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPATIAL_DIM = 7


def spatial_features(boxes: Any, image_w: Any, image_h: Any) -> Any:
    """[..., k, 4] boxes -> [..., k, 7] spatial features (numpy in, numpy out; torch in, torch out).

    image_w / image_h are scalars or arrays with the boxes' leading (batch) shape [...].
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but numpy users need not care
        torch = None
    if torch is not None and isinstance(boxes, torch.Tensor):
        w = torch.as_tensor(image_w, dtype=boxes.dtype, device=boxes.device)[..., None]
        h = torch.as_tensor(image_h, dtype=boxes.dtype, device=boxes.device)[..., None]
        stack = torch.stack
    else:
        boxes = np.asarray(boxes, dtype=np.float32)
        w = np.asarray(image_w, dtype=np.float32)[..., None]
        h = np.asarray(image_h, dtype=np.float32)[..., None]
        stack = np.stack
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates on the last axis, got shape {tuple(boxes.shape)}")
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    bw, bh = x2 - x1, y2 - y1
    return stack([x1 / w, y1 / h, x2 / w, y2 / h, bw / w, bh / h, (bw * bh) / (w * h)], -1)
