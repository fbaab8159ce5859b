"""Where a training batch's regions come from, and where they live while training
(the VQA model and the captioner read them the same way).

Two sources give the same batches (tests check equality):

* `FlatRegions`: the node's shared, padding-free copy of the store (features/shared.py):
  a flat [R, D] float16 array plus offsets, mapped read-only by every process on the node.
  A batch is one index_select of its images' regions. On a GPU the flat arrays can be moved
  to the device once (`to`): batches are then gathered there, and the features never cross
  the host-device link again; on the CPU the same code gathers from the mapped pages.
* `StoreRegions`: the store's row-group reader, for stores larger than the node's memory.

Padding is per batch: K = the batch's largest region count, capped at `max_boxes` (images
with more keep their first, i.e. the detector's best-ranked, regions), at least 1. The models
mask padded regions, so K changes nothing but the work done.

`open_regions` picks the source (`feature_access`: "auto", "shared", "store"),
`regions_to_device` moves a flat copy to a GPU when it fits, and `batch_loader` is the
DataLoader over a dataset whose `__getitems__` builds whole batches from such a source.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ray_updown.features.reader import FeatureRecord, FeatureStore, pad_regions
from ray_updown.features.shared import (
    SharedFeatures,
    shared_copy_fits,
    shared_features,
)
from ray_updown.features.spatial import SPATIAL_DIM, spatial_features

log = logging.getLogger(__name__)

FeatureAccess = Literal["auto", "shared", "store"]


def _batch_width(counts: np.ndarray) -> int:
    return max(1, int(counts.max())) if len(counts) else 1


def padded_records(records: Sequence[FeatureRecord], max_boxes: int, spatial: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """feats [B, K, D'] float32 and mask [B, K] bool of store records, K = the batch's largest
    region count capped at `max_boxes` (at least 1); D' = D + 7 when `spatial`."""
    k = min(int(max_boxes), _batch_width(np.asarray([r.num_boxes for r in records])))
    feats, boxes, mask = pad_regions(records, k)
    if spatial:
        w = torch.tensor([float(r.image_w) for r in records])
        h = torch.tensor([float(r.image_h) for r in records])
        feats = torch.cat([feats, spatial_features(boxes, w, h) * mask.unsqueeze(2)], dim=2)
    return feats, mask


class StoreRegions:
    """Regions read batch by batch from the store (row-group cache; bounded memory)."""

    def __init__(self, store: FeatureStore, image_ids: Sequence[Any], max_boxes: int,
                 spatial: bool):
        self.store = store
        self.max_boxes, self.spatial = int(max_boxes), bool(spatial)
        self.feature_dim = store.feature_dim
        self.image_ids = list(dict.fromkeys(image_ids))
        self._row = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.device = torch.device("cpu")
        self.source = "store"

    @property
    def region_dim(self) -> int:
        return self.feature_dim + (SPATIAL_DIM if self.spatial else 0)

    def rows(self, image_ids: Sequence[Any]) -> np.ndarray:
        return np.asarray([self._row[i] for i in image_ids], dtype=np.int64)

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, K, D'] float32 and mask [B, K] bool of these rows' images."""
        records = [self.store.get(self.image_ids[r]) for r in rows]
        return padded_records(records, self.max_boxes, self.spatial)


class FlatRegions:
    """Regions gathered from the flat shared copy, on the host or (after `to`) on a GPU."""

    def __init__(self, shared: SharedFeatures, max_boxes: int, spatial: bool):
        self.shared = shared
        self.max_boxes, self.spatial = int(max_boxes), bool(spatial)
        self.feature_dim = shared.feature_dim
        # Capped region counts stay on the host: K of a batch is known without a device sync.
        self.counts = np.minimum(np.diff(shared.offsets), self.max_boxes)
        self.device = torch.device("cpu")
        self.source = "shared"
        self._host_tensors()

    def _host_tensors(self) -> None:
        with warnings.catch_warnings():  # read-only on purpose: the pages are the node's
            warnings.filterwarnings("ignore", message=".*not writable.*")
            s = self.shared
            self.features = torch.from_numpy(s.features)
            self.boxes = torch.from_numpy(s.boxes)
            self.offsets = torch.from_numpy(s.offsets)
            self.sizes = torch.from_numpy(s.sizes)
        self.count_t = torch.from_numpy(self.counts)

    @property
    def region_dim(self) -> int:
        return self.feature_dim + (SPATIAL_DIM if self.spatial else 0)

    @property
    def nbytes(self) -> int:
        """Bytes a device copy takes (the features and what gathering them needs)."""
        parts = [self.features, self.offsets, self.count_t] + ([self.boxes, self.sizes]
                                                               if self.spatial else [])
        return int(sum(t.numel() * t.element_size() for t in parts))

    def rows(self, image_ids: Sequence[Any]) -> np.ndarray:
        return self.shared.rows(image_ids)

    def to(self, device: torch.device | str) -> "FlatRegions":
        """Copy the flat arrays to `device` once (idempotent); batches are gathered there."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device.type == "cpu":
            self._host_tensors()
        else:
            self.features = self.features.to(device)
            self.offsets = self.offsets.to(device)
            self.count_t = self.count_t.to(device)
            if self.spatial:
                self.boxes, self.sizes = self.boxes.to(device), self.sizes.to(device)
        self.device = device
        return self

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, K, D'] float32 and mask [B, K] bool of these rows' images, on `device`."""
        rows = np.asarray(rows, dtype=np.int64)
        b, k = len(rows), _batch_width(self.counts[rows])
        r = torch.from_numpy(rows).to(self.device, non_blocking=True)
        steps = torch.arange(k, device=self.device)
        mask = steps[None, :] < self.count_t[r][:, None]
        if self.features.shape[0] == 0:  # no region anywhere: nothing to index
            feats = torch.zeros(b, k, self.feature_dim, device=self.device)
            boxes = torch.zeros(b, k, 4, device=self.device)
        else:
            # Padding slots point at row 0 and are zeroed: one index_select, no host loop.
            idx = torch.where(mask, self.offsets[r][:, None] + steps[None, :], 0).reshape(-1)
            feats = self.features.index_select(0, idx).view(b, k, -1).float()
            feats = feats.masked_fill(~mask.unsqueeze(2), 0.0)
            boxes = None
            if self.spatial:
                boxes = self.boxes.index_select(0, idx).view(b, k, 4).masked_fill(~mask.unsqueeze(2), 0.0)
        if self.spatial:
            wh = self.sizes[r].float()
            geometry = spatial_features(boxes, wh[:, 0], wh[:, 1]) * mask.unsqueeze(2)
            feats = torch.cat([feats, geometry], dim=2)
        return feats, mask

    def __getstate__(self) -> dict[str, Any]:
        # Tensors of the mapping are not pickled: the copy reopens its files by path.
        if self.device.type != "cpu":
            raise RuntimeError("FlatRegions on a GPU do not cross process boundaries")
        return {"shared": self.shared, "max_boxes": self.max_boxes, "spatial": self.spatial}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shared"], state["max_boxes"], state["spatial"])


Regions = StoreRegions | FlatRegions


def open_regions(store: FeatureStore, image_ids: Sequence[Any], max_boxes: int, spatial: bool,
                 access: FeatureAccess = "auto", cache_dir: str | None = None) -> Regions:
    """The regions of `image_ids`: the node's shared copy ("shared"; "auto" when it fits the
    cache folder and memory) or the store's row-group reader ("store")."""
    if access == "auto":
        fits, why = shared_copy_fits(store.uri, cache_dir)
        log.info("features of %s: %s -> %s", store.uri, why, "shared copy" if fits else "store reader")
        access = "shared" if fits else "store"
    if access == "shared":
        return FlatRegions(shared_features(store.uri, cache_dir), max_boxes, spatial)
    return StoreRegions(store, image_ids, max_boxes, spatial)


def regions_to_device(regions: Regions, device: torch.device, share: float) -> bool:
    """Move a flat copy to a CUDA device when it takes at most `share` of the device's free
    memory. True when the batches will be gathered on the device."""
    if not isinstance(regions, FlatRegions) or device.type != "cuda" or share <= 0:
        return False
    if regions.device == device:
        return True
    free, _ = torch.cuda.mem_get_info(device)
    if regions.nbytes > share * free:
        log.info("features stay on the host: %.2f GiB > %g of the GPU's free %.2f GiB",
                 regions.nbytes / 2 ** 30, share, free / 2 ** 30)
        return False
    regions.to(device)
    return True


def _whole_batch(batch: Any) -> Any:
    return batch


def batch_loader(dataset: torch.utils.data.Dataset, batches: Sequence[Sequence[int]],
                 num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader of `batches` (lists of indices) from a dataset whose `__getitems__` builds
    a whole batch; loader processes unpickle a flat copy as its path and map the same pages."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches],
                                       num_workers=num_workers, collate_fn=_whole_batch)
