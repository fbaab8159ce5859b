"""The captioner's data: Karpathy split + caption vocabulary + region-feature store -> batches.

One item is one image with all its reference captions (up to `captions_per_image`), so its
region features are read once per step whatever the objective: cross-entropy (eq. 9) trains on
every caption of the image, SCST (eq. 10-11) scores candidates against all of them. A batch
(`CaptionBatch`) holds the padded regions of its B images and the N captions of those images:

    feats [B, K, D(+7)] float32   region features (+ spatial box features when configured)
    mask  [B, K] bool             True = a real region (images have different region counts)
    caption_image [N] long        the batch row (image) of each caption
    inputs  [N, T] long           BOS, w_1 .. w_{T-1}        (teacher forcing inputs)
    targets [N, T] long           w_1 .. w_n, EOS, PAD ...   (as Vocab.encode writes them)
    image_ids, references         per image: its id and reference captions (tokens joined)

Each worker reads its own share of every batch (`make_loader` over `shard_batches`), the same
number of steps on every worker so that DDP steps stay in lockstep.

Where the regions come from (`feature_access`, features/regions.py, as for VQA): "shared" maps
the node's one padding-free copy of the store (features/shared.py), so N trials or DDP workers
on a node hold the features once, not N times; "store" reads row groups from the store
(stores larger than the node's memory); "auto" picks "shared" when the copy fits the cache
folder and memory. On CUDA the flat copy moves to the GPU when it fits
(`device_features_share`) and batches are gathered there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ray_updown.config import check_at_least, validate_config, validate_fields
from ray_updown.data.coco import CaptionImage, Vocab, build_vocab, images_in_split, load_karpathy
from ray_updown.errors import ConfigError, DataError
from ray_updown.features.reader import FeatureStore
from ray_updown.features.regions import (
    FeatureAccess,
    Regions,
    batch_loader,
    open_regions,
    padded_records,
)
from ray_updown.features.spatial import SPATIAL_DIM

# The splits of Karpathy's dataset_coco.json (data/coco.py KARPATHY_SPLITS) a config may name.
KarpathySplit = Literal["train", "restval", "val", "test"]


@dataclass
class CaptionDataConfig:
    """Where the captions and features are and how they become tensors."""

    # Older configs' `features_in_memory: true` meant one shared copy (config.py replaces it).
    DEPRECATED = {"features_in_memory": lambda on: {"feature_access": "shared"} if on else {}}

    karpathy: str = ""  # dataset_coco.json URI (Karpathy splits)
    features: str = ""  # region-feature store URI (bottom-up regions or grid cells)
    vocab_min_count: int = 5  # paper 3.2: training words seen >= 5 times
    max_len: int = 16  # words per caption (longer captions are clipped; EOS follows)
    max_regions: int = 100  # regions kept per image, the detector's best-ranked first
    spatial: bool = False  # append the 7 spatial box features (features/spatial.py)
    captions_per_image: int = 5  # references per image used as XE targets
    train_splits: list[KarpathySplit] = field(default_factory=lambda: ["train", "restval"])
    val_split: KarpathySplit = "val"
    val_images: int = 100  # images of val_split scored each epoch (greedy CIDEr-D); 0 = none
    train_images: int = 0  # 0 = every training image; n > 0 = the first n (overfit runs)
    # Where batches read regions (module docstring): auto | shared | store.
    feature_access: FeatureAccess = "auto"
    feature_cache_dir: str = ""  # node-local folder of the shared copy; "" = $TMPDIR/ray-updown-features
    device_features_share: float = 0.5  # on CUDA: copy to the GPU when <= this share of free memory
    loader_workers: int = 0  # DataLoader worker processes per Ray Train worker

    def validate(self) -> None:
        validate_fields(self)  # train_splits, val_split
        check_at_least(self, 1, "vocab_min_count", "max_len", "max_regions", "captions_per_image")
        check_at_least(self, 0, "val_images", "train_images", "loader_workers")
        if not 0.0 <= self.device_features_share <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.device_features_share}",
                              record="device_features_share")

    @property
    def spatial_dim(self) -> int:
        return SPATIAL_DIM if self.spatial else 0


def reference_strings(image: CaptionImage) -> list[str]:
    """An image's references as CIDEr-D sees them: lowercase tokens joined by spaces."""
    return [" ".join(tokens) for tokens in image.tokens]


