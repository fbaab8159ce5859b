"""Visual Genome-format data for training the bottom-up detector (paper 3.1).

The VG files (image_data.json, objects.json, attributes.json and the two vocabularies) are
read with the data layer (`ray_updown.data.vg`), split as the original create_splits.py (an
image that is also in COCO stays in its Karpathy split, so no captioning/VQA test image is
seen by the detector), and the pictures are decoded once into memory at the detector's input
scale (boxes scaled with them). Training draws equal-sized shards of each global batch on
every Ray Train worker, so DDP steps stay in lockstep, with optional horizontal flips;
evaluation splits a held-out split over the workers and gathers the detections.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from ray_updown import storage
from ray_updown.config import check_at_least, validate_config, validate_fields
from ray_updown.data.coco import coco_split_map, load_karpathy
from ray_updown.data.images import DecodeLimits, ImageDecodeError, decode_image
from ray_updown.data.vg import ClassVocab, VgImage, load_class_vocab, load_visual_genome, split_visual_genome
from ray_updown.detector.roi_heads import DetectionTarget
from ray_updown.errors import ConfigError, DataError
from ray_updown.metrics.detection import DetectionMetrics, evaluate_detections
from ray_updown.train.worker import distributed, shard_batches

if TYPE_CHECKING:
    from ray_updown.detector.model import BottomUpDetector


@dataclass
class DetectorDataConfig:
    """Where the Visual Genome files are. Empty file fields default to `root/visual_genome/…`
    (the synthetic world's layout); relative image urls resolve against `root`."""

    root: str = ""
    image_data: str = ""
    objects: str = ""
    attributes: str = ""
    object_vocab: str = ""
    attribute_vocab: str = ""
    images_dir: str = ""  # real VG: the folder holding the VG_100K*/ files by basename
    # Karpathy dataset_coco.json keeping COCO-shared images in their split: "auto" =
    # root/annotations/dataset_coco.json when it exists, "" = none (seeded split of all).
    karpathy: str = "auto"
    split_ratios: tuple[float, float, float] = (0.9, 0.05, 0.05)
    split_seed: int = 10
    val_split: Literal["train", "val", "test"] = "val"  # scored every epoch
    test_split: Literal["train", "val", "test", ""] = "test"  # scored once at the end; "" = skip
    val_images: int = 0  # 0 = the whole split; n = its first n images
    train_images: int = 0  # 0 = every training image with an object; n = the first n
    hflip: bool = True  # random horizontal flips (every world shape is mirror-symmetric)
    load_threads: int = 16  # parallel image reads (object stores are slow per request)

    def validate(self) -> None:
        validate_fields(self)  # val_split, test_split
        check_at_least(self, 0, "val_images", "train_images")
        check_at_least(self, 1, "load_threads")

    def uri(self, name: str) -> str:
        """The URI of one VG file (the field, or its default under root)."""
        given = getattr(self, name)
        if given:
            return given
        if not self.root:
            raise ConfigError(f"set data.{name} or data.root", record=f"data.{name}")
        default = {"image_data": "image_data.json", "objects": "objects.json",
                   "attributes": "attributes.json", "object_vocab": "objects_vocab.txt",
                   "attribute_vocab": "attributes_vocab.txt"}[name]
        return storage.join(self.root, "visual_genome", default)

    def karpathy_uri(self) -> str | None:
        if self.karpathy == "auto":
            if not self.root:
                return None
            candidate = storage.join(self.root, "annotations", "dataset_coco.json")
            return candidate if storage.exists(candidate) else None
        return self.karpathy or None


@dataclass
class DetectorImage:
    """One decoded training/evaluation image with its ground truth in the decoded frame."""

    image_id: int
    pixels: np.ndarray  # (h, w, 3) uint8 RGB at (about) the detector's input scale
    boxes: np.ndarray  # (n, 4) float32 x1 y1 x2 y2 in `pixels` coordinates
    labels: np.ndarray  # (n,) int64 detector classes (>= 1)
    attributes: list[tuple[int, ...]]  # per object: attribute indices (>= 1), maybe empty

    def target(self, flip: bool = False) -> tuple[np.ndarray, DetectionTarget]:
        """(pixels, DetectionTarget); attributes padded with -1, none = [0] ("no attribute")."""
        pixels, boxes = self.pixels, self.boxes
        if flip:
            width = pixels.shape[1]
            pixels = pixels[:, ::-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                             axis=1) if len(boxes) else boxes
        width = max([len(a) for a in self.attributes] + [1])
        attrs = np.full((len(self.labels), width), -1, dtype=np.int64)
        for i, row in enumerate(self.attributes):
            values = row or (0,)
            attrs[i, :len(values)] = values
        return np.ascontiguousarray(pixels), DetectionTarget(
            torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            torch.from_numpy(self.labels.astype(np.int64)), torch.from_numpy(attrs))

    def ground_truth(self) -> dict:
        """The record `metrics.detection.evaluate_detections` reads."""
        return {"boxes": self.boxes, "labels": self.labels, "attributes": self.attributes}


@dataclass
class DetectorData:
    """Vocabularies and the VG images of each split (metadata; pixels are loaded on demand)."""

    config: DetectorDataConfig
    object_vocab: ClassVocab
    attribute_vocab: ClassVocab
    splits: dict[str, list[VgImage]]

    @classmethod
    def load(cls, config: DetectorDataConfig) -> "DetectorData":
        validate_config(config, "data")
        object_vocab = load_class_vocab(config.uri("object_vocab"))
        attribute_vocab = load_class_vocab(config.uri("attribute_vocab"), "__no_attribute__")
        images = load_visual_genome(config.uri("image_data"), config.uri("objects"),
                                    config.uri("attributes"), object_vocab, attribute_vocab,
                                    root=config.root or None, images_dir=config.images_dir or None)
        karpathy = config.karpathy_uri()
        coco_splits = coco_split_map(load_karpathy(karpathy)) if karpathy else {}
        splits = split_visual_genome(images, coco_splits, tuple(config.split_ratios),
                                     config.split_seed)
        # Training needs at least one object per image; evaluation keeps every image.
        splits["train"] = [im for im in splits["train"] if len(im.labels)]
        if config.train_images:
            splits["train"] = splits["train"][:config.train_images]
        if config.val_images:
            splits[config.val_split] = splits[config.val_split][:config.val_images]
        if not splits["train"]:
            raise DataError("no training image with an object of the vocabulary",
                            file=config.uri("objects"))
        return cls(config, object_vocab, attribute_vocab, splits)

    def check_images(self) -> None:
        """DataError naming the first image file of a used split that does not exist (the
        driver's check: the workers decode the pictures)."""
        used = {"train", self.config.val_split, self.config.test_split} - {""}
        images = [im for split in sorted(used) for im in self.splits[split]]
        missing = set(storage.missing_files([im.path for im in images]))
        absent = [im for im in images if im.path in missing]
        if absent:
            more = f"; {len(absent) - 1} more image file(s) missing" if len(absent) > 1 else ""
            raise DataError(f"no such image file (listed in {self.config.uri('image_data')}){more}",
                            file=absent[0].path, record=f"image_id {absent[0].image_id}")

    @property
    def num_classes(self) -> int:
        return len(self.object_vocab)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_vocab)

    def decode(self, split: str, min_side: int, max_side: int) -> list[DetectorImage]:
        """Pixels of a split at about the detector's input scale (never enlarged)."""
        images = self.splits[split]
        limits = DecodeLimits(min_side=min_side, max_side=max_side)
        with ThreadPoolExecutor(max_workers=self.config.load_threads) as pool:
            return list(pool.map(lambda im: _decode_one(im, limits), images))


