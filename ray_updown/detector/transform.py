"""Images in, one padded network input out (the GeneralizedRCNN "transform" step).

Caffe's preparation (py-faster-rcnn `prep_im_for_blob`): RGB -> BGR, subtract the pixel means
(no std), scale so the shorter side is `min_size` unless the longer side would exceed
`max_size`, bilinear resize, then zero-pad every image of the batch to the largest one (zero =
the mean colour). Padding is bottom/right so coordinates are unchanged.
"""

from __future__ import annotations

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
    image_sizes: list[tuple[int, int]]  # (h, w) after resizing, before padding
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
    if isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, Tensor):
        array = image.detach().cpu().numpy()
    else:
        raise DataError(f"expected an HxWx3 uint8 array, got {type(image).__name__}", record=index)
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"expected an HxWx3 image, got shape {tuple(array.shape)}", record=index)
    if array.dtype != np.uint8:
        raise DataError(f"expected uint8 pixels, got {array.dtype}", record=index)
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise DataError(f"image too small: {array.shape[1]}x{array.shape[0]}", record=index)
    # Ray Data hands out read-only arrays; torch wants a writable buffer.
    return torch.from_numpy(np.ascontiguousarray(array).copy() if not array.flags.writeable
                            else np.ascontiguousarray(array))


class ImageTransform(nn.Module):
    """RGB uint8 images -> normalised, resized, padded BGR batch (the Caffe test blob)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.min_size = config.min_size
        self.max_size = config.max_size
        self.bgr = config.input_format == "BGR"
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
        return x.to(dtype), (h, w), scale

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
