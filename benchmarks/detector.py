"""Detector throughput: stage breakdown, images/s by batch and precision, FLOPs, fidelity.

    python benchmarks/detector.py                  # this machine's device; CPU: a short run
    python benchmarks/detector.py --paper-images 64 --batches 1 8 32   # a GPU run

Measures `BottomUpDetector.extract_regions` (transform, trunk, RPN, 300 RoIs through res5,
region selection, the copy to the host) with random weights, prepared as extraction prepares
it (`prepare_inference`: BN folded; on CUDA channels_last, cuDNN autotuning). Two
configurations: the paper's ResNet-101 on 480x640 images (resized to 600x800) and the synthetic
world's narrow ResNet-18 at 128 px. Reports, as one JSON document:

- ms per image of each stage (`extract_regions(timer=...)`; CUDA is synchronised around each);
- images/s at each batch size, fp32 and (CUDA) fp16;
- FLOPs per image (torch's FlopCounterMode, once) and the achieved share of `--peak-tflops`;
- on CUDA: fp16 against fp32 on the same images (share of images selecting the same regions,
  per-region cosine of their features), and whether the fused Triton scan equals the torch one.

Each configuration runs in a fresh process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict

# Dense bf16 matrix-product rate measured on the H200 of design.md (not the datasheet figure).
KNOWN_PEAK_TFLOPS = {"H200": 790.0}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class StageClock:
    """A `timer` for extract_regions: wall time per stage, the device synchronised around it."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[stage] += time.perf_counter() - start


def _model(case: dict, half: bool, greedy_scan: str = "torch", compile_mode: str = ""):
    import torch

    from ray_updown.detector import BottomUpDetector, paper_config, world_config

    torch.manual_seed(0)
    config = (paper_config() if case["config"] == "paper"
              else world_config(num_classes=21, num_attributes=11))
    model = BottomUpDetector(config)
    with torch.no_grad():  # separated scores, as a trained model gives (random heads are flat)
        model.roi_heads.predictor.cls_score.weight.normal_(0, 0.05)
    if compile_mode:  # (benchmarks/gpu_check.py)
        return model.prepare_inference(case["device"], half=half, greedy_scan=greedy_scan,
                                       compile_mode=compile_mode)
    if greedy_scan != "torch":
        return model.prepare_inference(case["device"], half=half, greedy_scan=greedy_scan)
    return model.prepare_inference(case["device"], half=half)  # also what older versions take


def _images(case: dict, count: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = case["image_size"]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]


def _throughput(model, images, batch: int, sync, warm_up: bool) -> float:
    if warm_up:  # cuDNN autotuning, the caching allocator, kernel compilation
        model.extract_regions(images[:batch])
        sync()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        model.extract_regions(images[i: i + batch])
    sync()
    return len(images) / (time.perf_counter() - start)


def _flops_per_image(model, image) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.extract_regions([image])
    return float(counter.get_total_flops())


def compare_regions(reference: list[dict], other: list[dict]) -> dict:
    """Two runs' extract_regions outputs on the same images: the share of images selecting
    the same regions (boxes within 0.5 px), and over those the per-region cosine of the
    features (min, mean) and the largest absolute feature difference."""
    import numpy as np

    same, cosines, diffs = 0, [], []
    for a, b in zip(reference, other):
        if a["boxes"].shape == b["boxes"].shape and np.allclose(a["boxes"], b["boxes"], atol=0.5):
            same += 1
            fa, fb = a["features"].astype(np.float64), b["features"].astype(np.float64)
            norms = np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)
            cosines.extend(((fa * fb).sum(axis=1) / np.maximum(norms, 1e-12)).tolist())
            diffs.append(float(np.abs(fa - fb).max()) if fa.size else 0.0)
    return {"images": len(reference), "same_regions_share": round(same / max(1, len(reference)), 4),
            "cosine_min": round(min(cosines), 7) if cosines else None,
            "cosine_mean": round(float(np.mean(cosines)), 7) if cosines else None,
            "max_feature_abs_diff": round(max(diffs), 6) if diffs else None}


def _fidelity(case: dict, images) -> dict:
    """fp16 against fp32 on the same images."""
    return compare_regions(_model(case, half=False).extract_regions(images),
                           _model(case, half=True).extract_regions(images))


