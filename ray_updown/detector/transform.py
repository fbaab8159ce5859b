"""Images in, one padded network input out (the GeneralizedRCNN "transform" step).

Caffe's preparation (py-faster-rcnn `prep_im_for_blob`): RGB -> BGR, subtract the pixel means
(no std), scale so the shorter side is `min_size` unless the longer side would exceed
`max_size`, bilinear resize, then zero-pad every image of the batch to the largest one (zero =
the mean colour). Padding is bottom/right so coordinates are unchanged.

The resized size follows the config's `resize_rule` (`resized_size`): Caffe (and MILVLG) cap
the scale when the *rounded* long side would exceed `max_size` and round each side half to
even (cv2.resize rounds `side x fx` with cvRound, like Python's `round`); detectron2's
ResizeShortestEdge (py-bottom-up-attention, the Hugging Face FRCNN) sets the short side to
`min_size`, caps on the *unrounded* long side and rounds with `int(x + 0.5)`. They differ on
half-way sides (403 x 1.5 = 604.5: Caffe 604, detectron2 605) and near the cap.

`resize_interpolation`: "bilinear" resizes the mean-subtracted float image without
antialiasing, as cv2.resize (Caffe, MILVLG) and the Hugging Face FRCNN's F.interpolate do;
"pil" follows py-bottom-up-attention's ResizeTransform, which resizes the 8-bit image with
PIL's bilinear filter (antialiased when shrinking) in two passes, width then height, each
rounded to 8-bit pixels: torch's antialiased bilinear resize per pass, rounded the same way.
PIL's fixed-point weights still differ in the last bit, so a few pixels land one grey level
away (at most two on exact 1.25x enlargements of noise; 0.1-1% of pixels for usual scales).

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


def resized_size(height: int, width: int, min_size: int, max_size: int, rule: str
                 ) -> tuple[float, int, int]:
    """(scale, new_h, new_w) of an image under a `resize_rule` (module docstring)."""
    if rule == "caffe":
        scale = caffe_scale(height, width, min_size, max_size)
        return scale, int(round(height * scale)), int(round(width * scale))
    # detectron2 ResizeShortestEdge.get_transform, step for step (the float order matters
    # on half-way sides).
    scale = min_size * 1.0 / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        cap = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w, scale = new_h * cap, new_w * cap, scale * cap
    return scale, int(new_h + 0.5), int(new_w + 0.5)


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
        self.resize_rule = config.resize_rule
        self.pil_resize = config.resize_interpolation == "pil"
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
        mean = torch.tensor(self.pixel_mean, device=device, dtype=torch.float32).view(3, 1, 1)
        scale, new_h, new_w = resized_size(h, w, self.min_size, self.max_size, self.resize_rule)
        new_h, new_w = max(1, new_h), max(1, new_w)
        resize = (new_h, new_w) != (h, w)
        if self.pil_resize:
            # PIL resizes the 8-bit image (antialiased when shrinking) in two passes, width
            # then height, each returning 8-bit pixels (rounded half up, its fixed-point rule).
            for size in ((h, new_w), (new_h, new_w)) if resize else ():
                x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                                  antialias=True)[0].add(0.5).floor().clamp(0, 255)
            x = x - mean
        else:
            x = x - mean
            if resize:
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
