"""Where the captioner's regions live while training (captioning/data.py over
features/regions.py): the node's shared copy gives the same batches and the same training as
the store reader, loader processes map it instead of copying it, and the older
`features_in_memory` switch still means what it said."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch
from test_train_captioner import build_toy_world, toy_config

from ray_updown.captioning.data import CaptionData, CaptionDataConfig, make_loader
from ray_updown.captioning.train import run_captioner_loop
from ray_updown.config import from_dict
from ray_updown.errors import ConfigError
from ray_updown.features.regions import FlatRegions, StoreRegions
from ray_updown.train.session import LocalSession
from ray_updown.train.worker import shard_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_toy_world(str(tmp_path_factory.mktemp("toy")))


def _data(world, cache, access, **kwargs) -> CaptionData:
    return CaptionData.load(CaptionDataConfig(
        karpathy=world[0], features=world[1], vocab_min_count=2, max_len=6, val_images=6,
        feature_access=access, feature_cache_dir=str(cache), **kwargs))


@pytest.mark.parametrize("spatial", [False, True])
def test_batches_from_the_shared_copy_equal_the_store_readers(world, tmp_path, spatial):
    shared = _data(world, tmp_path / "cache", "shared", spatial=spatial, max_regions=3)
    store = _data(world, tmp_path / "cache", "store", spatial=spatial, max_regions=3)
    flat, reader = shared.open_regions(), store.open_regions()
    assert isinstance(flat, FlatRegions) and isinstance(reader, StoreRegions)
    batches = shard_batches(len(shared.train_ids), 8, rank=0, world=1, seed=3)
    pairs = zip(make_loader(shared, flat, shared.train_ids, batches),
                make_loader(store, reader, store.train_ids, batches))
    widths = set()
    for a, b in pairs:
        assert a.image_ids == b.image_ids and a.references == b.references
        # per-batch padding: K = the batch's largest count (<= max_regions), same on both
        assert a.feats.shape == b.feats.shape and a.feats.shape[1] <= 3
        assert torch.equal(a.feats, b.feats) and torch.equal(a.mask, b.mask)
        for name in ("caption_image", "inputs", "targets"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        widths.add(a.feats.shape[1])
    assert widths  # the loaders were not empty


def test_loader_processes_map_the_copy_instead_of_copying_it(world, tmp_path):
    data = _data(world, tmp_path / "cache", "shared", loader_workers=2)
    regions = data.open_regions()
    # What a loader process receives is the copy's folder, not its arrays.
    assert len(pickle.dumps(regions)) < 1000 < regions.shared.features.nbytes
    loader = make_loader(data, regions, data.train_ids, [[0, 1, 2], [3, 4, 5]])
    assert loader.num_workers == 2
    assert [b.image_ids for b in loader] == [data.train_ids[:3], data.train_ids[3:6]]


def test_training_on_the_shared_copy_equals_training_on_the_store(world, tmp_path):
    cache = tmp_path / "cache"
    losses = {}
    for access in ("store", "shared"):
        cfg = toy_config(*world, tmp_path / access, num_workers=1, epochs=1, seed=5)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, feature_access=access, feature_cache_dir=str(cache)))
        session = LocalSession(str(tmp_path / access / "local"))
        run_captioner_loop(cfg, session)
        (metrics, _), = session.reports
        losses[access] = (metrics["loss"], metrics["val_cider_d"])
    assert losses["shared"] == pytest.approx(losses["store"], rel=1e-5)
    # The shared run built one copy of the store in the cache folder (none for "store").
    assert len([n for n in os.listdir(cache) if not n.endswith(".lock")]) == 1


def test_features_in_memory_of_older_configs(world, tmp_path):
    """Older configs' switch is replaced by what it meant, and contradicting it is refused."""
    assert from_dict(CaptionDataConfig, {"features_in_memory": True}).feature_access == "shared"
    assert from_dict(CaptionDataConfig, {"features_in_memory": False}).feature_access == "auto"
    with pytest.raises(ConfigError, match="features_in_memory = true contradicts feature_access = store"):
        from_dict(CaptionDataConfig, {"feature_access": "store", "features_in_memory": True})
    with pytest.raises(ConfigError, match="device_features_share"):
        _data(world, tmp_path, "auto", device_features_share=2.0)