@dataclass
class CaptionData:
    """The Karpathy images by id, the caption vocabulary and the image ids of each use."""

    config: CaptionDataConfig
    vocab: Vocab
    images: dict[int, CaptionImage]
    train_ids: list[int]
    val_ids: list[int]  # the per-epoch validation subset

    @classmethod
    def load(cls, config: CaptionDataConfig, vocab: Vocab | None = None,
             check_features: bool = True) -> "CaptionData":
        """Read the Karpathy file, build the vocabulary from the training splits (paper 3.2)
        unless one is given, and check that every image used has references and features."""
        validate_config(config, "data")
        if not config.karpathy:
            raise ConfigError("no Karpathy file given", record="data.karpathy")
        if not config.features:
            raise ConfigError("no feature store given", record="data.features")
        all_images = load_karpathy(config.karpathy)
        train = images_in_split(all_images, config.train_splits)
        if config.train_images:
            train = train[:config.train_images]
        if not train:
            raise DataError(f"no images in splits {list(config.train_splits)}",
                            file=config.karpathy)
        val = images_in_split(all_images, config.val_split)[:config.val_images]
        for image in train + val:
            if not image.tokens:
                raise DataError("has no reference captions", file=config.karpathy,
                                record=f"image {image.image_id}")
        if vocab is None:
            vocab = build_vocab(train, config.vocab_min_count, splits=config.train_splits)
        data = cls(config, vocab, {im.image_id: im for im in all_images},
                   [im.image_id for im in train], [im.image_id for im in val])
        if check_features:
            store = data.open_store()
            check_features_present(store, data.train_ids + data.val_ids)
        return data

    def split_ids(self, split: str) -> list[int]:
        """Every image id of one Karpathy split, in file order (DataError if unknown)."""
        return [im.image_id for im in images_in_split(self.images.values(), split)]

    def open_store(self) -> FeatureStore:
        return FeatureStore(self.config.features)

    def open_regions(self) -> Regions:
        """The regions of the training and validation images: the node's shared copy or the
        store reader, as `feature_access` says (module docstring)."""
        cfg = self.config
        return open_regions(self.open_store(), self.train_ids + self.val_ids, cfg.max_regions,
                            cfg.spatial, cfg.feature_access, cfg.feature_cache_dir or None)

    def training_references(self) -> list[list[str]]:
        """References of the training images: the corpus of CIDEr-D's document frequencies
        for the SCST reward (eq. 10-11)."""
        return [reference_strings(self.images[i]) for i in self.train_ids]

    def references(self, image_ids: Sequence[int]) -> list[list[str]]:
        return [reference_strings(self.images[i]) for i in image_ids]


def check_features_present(store: FeatureStore, image_ids: Sequence[Any]) -> None:
    """DataError naming the first image without features (and the store's reason, if any)."""
    missing = [i for i in image_ids if i not in store]
    if not missing:
        return
    reason = ""
    for row in store.errors():
        if row.get("image_id") is not None and str(row["image_id"]) == str(missing[0]):
            reason = f" (the extraction failed at {row.get('stage')}: {row.get('reason')})"
            break
    more = f"; {len(missing) - 1} more image(s) lack features too" if len(missing) > 1 else ""
    raise DataError(f"image {missing[0]} has no region features in the store{reason}{more}",
                    file=store.uri, record=f"image {missing[0]}")


@dataclass
class CaptionBatch:
    """B images and the N captions of those images, padded (see the module docstring)."""

    image_ids: list[int]
    feats: Tensor
    mask: Tensor
    caption_image: Tensor
    inputs: Tensor
    targets: Tensor
    references: list[list[str]]

    def to(self, device: torch.device) -> "CaptionBatch":
        return CaptionBatch(self.image_ids, self.feats.to(device), self.mask.to(device),
                            self.caption_image.to(device), self.inputs.to(device),
                            self.targets.to(device), self.references)

    @property
    def num_captions(self) -> int:
        return int(self.targets.shape[0])


def region_tensors(records: Sequence, max_regions: int, spatial: bool) -> tuple[Tensor, Tensor]:
    """(feats [B, K, D(+7)], mask [B, K]) from feature-store records, K = the batch's largest
    region count capped at max_regions (prediction reads records; training, `Regions`)."""
    return padded_records(records, max_regions, spatial)


class CaptionImageDataset(Dataset):
    """Item i = image_ids[i] with its regions and encoded captions; `__getitems__` builds a
    whole CaptionBatch: one gather of the batch's regions, padded to its largest image."""

    def __init__(self, data: CaptionData, regions: Regions, image_ids: Sequence[int]):
        self.data = data
        self.regions = regions
        self.image_ids = list(image_ids)
        self.image_rows = regions.rows(self.image_ids)  # dataset index -> regions row, once

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitems__(self, indices: Sequence[int]) -> CaptionBatch:
        cfg, vocab = self.data.config, self.data.vocab
        images = [self.data.images[self.image_ids[i]] for i in indices]
        feats, mask = self.regions.gather(self.image_rows[list(indices)])
        captions = [(row, vocab.encode(t, cfg.max_len))
                    for row, image in enumerate(images) for t in image.tokens[:cfg.captions_per_image]]
        length = max((len(ids) for _, ids in captions), default=1)  # trim to the batch's longest
        targets = torch.full((len(captions), length), vocab.pad_id, dtype=torch.long)
        for n, (_, ids) in enumerate(captions):
            targets[n, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        inputs = torch.cat([torch.full((len(captions), 1), vocab.bos_id, dtype=torch.long),
                            targets[:, :-1]], dim=1)
        caption_image = torch.tensor([row for row, _ in captions], dtype=torch.long,
                                     device=feats.device)
        return CaptionBatch([im.image_id for im in images], feats, mask, caption_image,
                            inputs.to(feats.device), targets.to(feats.device),
                            [reference_strings(im) for im in images])

    def __getitem__(self, i: int) -> CaptionBatch:
        return self.__getitems__([i])


def make_loader(data: CaptionData, regions: Regions, image_ids: Sequence[int],
                batches: Sequence[Sequence[int]]) -> DataLoader:
    """A loader of CaptionBatches: batch n holds the images `image_ids[i]` for i in
    `batches[n]` (this worker's share of an epoch, from `train.worker.shard_batches`).
    Loader processes (`loader_workers`) map the same shared copy as their trainer."""
    workers = data.config.loader_workers if regions.device.type == "cpu" else 0
    return batch_loader(CaptionImageDataset(data, regions, image_ids), batches, workers)