def _scan_check(case: dict, images) -> dict:
    """The fused Triton scan against the torch scan: same regions, and each one's time."""
    import numpy as np

    out = {}
    for scan in ("torch", "triton"):
        model = _model(case, half=True, greedy_scan=scan)
        model.extract_regions(images)  # warm-up: Triton compiles its kernel on the first call
        clock = StageClock(model.device)
        regions = model.extract_regions(images, timer=clock)
        out[scan] = (regions, 1000 * clock.seconds["selection"] / len(images))
    equal = all(np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(out["torch"][0], out["triton"][0]))
    return {"greedy_scan_triton_equal": equal,
            "selection_ms_torch": round(out["torch"][1], 3),
            "selection_ms_triton": round(out["triton"][1], 3)}


def decode_rate(count: int = 48) -> dict:
    """JPEG 480x640 decode (the read/decode stage's per-image work) on one core: how many
    cores per GPU it takes to feed a given detector rate."""
    import io

    import numpy as np
    from PIL import Image

    from ray_updown.data.images import DecodeLimits, decode_image

    rng = np.random.default_rng(0)
    # Smooth content compresses like a photograph; noise would make JPEG decode unusually slow.
    ramp = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
    files = []
    for _ in range(count):
        pixels = np.clip(ramp + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    limits = DecodeLimits(min_side=600, max_side=1000)
    start = time.perf_counter()
    for data in files:
        decode_image(data, limits)
    rate = count / (time.perf_counter() - start)
    return {"jpeg_480x640_per_s_one_core": round(rate, 1),
            "cores_to_feed_100_images_per_s": int(-(-100 // rate))}


def _run_case(case: dict, queue) -> None:
    import torch

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    result = dict(case)
    try:
        from ray_updown.devices import pick_device

        cuda = pick_device(case["device"]).type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        precisions = ["fp32", "fp16"] if cuda else ["fp32"]
        images = _images(case, case["images"])
        rates = {}
        for precision in precisions:
            model = _model(case, half=precision == "fp16")
            result["device"] = str(model.device)
            for batch in case["batches"]:
                rates[f"{precision}_batch{batch}"] = round(
                    _throughput(model, images, batch, sync, warm_up=cuda), 3)
            if case["throughput_only"]:
                continue
            clock = StageClock(model.device)  # the stage breakdown at the largest batch
            batch = max(case["batches"])
            for i in range(0, len(images), batch):
                model.extract_regions(images[i: i + batch], timer=clock)
            result[f"stage_ms_per_image_{precision}_batch{batch}"] = {
                stage: round(1000 * s / len(images), 3) for stage, s in clock.seconds.items()}
        result["images_per_s"] = rates
        if case["throughput_only"]:
            queue.put(result)
            return
        result["flops_per_image"] = _flops_per_image(model, images[0])
        best = max(rates.values())
        achieved = result["flops_per_image"] * best / 1e12
        result["achieved_tflops_at_best"] = round(achieved, 3)
        if case["peak_tflops"]:
            result["share_of_peak"] = round(achieved / case["peak_tflops"], 4)
        if cuda:
            result["half_fidelity"] = _fidelity(case, images[: min(len(images), 32)])
            result.update(_scan_check(case, images[: max(case["batches"])]))
            result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_rss_mb"] = round(_rss_mb(), 1)
    except Exception as exc:  # a benchmark reports a failed case instead of losing the others
        result["error"] = f"{type(exc).__name__}: {exc}"
    queue.put(result)


def run_isolated(case: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_case, args=(case, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _code_version() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--paper-images", type=int, default=64 if cuda else 2,
                        help="480x640 images through ResNet-101 (~15 s each on 2 CPU cores)")
    parser.add_argument("--paper-batches", type=int, nargs="+", default=[1, 8, 32] if cuda else [1, 2])
    parser.add_argument("--demo-images", type=int, default=64 if cuda else 32)
    parser.add_argument("--demo-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="images/s only (also runs against older versions of the package)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the share-of-peak figure (default: known "
                             "measured peaks by device name, else none)")
    args = parser.parse_args(argv)

    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    peak = args.peak_tflops or next((v for k, v in KNOWN_PEAK_TFLOPS.items() if cuda and k in name), None)
    cases = []
    if not args.skip_paper and args.paper_images > 0:
        cases.append(dict(config="paper", image_size=[480, 640], images=args.paper_images,
                          batches=args.paper_batches))
    cases.append(dict(config="demo", image_size=[128, 170], images=args.demo_images,
                      batches=args.demo_batches))
    for case in cases:
        case.update(device=args.device, threads=args.threads, peak_tflops=peak,
                    throughput_only=args.throughput_only)
    import ray_updown

    report = {
        "benchmark": "detector.extract_regions",
        "code": _code_version(),
        "package": os.path.dirname(ray_updown.__file__),
        "machine": {"device_name": name, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": sys.version.split()[0]},
        "results": [run_isolated(c) for c in cases],
        "decode": decode_rate(),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
