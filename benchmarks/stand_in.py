"""A stand-in for the detector of fixed speed: the instrument that measures the pipeline alone.

`StandInModel(rate)` answers `extract_regions(images)` like the paper's detector (36 regions
per image: boxes inside the image, 2,048-d float32 features, object and attribute ids and
confidences) after waiting len(images) / rate seconds in `time.sleep`, which, like a CUDA
forward, does not hold the GIL. Pipeline efficiency is then images/s through `run_extraction`
divided by `rate`: what the read, decode, table building and Parquet writing around the model
cost, measured on any machine, GPU or not.

Its outputs are not features: its name ("stand-in ...") is written into every store it makes,
and it lives here, in benchmarks/, never where a result must come from the detector.
"""

from __future__ import annotations

import time

import numpy as np

REGIONS, FEATURE_DIM = 36, 2048


class StandInModel:
    """Paper-shaped outputs at `rate` images per second (a stand-in, not a detector)."""

    def __init__(self, rate: float, regions: int = REGIONS, feature_dim: int = FEATURE_DIM):
        self.rate, self.regions, self.feature_dim = float(rate), int(regions), int(feature_dim)
        self.name = f"stand-in-{self.rate:g}-images-per-s"
        rng = np.random.default_rng(0)
        corner = rng.uniform(0.0, 0.5, (regions, 2))
        self._unit_boxes = np.concatenate([corner, corner + rng.uniform(0.1, 0.5, (regions, 2))],
                                          axis=1).astype(np.float32)
        # Bounded like res5's post-ReLU means, so float16 storage keeps them finite.
        self._features = rng.uniform(0.0, 4.0, (regions, feature_dim)).astype(np.float32)
        self._ids = rng.integers(1, 1601, regions).astype(np.int32)
        self._attrs = rng.integers(1, 401, regions).astype(np.int32)
        self._conf = rng.uniform(0.2, 1.0, regions).astype(np.float32)

    def extract_regions(self, images: list) -> list[dict]:
        time.sleep(len(images) / self.rate)
        out = []
        for image in images:
            h, w = np.asarray(image).shape[:2]
            out.append({"boxes": self._unit_boxes * np.array([w, h, w, h], np.float32),
                        "features": self._features, "object_ids": self._ids,
                        "object_conf": self._conf, "attr_ids": self._attrs,
                        "attr_conf": self._conf, "image_w": int(w), "image_h": int(h)})
        return out


def write_jpegs(folder: str, count: int, width: int = 640, height: int = 480,
                seed: int = 0) -> None:
    """`count` JPEGs of photo-like content (smooth colour fields and texture), quality 90."""
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (height // 32 + 1, width // 32 + 1, 3)).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        texture = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(smooth, np.float32) + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:012d}.jpg"), quality=90)
