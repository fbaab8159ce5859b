"""Region-feature store benchmarks. Prints one JSON object.

(b) bytes per image of the Parquet store (shards + index) / bytes per image of the original
    bottom-up-attention TSV of the same regions (target <= 0.4). D = 2048, 10-100 boxes.
(d) peak RSS of a training-style pass (torch Dataset + DataLoader, every image once, random
    order) over a store whose Parquet files are >= 5x a memory budget; reported as growth
    above the process's RSS right before the pass (interpreter + torch + pyarrow + the open
    store and its index), and as the absolute peak.

Synthetic features imitate pooled res5 outputs (means of ReLU activations): per channel c a
fixed scale s_c ~ LogNormal(-1, 0.75) and offset m_c ~ N(-0.4, 0.8); a region's value is
s_c * max(0, m_c + 0.8 z), z ~ N(0, 1): about two thirds exact zeros (the JSON reports the
measured fraction) and a long positive tail. A dense worst case (|N(0,1)| * s_c, no zeros) is
reported too. Boxes are uniform inside a 640x480 image. Each phase runs in its own process
so the RSS high-water mark (VmHWM) measures that phase alone.

    .venv/bin/python benchmarks/feature_store.py [--budget-mb 160] [--ratio-images 200]
        [--arrow-pool system]   # Arrow's system allocator returns freed memory sooner
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

D = 2048


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into a child's ru_maxrss
    # across exec, so a subprocess of a big parent would report the parent's peak.
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def _records(rng: np.random.Generator, first_id: int, n: int, dense: bool = False) -> list:
    from ray_updown.features.records import FeatureRecord

    chan = np.random.default_rng(12345)  # channel statistics shared by all images of a store
    scale = chan.lognormal(-1.0, 0.75, D).astype(np.float32)
    offset = chan.normal(-0.4, 0.8, D).astype(np.float32)
    out = []
    for i in range(n):
        k = int(rng.integers(10, 101))
        z = rng.standard_normal((k, D), dtype=np.float32)
        feats = scale * (np.abs(z) if dense else np.maximum(0.0, offset + 0.8 * z))
        xy = rng.uniform(0, 560, (k, 2)).astype(np.float32)
        wh = rng.uniform(8, 400, (k, 2)).astype(np.float32)
        boxes = np.concatenate([xy, np.minimum(xy + wh, [640, 480])], 1)
        out.append(FeatureRecord(first_id + i, 640, 480, boxes, feats,
                                 object_ids=rng.integers(1, 1601, k), object_conf=rng.uniform(0.2, 1, k),
                                 attr_ids=rng.integers(0, 401, k), attr_conf=rng.uniform(0, 1, k)))
    return out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _write_store(uri: str, n_images: int | None, per_shard: int, seed: int, dense: bool = False,
                 min_bytes: int = 0) -> dict:
    """Write n_images (or shards until the folder holds min_bytes), then the index."""
    from ray_updown.features.reader import build_index
    from ray_updown.features.schema import StoreMeta
    from ray_updown.features.writer import feature_shard_uri, write_feature_shard

    rng = np.random.default_rng(seed)
    meta = StoreMeta(feature_dim=D, detector="synthetic-benchmark")
    zeros = total = boxes = images = shard = 0
    while (images < n_images) if n_images is not None else (_dir_bytes(uri) < min_bytes):
        n = per_shard if n_images is None else min(per_shard, n_images - images)
        recs = _records(rng, images, n, dense)
        zeros += sum(int((r.features == 0).sum()) for r in recs)
        total += sum(r.features.size for r in recs)
        boxes += sum(r.num_boxes for r in recs)
        write_feature_shard(recs, feature_shard_uri(uri, shard), meta)
        images, shard = images + n, shard + 1
    build_index(uri)
    return {"images": images, "zero_fraction": round(zeros / total, 3),
            "mean_boxes": round(boxes / images, 1)}


def bench_ratio(workdir: str, n_images: int, dense: bool) -> dict:
    """(b): same regions, Parquet store vs exported original TSV."""
    from ray_updown.features.tsv import export_tsv

    store = os.path.join(workdir, "ratio_dense" if dense else "ratio")
    stats = _write_store(store, n_images, per_shard=100, seed=1, dense=dense)
    tsv = os.path.join(workdir, "ratio.tsv")
    export_tsv(store, tsv, variant="original")
    parquet_bytes, tsv_bytes = _dir_bytes(store), os.path.getsize(tsv)
    os.remove(tsv)
    return {**stats, "parquet_bytes_per_image": parquet_bytes // n_images,
            "tsv_bytes_per_image": tsv_bytes // n_images,
            "ratio": round(parquet_bytes / tsv_bytes, 3)}


def phase_build(store: str, budget_mb: float, seed: int) -> dict:
    """Write 128-image shards until the store's files hold >= 5x the budget."""
    t0 = time.time()
    stats = _write_store(store, None, per_shard=128, seed=seed, min_bytes=int(5 * budget_mb * 2**20))
    size = _dir_bytes(store)
    return {**stats, "store_mb": round(size / 2**20, 1),
            "store_over_budget": round(size / (budget_mb * 2**20), 2),
            "build_seconds": round(time.time() - t0, 1)}


