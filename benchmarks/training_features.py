"""The features harness that benchmarks/vqa.py and benchmarks/captioner.py share: where the
features live while a model trains (features/shared.py, features/regions.py), measured on
synthetic stores.

* `write_synthetic_store`: a store of images x 36 x 2048 float16 ReLU-like features;
* `pss_benchmark`: PSS (from /proc/<pid>/smaps_rollup, not RSS) of N concurrent "trials"
  (processes running a script's `--pss-child`, built from `trial_regions` and
  `serve_until_stdin`), mapping the node's one shared copy or each holding its own;
* `loader_throughput` / `timed_loader`: shuffled images/s of a DataLoader, timed from its
  first batch, from the store's row-group reader and from the shared copy.

Not a benchmark of its own: the two scripts import it (`make bench` runs it as a no-op).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

REGIONS, FEAT_DIM = 36, 2048  # the paper's regions per image and feature size


def write_synthetic_store(root: str, images: int, k: int = REGIONS, dim: int = FEAT_DIM,
                          seed: int = 0, per_shard: int = 1000) -> str:
    """A store of `images` x k x dim float16 ReLU-like features (random: the figures are
    about bytes moved, not what the model learns)."""
    from ray_updown.features.records import FeatureRecord
    from ray_updown.features.schema import StoreMeta
    from ray_updown.features.writer import feature_shard_uri, write_feature_shard

    rng = np.random.default_rng(seed)
    boxes = np.tile(np.array([[10, 20, 110, 220]], np.float32), (k, 1))
    for shard, start in enumerate(range(0, images, per_shard)):
        records = [FeatureRecord(i, 640, 480, boxes,
                                 np.maximum(rng.standard_normal((k, dim), np.float32), 0).astype(np.float16))
                   for i in range(start, min(images, start + per_shard))]
        write_feature_shard(records, feature_shard_uri(root, shard), StoreMeta(feature_dim=dim))
    return root


PSS_MODES = ("shared", "own")  # map the node's copy / hold a private copy of its arrays


def trial_regions(path: str, mode: str, max_boxes: int = REGIONS):
    """A PSS trial's regions: the shared copy mapped ("shared"), or its arrays read into this
    process's own memory ("own": what every trial held before there was one copy per node)."""
    from ray_updown.features.regions import FlatRegions
    from ray_updown.features.shared import SharedFeatures

    copy = SharedFeatures(path)
    if mode == "own":  # private pages; dropping the memmaps unmaps the file
        copy.features, copy.boxes = np.array(copy.features), np.array(copy.boxes)
    return FlatRegions(copy, max_boxes, False)


def serve_until_stdin(work) -> None:
    """Run a PSS trial's `work()`, say "ready", then wait on stdin while measured, holding
    what the work returned (its regions and model)."""
    torch.set_num_threads(1)
    held = work()
    print("ready", flush=True)
    sys.stdin.readline()
    del held


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def pss_trials(command: list[str], feature_file: str, trials: int, mode: str) -> dict:
    """PSS of `trials` concurrent processes running `command` (a script's --pss-child)."""
    from ray_updown.memory import pss_bytes

    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(trials)]
    try:
        if [p.stdout.readline().strip() for p in procs] != ["ready"] * trials:
            raise RuntimeError("a PSS trial process failed")
        pss = [pss_bytes(p.pid) for p in procs]
        features = [pss_bytes(p.pid, feature_file) for p in procs]
        rss = [_rss(p.pid) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    mib = 2 ** 20
    return {"trials": trials, "features": mode, "pss_total_mib": round(sum(pss) / mib, 1),
            "pss_features_total_mib": round(sum(features) / mib, 1),
            "pss_rest_per_trial_mib": round((sum(pss) - sum(features)) / trials / mib, 1),
            "rss_total_mib": round(sum(rss) / mib, 1)}


def pss_benchmark(root: str, images: int, script: str, batch: int = 64,
                  trials: tuple[int, ...] = (1, 4)) -> dict:
    """PSS of 1 and 4 concurrent trials (`script --pss-child`) mapping one shared copy (the
    features count once) or each holding its own (they count once per trial)."""
    from ray_updown.features.shared import shared_features

    store = write_synthetic_store(os.path.join(root, "pss-store"), images)
    copy = shared_features(store, os.path.join(root, "cache"))
    feature_file = os.path.join(copy.path, "features.npy")
    mib = 2 ** 20

    def command(mode: str) -> list[str]:
        return [sys.executable, script, "--pss-child", copy.path, "--pss-mode", mode,
                "--batch", str(batch)]

    return {"images": images, "regions_per_image": REGIONS, "feat_dim": FEAT_DIM,
            "shared_copy_mib": round(copy.nbytes / mib, 1),
            "features_mib": round(copy.features.nbytes / mib, 1),
            "per_trial_padded_copy_before_mib": round(images * 100 * FEAT_DIM * 2 / mib, 1),
            "runs": [pss_trials(command(mode), feature_file, n, mode)
                     for mode in PSS_MODES for n in trials]}


class _ImageBatches(torch.utils.data.Dataset):
    """Batches of images from a regions source (what a VQA batch gathers)."""

    def __init__(self, regions, images: int):
        self.regions, self.images = regions, images

    def __len__(self) -> int:
        return self.images

    def __getitems__(self, idx):
        return self.regions.gather(np.asarray(idx))


def loader_throughput(store: str, cache: str, images: int, workers: list[int], batch: int,
                      max_images: dict[str, int]) -> list[dict]:
    """Shuffled images/s through a DataLoader from the store reader and the shared copy."""
    from ray_updown.features.reader import FeatureStore
    from ray_updown.features.regions import FlatRegions, StoreRegions
    from ray_updown.features.shared import shared_features

    fs = FeatureStore(store)
    sources = {"store_reader": StoreRegions(fs, fs.image_ids, REGIONS, False),
               "shared_copy": FlatRegions(shared_features(store, cache), REGIONS, False)}
    out = []
    for name, regions in sources.items():
        # Shuffled passes over the store up to max_images; timed from the first batch, so
        # that worker start-up (reported apart) is not counted as reading.
        order = np.resize(np.random.default_rng(0).permutation(images), max_images[name])
        batches = [order[i:i + batch].tolist() for i in range(0, len(order), batch)]
        for w in workers:
            loader = torch.utils.data.DataLoader(_ImageBatches(regions, images), batch_sampler=batches,
                                                 num_workers=w, collate_fn=lambda b: b)
            out.append({"source": name, **timed_loader(loader, w, lambda b: len(b[0]))})
    return out


def timed_loader(loader, workers: int, images_of) -> dict:
    """Images/s of one pass over `loader`, timed from its first batch (worker start-up, given
    apart, is not reading); `images_of(batch)` counts a batch's images."""
    started = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter()
    seen = sum(images_of(b) for b in it)
    seconds = time.perf_counter() - first
    return {"loader_workers": workers, "images": seen, "startup_s": round(first - started, 2),
            "seconds": round(seconds, 2), "images_per_s": round(seen / seconds, 1),
            "images_per_s_per_process": round(seen / seconds / max(workers, 1), 1)}
