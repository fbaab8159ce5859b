"""Every GPU measurement in one command, one JSON: the script to run when a GPU is lent.

    python benchmarks/gpu_check.py --out DIR [--checkpoint DETECTOR --images FOLDER]
    python benchmarks/gpu_check.py --out DIR --dry      # CPU, tiny sizes (tests/benchmarks runs it)

Sections, each timed and reported on its own (a failing one records its error, the rest run), in
the order they run; DIR/gpu_check.json is rewritten after each, so a time-out keeps what finished:

- detector:      benchmarks/detector.py's figures (stages, images/s by batch and precision,
                 FLOPs, fp16 against fp32 with random weights, the Triton scan against torch);
- compile:       extract_regions with each torch.compile mode of the RoI head ("" off,
                 "default", "reduce-overhead" = CUDA graphs) at batch 32, fp16, Triton scan:
                 images/s after warm-up, the warm-up's seconds, and whether the regions equal
                 the uncompiled model's;
- actor:         the streaming actor (extraction/actor.py) with the real model and no Ray:
                 ShardWriter over JPEGs of 480x640, `shards_in_flight` calls at once on
                 threads, as Ray Data runs them;
- ray:           run_extraction through Ray Data, 1 actor on 1 GPU and 2 actors on 0.5 GPU
                 each, when Ray is importable (reported as skipped where it is not);
- fidelity:      with --checkpoint and --images: fp16 against fp32 on a trained detector
                 (share of images selecting the same regions, cosine of their features);
- kernel_tests:  tests/test_select_kernel.py (the CUDA test and the interpreter test);
- vqa_steps, vqa_profile, vqa_epoch, vqa_loop, ensemble, captioner: training, fp32 and bf16
                 (benchmarks/gpu_training.py's docstring).

Every number comes from this run on this machine; nothing is carried over or estimated.
Writes DIR/gpu_check.json and prints it. Aims at <= 6 minutes on one H200.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# In the order they run: the kernel's correctness first, torch.compile (the slowest to warm up) last.
SECTIONS = ("kernel_tests", "detector", "actor", "vqa_steps", "vqa_profile", "vqa_epoch",
            "vqa_loop", "ensemble", "captioner", "ray", "fidelity", "compile")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # detector.py, stand_in.py


def _section(report: dict, name: str, run, *args) -> None:
    started = time.time()
    try:
        report[name] = run(*args)
    except Exception as exc:  # a check reports its failure instead of losing the others
        report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    report[name]["seconds"] = round(time.time() - started, 1)
    print(f"gpu_check: {name} done in {report[name]['seconds']} s", file=sys.stderr)


def detector_figures(dry: bool) -> dict:
    import detector

    argv = (["--skip-paper", "--demo-images", "8", "--demo-batches", "4"] if dry
            else ["--paper-images", "64", "--paper-batches", "1", "32", "--demo-images", "64",
                  "--demo-batches", "32"])
    with contextlib.redirect_stdout(sys.stderr):  # this script prints one JSON document
        return detector.main(argv)


def compile_options(dry: bool, device: str) -> dict:
    """Each compile mode against the uncompiled model: speed, warm-up and equal regions."""
    import numpy as np
    from detector import compare_regions

    cuda = device == "cuda"
    batch, count = (4, 8) if dry else (32, 128)
    h, w = (128, 170) if dry else (480, 640)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]
    modes = ["", "default"] + (["reduce-overhead"] if cuda else [])
    out, reference = {"batch": batch, "images": count, "half": cuda}, None
    for mode in modes:
        try:
            entry, first = _compiled_speed(mode, images, batch, dry, device)
        except Exception as exc:  # one mode's failure leaves the others' figures
            out[mode or "off"] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            continue
        if reference is None:
            reference = first
        else:
            entry.update(compare_regions(reference, first))
        out[mode or "off"] = entry
    return out


def _compiled_speed(mode: str, images: list, batch: int, dry: bool, device: str) -> tuple[dict, list]:
    """Images/s of one compile mode after its warm-up, and the regions of its first batch."""
    import torch
    from detector import _model

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = _model({"config": "demo" if dry else "paper", "device": device}, half=cuda,
                   greedy_scan="triton" if cuda else "torch", compile_mode=mode)
    started = time.perf_counter()
    first = model.extract_regions(images[:batch])  # compiles (and records graphs)
    sync()
    warm_up = time.perf_counter() - started
    model.extract_regions(images[batch: 2 * batch])  # a second shape settles
    sync()
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        model.extract_regions(images[i: i + batch])
    sync()
    return {"images_per_s": round(len(images) / (time.perf_counter() - started), 2),
            "warm_up_seconds": round(warm_up, 1)}, first


def _world(root: str, dry: bool) -> tuple[str, str, int, int]:
    """JPEGs and a random-weight checkpoint: (images folder, checkpoint, min_side, max_side)."""
    import stand_in

    from ray_updown.detector import BottomUpDetector, paper_config, save_detector, world_config

    count, (w, h) = (16, (170, 128)) if dry else (1536, (640, 480))
    folder, ckpt = f"{root}/jpegs", f"{root}/detector"
    if not os.path.isdir(folder):
        stand_in.write_jpegs(folder, count, width=w, height=h)
        save_detector(BottomUpDetector(world_config(21, 11) if dry else paper_config()), ckpt)
    return folder, ckpt, (128, 213) if dry else (600, 1000)


def actor_without_ray(root: str, dry: bool, device: str) -> dict:
    """ShardWriter with the real model, `shards_in_flight` calls at once, no Ray; on CUDA once
    with the default scan (Triton) and once with the torch scan, which decides the default."""
    report = _actor_speed(root, dry, device, "auto")
    if device == "cuda":
        report["torch_scan"] = _actor_speed(root, dry, device, "torch")
    return report


def _actor_speed(root: str, dry: bool, device: str, greedy_scan: str) -> dict:
    from ray_updown.extraction.actor import ShardWriter
    from ray_updown.extraction.model import build_model, describe_model
    from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
    from ray_updown.features.schema import StoreMeta

    folder, ckpt, (lo, hi) = _world(root, dry)
    cuda = device == "cuda"
    out = f"{root}/store-actor-{greedy_scan}"
    cfg = ExtractConfig(images=folder, out=out, checkpoint=ckpt, rows_per_shard=4 if dry else 128,
                        num_gpus_per_actor=1.0 if cuda else 0.0, half=cuda, min_side=lo,
                        max_side=hi, greedy_scan=greedy_scan, plan_only=True)
    planned = run_extraction(cfg)
    info = describe_model(build_model(dataclasses.replace(cfg.model_spec(), half=False), "cpu"))
    meta = StoreMeta(feature_dim=info["feature_dim"], image_id_type="int64", detector=info["name"])
    writer = ShardWriter(out, cfg.model_spec(), meta, **cfg.shard_writer_kwargs())
    rows, shards = cfg.rows_per_shard, planned["shards"]
    total = planned["inputs"]
    writer.write_shard(0, 0, min(rows, total))  # warm-up: cuDNN autotuning, first compiles
    started = time.time()
    with ThreadPoolExecutor(cfg.shards_in_flight) as calls:
        done = list(calls.map(lambda s: writer.write_shard(s, s * rows, min(rows, total - s * rows)),
                              range(1, shards)))
    seconds = time.time() - started
    images = sum(d["features"] + d["errors"] for d in done)
    return {"images": images, "errors": sum(d["errors"] for d in done),
            "batch_size": writer.detector.forward_batch_size, "half": cuda,
            "greedy_scan": getattr(writer.detector.model, "greedy_scan", None),
            "shards_in_flight": cfg.shards_in_flight, "warm_images_per_s": round(images / seconds, 2)}


def through_ray(root: str, dry: bool, device: str) -> dict:
    try:
        import ray
    except ImportError:
        return {"skipped": "Ray is not importable here"}
    from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

    folder, ckpt, (lo, hi) = _world(root, dry)
    cuda = device == "cuda"
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    out = {"ray": ray.__version__}
    try:
        for actors, gpus in ((1, 1.0), (2, 0.5)):
            cfg = ExtractConfig(images=folder, out=f"{root}/store-ray-{actors}", checkpoint=ckpt,
                                rows_per_shard=4 if dry else 128, num_actors=actors,
                                num_gpus_per_actor=gpus if cuda else 0.0, half=cuda,
                                cpus_per_actor=1 if dry else 4, min_side=lo, max_side=hi)
            summary = run_extraction(cfg)
            out[f"{actors}_actors_{gpus:g}_gpu_each"] = {
                "images": summary["images_processed"], "errors": summary["errors"],
                "end_to_end_images_per_s": summary["images_per_s"],
                "driver_received_bytes": summary["driver_received_bytes"]}
    finally:
        if started_ray:
            ray.shutdown()
    return out


def half_fidelity(checkpoint: str, images: str, device: str, limit: int = 180) -> dict:
    """fp16 against fp32 of a trained detector on the given images."""
    from detector import compare_regions

    from ray_updown import storage
    from ray_updown.data.images import DecodeLimits, decode_image
    from ray_updown.detector import load_detector
    from ray_updown.extraction.inputs import list_images

    if device != "cuda":
        return {"skipped": "float16 needs CUDA"}
    uris = [r.uri for r in list_images(images)][:limit]
    pixels = [decode_image(storage.read_bytes(u), DecodeLimits(600, 1000)).pixels for u in uris]
    runs = {}
    for half in (False, True):
        model = load_detector(checkpoint).prepare_inference("cuda", half=half)
        runs[half] = [r for i in range(0, len(pixels), 16) for r in model.extract_regions(pixels[i:i + 16])]
    return compare_regions(runs[False], runs[True])


def kernel_tests(dry: bool) -> dict:
    if dry:  # the suite that runs --dry runs these tests itself
        return {"skipped": "dry run: tests/test_select_kernel.py runs in the test suite"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_select_kernel.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"passed": done.returncode == 0, "output_tail": done.stdout[-1500:]}


def _save(report: dict, folder: str) -> None:
    with open(os.path.join(folder, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: checks the script")
    parser.add_argument("--checkpoint", default="", help="a trained detector for fp16 fidelity")
    parser.add_argument("--images", default="", help="images for fp16 fidelity")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="run only these (a re-run after a time-out)")
    args = parser.parse_args(argv)
    import gpu_training
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    report: dict = {"check": "gpu_check", "dry": args.dry, "device": device,
                    "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.machine(),
                    "torch": torch.__version__, "ray_version": ray_version or "not installed",
                    "date": time.strftime("%Y-%m-%d")}
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        runs = {"detector": (detector_figures, args.dry),
                "compile": (compile_options, args.dry, device),
                "actor": (actor_without_ray, root, args.dry, device),
                "ray": (through_ray, root, args.dry, device),
                "fidelity": (half_fidelity, args.checkpoint, args.images, device),
                "kernel_tests": (kernel_tests, args.dry),
                "vqa_steps": (gpu_training.vqa_steps, args.dry, device),
                "vqa_profile": (gpu_training.vqa_profile, args.dry, device),
                "vqa_epoch": (gpu_training.vqa_epoch_figures, root, args.dry, device),
                "vqa_loop": (gpu_training.vqa_loop, root, args.dry, device),
                "ensemble": (gpu_training.ensemble, root, args.dry, device),
                "captioner": (gpu_training.captioner_steps, args.dry, device)}
        for name in SECTIONS:
            if name not in args.sections:
                report[name] = {"skipped": "not asked for (--sections)"}
            elif name == "fidelity" and not (args.checkpoint and args.images):
                report[name] = {"skipped": "give --checkpoint and --images"}
            else:
                _section(report, name, *runs[name])
            _save(report, args.out)  # a run stopped by a time limit keeps the sections it finished
    report["seconds"] = round(time.time() - started, 1)
    _save(report, args.out)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
