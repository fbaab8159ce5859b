"""Images in, one padded network input out (the GeneralizedRCNN "transform" step).

Caffe's preparation (py-faster-rcnn `prep_im_for_blob`): RGB -> BGR, subtract the pixel means
(no std), scale so the shorter side is `min_size` unless the longer side would exceed
`max_size`, bilinear resize, then zero-pad every image of the batch to the largest one (zero =
the mean colour). Padding is bottom/right so coordinates are unchanged.

Extreme aspect ratios. The longer-side cap wins, so a 3x2500 strip scales to about 1x1000 at
the paper's 600/1000: too thin for the trunk (a 1-pixel side leaves nothing after its stride-2
stem and max-pool) and for the RPN, which drops proposals under `rpn_min_size` original pixels.
Such an image gets a canvas: a resized side under the detector's minimum is zero-padded (after
the mean subtraction, so the padding is the mean colour, as Caffe pads a batch) up to that
minimum, bottom/right, so boxes stay in the image's own frame; callers clip them to the
original size. The minimum is one res4 cell (`feature_stride`, 16 px) and at least
`rpn_min_size` original pixels, so the RPN can propose a box across the thin side.
`image_sizes` are these canvas sizes: the backbone and RPN treat the padding as part of that
image, and a padded image gives the same result alone as in any batch. An image whose resized
sides both reach the minimum is untouched: its result is exactly what it was without this rule.
The resize itself never refuses an image; the extraction pipeline refuses aspect ratios beyond
`max_aspect_ratio` (1:1000 by default) when it decodes, where a side would shrink below one
pixel of content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_updown.detector.config import DetectorConfig
from ray_updown.errors import DataError


@dataclass
class ImageBatch:
    """A padded batch: `tensor` (N, 3, H, W) plus each image's resized and original size."""

    tensor: Tensor
    # (h, w) of each image's canvas: its resized size, a side under the detector's minimum
    # padded up to it (module docstring); the batch's padding to the largest image comes after.
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]  # (h, w) as given
    scales: list[float]  # resized / original

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def sizes_tensor(self) -> Tensor:
        """(N, 2) long tensor of the valid (h, w) of each image in the padded tensor."""
        return torch.tensor(self.image_sizes, dtype=torch.long, device=self.tensor.device)

    @property
    def padded(self) -> bool:
        h, w = self.tensor.shape[-2:]
        return any(s != (h, w) for s in self.image_sizes)


def caffe_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The Caffe test scale: shorter side to `min_size`, longer side at most `max_size`."""
    short, long = min(height, width), max(height, width)
    scale = float(min_size) / float(short)
    if round(scale * long) > max_size:
        scale = float(max_size) / float(long)
    return scale


def _as_hwc_uint8(image: object, index: int) -> Tensor:
    """Check an HxWx3 uint8 image; a tensor stays where it is (a GPU upload is not undone)."""
    if not isinstance(image, (np.ndarray, Tensor)):
        raise DataError(f"expected an HxWx3 uint8 array, got {type(image).__name__}",
                        record=f"image {index}")
    shape = tuple(image.shape)
    if len(shape) != 3 or shape[2] != 3:
        raise DataError(f"expected an HxWx3 image, got shape {shape}", record=f"image {index}")
    if image.dtype not in (np.uint8, torch.uint8):
        raise DataError(f"expected uint8 pixels, got {image.dtype}", record=f"image {index}")
    if shape[0] < 1 or shape[1] < 1:
        raise DataError(f"image has no pixels ({shape[1]}x{shape[0]})", record=f"image {index}")
    if isinstance(image, Tensor):
        return image.detach()
    # Ray Data hands out read-only arrays; torch wants a writable buffer.
    return torch.from_numpy(np.ascontiguousarray(image).copy() if not image.flags.writeable
                            else np.ascontiguousarray(image))


class ImageTransform(nn.Module):
    """RGB uint8 images -> normalised, resized, padded BGR batch (the Caffe test blob)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.min_size = config.min_size
        self.max_size = config.max_size
        self.bgr = config.input_format == "BGR"
        self.min_canvas_side = config.feature_stride
        self.rpn_min_size = float(config.rpn_min_size)
        # Kept as floats, not a buffer: a half-precision model must still subtract exact means.
        self.pixel_mean = tuple(float(m) for m in config.pixel_mean)

    def prepare(self, image: object, index: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[Tensor, tuple[int, int], float]:
        pixels = _as_hwc_uint8(image, index).to(device)
        h, w = int(pixels.shape[0]), int(pixels.shape[1])
        x = pixels.permute(2, 0, 1).to(torch.float32)
        if self.bgr:
            x = x.flip(0)
        x = x - torch.tensor(self.pixel_mean, device=device, dtype=torch.float32).view(3, 1, 1)
        scale = caffe_scale(h, w, self.min_size, self.max_size)
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear",
                              align_corners=False)[0]
        canvas_h, canvas_w = self.canvas_side(new_h, scale), self.canvas_side(new_w, scale)
        if (canvas_h, canvas_w) != (new_h, new_w):
            x = F.pad(x, (0, canvas_w - new_w, 0, canvas_h - new_h))  # zero = the mean colour
        return x.to(dtype), (h, w), scale

    def canvas_side(self, side: int, scale: float) -> int:
        """A resized side, or the detector's minimum when it is shorter (module docstring)."""
        if side >= self.min_canvas_side:
            return side
        # The RPN keeps boxes of at least rpn_min_size original pixels: one across the padded
        # side must be possible. Capped at max_size so a tiny image cannot blow up memory.
        need = max(self.min_canvas_side, math.ceil(self.rpn_min_size * scale))
        return max(side, min(need, self.max_size))

    def forward(self, images: list, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> ImageBatch:
        if len(images) == 0:
            raise DataError("no images given")
        device = torch.device(device)
        prepared = [self.prepare(img, i, device, dtype) for i, img in enumerate(images)]
        max_h = max(p[0].shape[1] for p in prepared)
        max_w = max(p[0].shape[2] for p in prepared)
        batch = prepared[0][0].new_zeros((len(prepared), 3, max_h, max_w))
        for i, (x, _, _) in enumerate(prepared):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return ImageBatch(
            tensor=batch,
            image_sizes=[(int(p[0].shape[1]), int(p[0].shape[2])) for p in prepared],
            original_sizes=[p[1] for p in prepared],
            scales=[p[2] for p in prepared],
        )