def phase_pass(store_uri: str, batch_size: int, max_boxes: int) -> dict:
    """One epoch in random order; returns RSS before and at peak."""
    import torch

    from ray_updown.features.reader import FeatureStore

    torch.set_num_threads(1)
    store = FeatureStore(store_uri)
    loader = torch.utils.data.DataLoader(store.to_torch_dataset(max_boxes=max_boxes),
                                         batch_size=batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    before = _rss_mb()
    t0, images, checksum, quarter_peak = time.time(), 0, 0.0, None
    for batch in loader:
        images += batch["features"].shape[0]
        checksum += float(batch["features"].sum() * 1e-6)  # touch every value
        if quarter_peak is None and images >= len(store) // 4:
            quarter_peak = _peak_rss_mb()
    seconds = time.time() - t0
    peak = _peak_rss_mb()
    import pyarrow as pa

    return {"images": images, "batch_size": batch_size, "max_boxes": max_boxes,
            "arrow_memory_pool": pa.default_memory_pool().backend_name,
            "rss_before_pass_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "peak_growth_mb": round(peak - before, 1),
            # Same growth after a quarter of the pass as after all of it: bounded, not O(store).
            "peak_growth_after_first_quarter_mb": round((quarter_peak or peak) - before, 1),
            "images_per_s": round(images / seconds, 1), "checksum": round(checksum, 3)}


def _subprocess(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True,
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-mb", type=float, default=160.0)
    p.add_argument("--arrow-pool", default=None, choices=["mimalloc", "jemalloc", "system"],
                   help="ARROW_DEFAULT_MEMORY_POOL for the pass (default: pyarrow's choice)")
    p.add_argument("--ratio-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--workdir", default=None)
    p.add_argument("--phase", choices=["build", "pass"], help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "build":
        print(json.dumps(phase_build(args.store, args.budget_mb, seed=7)))
        return
    if args.phase == "pass":
        print(json.dumps(phase_pass(args.store, args.batch_size, args.max_boxes)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        t0 = time.time()
        result = {"feature_dim": D, "boxes_per_image": "uniform 10..100",
                  "b_bytes_per_image": bench_ratio(work, args.ratio_images, dense=False),
                  "b_bytes_per_image_dense_worst_case": bench_ratio(work, args.ratio_images // 2, dense=True)}
        store = os.path.join(work, "big")
        build = _subprocess("--phase", "build", "--store", store, "--budget-mb", str(args.budget_mb))
        run = _subprocess("--phase", "pass", "--store", store, "--batch-size", str(args.batch_size),
                          "--max-boxes", str(args.max_boxes),
                          env={"ARROW_DEFAULT_MEMORY_POOL": args.arrow_pool} if args.arrow_pool else None)
        result["d_training_pass_memory"] = {
            "budget_mb": args.budget_mb, "store": build, "pass": run,
            "within_budget": run["peak_growth_mb"] <= args.budget_mb,
            "note": "budget applies to RSS growth during the pass (DataLoader num_workers=0)"}
        result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
        result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
