"""Detector throughput and peak memory: the paper's configuration and the demo's, batch 1 vs batched.

    python benchmarks/detector.py                      # paper: 2 images; demo: 16 images
    python benchmarks/detector.py --paper-images 4 --demo-batch 8 --device cuda --half

Measures `BottomUpDetector.extract_regions` (trunk, RPN, 300 RoIs through res5, region
selection) with random weights: ResNet-101 at 600x1000 (the paper's input size) and the
synthetic world's narrow ResNet-18 at 128 px. Each case runs in a fresh process so its peak
resident memory (or peak CUDA memory) is its own. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time


def _rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_case(case: dict, queue: mp.Queue) -> None:
    import numpy as np
    import torch

    from ray_updown.detector import BottomUpDetector, paper_config, world_config

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    if case["config"] == "paper":
        config = paper_config()
    else:
        config = world_config(num_classes=case["num_classes"], num_attributes=case["num_attributes"])
    model = BottomUpDetector(config).prepare_inference(case["device"], half=case["half"])
    device = model.device
    rng = np.random.default_rng(0)
    h, w = case["image_size"]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(case["images"])]
    if case["warmup"]:
        model.extract_regions(images[: case["batch"]])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    start = time.perf_counter()
    regions = 0
    for i in range(0, len(images), case["batch"]):
        out = model.extract_regions(images[i: i + case["batch"]])
        regions += sum(len(r["boxes"]) for r in out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = dict(case, device=str(device), torch_threads=torch.get_num_threads(), seconds=round(seconds, 3),
                  images_per_s=round(len(images) / seconds, 4),
                  mean_regions=round(regions / len(images), 1),
                  feature_dim=config.feature_dim, params_m=round(
                      sum(p.numel() for p in model.parameters()) / 1e6, 2),
                  rss_before_forward_mb=round(before, 1), peak_rss_mb=round(_rss_mb(), 1))
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    queue.put(result)


def run_isolated(case: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_case, args=(case, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return dict(case, error=f"exit code {proc.exitcode}")
    return queue.get()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--half", action="store_true", help="float16 (CUDA only)")
    parser.add_argument("--paper-images", type=int, default=2,
                        help="images at 600x1000 through ResNet-101 (~20 s each on 2 CPU cores)")
    parser.add_argument("--paper-batch", type=int, default=2)
    parser.add_argument("--demo-images", type=int, default=16)
    parser.add_argument("--demo-batch", type=int, default=8)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)

    cases = []
    if not args.skip_paper and args.paper_images > 0:
        for batch in sorted({1, args.paper_batch}):
            cases.append(dict(config="paper", image_size=[600, 1000], images=args.paper_images,
                              batch=batch, warmup=False))
    for batch in sorted({1, args.demo_batch}):
        cases.append(dict(config="demo", image_size=[128, 170], images=args.demo_images,
                          batch=batch, warmup=True, num_classes=21, num_attributes=11))
    for case in cases:
        case.update(device=args.device, half=args.half, threads=args.threads)

    import torch

    report = {
        "benchmark": "detector.extract_regions",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": sys.version.split()[0],
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": [run_isolated(c) for c in cases],
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