def _decode_one(image: VgImage, limits: DecodeLimits) -> DetectorImage:
    try:
        decoded = decode_image(storage.read_bytes(image.path), limits)
    except ImageDecodeError as exc:
        raise DataError(exc.problem, file=image.path, record=f"image_id {image.image_id}") from None
    h, w = decoded.pixels.shape[:2]
    # VG boxes live in image_data.json's frame; scale them with the (reduced) pixels.
    scale = np.array([w / image.width, h / image.height] * 2, dtype=np.float32)
    return DetectorImage(image.image_id, decoded.pixels, image.boxes * scale, image.labels,
                         list(image.attributes))


def flips_for(indices: list[int], epoch: int, step: int, rank: int, seed: int,
              enabled: bool) -> list[bool]:
    """Seeded coin flips (reproducible on resume) for a worker's batch."""
    if not enabled:
        return [False] * len(indices)
    rng = np.random.default_rng([seed, epoch, step, rank, 7])
    return (rng.random(len(indices)) < 0.5).tolist()


def evaluate_split(model: "BottomUpDetector", images: list[DetectorImage], batch_size: int,
                   rank: int = 0, world: int = 1) -> DetectionMetrics:
    """mAP@0.5 and attribute accuracy of `model` on `images` (each worker detects a
    contiguous share; gathered in rank order they are the images' order again)."""
    detections = []
    for indices in shard_batches(len(images), batch_size, rank, world):
        detections += model.detect([images[i].pixels for i in indices])
    if distributed():
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, detections)
        detections = [d for part in gathered for d in part]
    return evaluate_detections(detections, [im.ground_truth() for im in images])
