"""Extraction pipeline benchmarks (issue 4, items 6a and 6c). Prints one JSON object.

(a) pipeline efficiency = images/s of the whole Ray Data pipeline (list, read, decode, detector
    actor, Parquet write, index, summary) / images/s of the bare model forward
    (`extract_regions` on the same decoded images, same batch size, same threads, same machine,
    one warm-up batch excluded for the small model), at
      paper: ResNet-101 C4, 600/1000 input, 1601 classes / 401 attributes, random weights,
             --paper-images 800x600 images (the forward is ~20 s per image on 2 cores);
      demo:  the synthetic world's detector (world_config) on --demo-images world images.
    Two pipeline rates are reported: end to end (the run's clock, which includes starting the
    actor and loading the model in it), and steady (from the actor's first forward to the last
    shard written, i.e. without the one-off actor start). Target >= 0.85. The bare rate is the
    mean of runs just before and just after the pipeline (other processes load this machine);
    `forward_share_of_steady_window` is the load-independent view: the share of the steady
    window the actor spent inside the forward.
(c) images/s of the demo configuration with 1 and with 2 actors (each with --threads torch
    threads); peak RSS of each extraction actor process (ru_maxrss, read in the
    actor after each batch).

The extraction actors take one logical CPU each; Ray is started with one logical CPU more than
the machine has cores so the decode tasks always have a slot (they use ~1% of a core here).
Each detector forward uses the same number of torch threads as the bare forward (--threads).

    .venv/bin/python benchmarks/extract.py [--paper-images 4] [--demo-images 160] [--skip-paper]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import platform
import resource
import shutil
import tempfile
import time

import torch

from ray_updown import storage
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.detector import BottomUpDetector, load_detector, paper_config, save_detector, world_config
from ray_updown.extraction.images import DecodeLimits, decode_image
from ray_updown.extraction.inputs import list_images
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

CORES = os.cpu_count() or 1


class TimedModel:
    """The real model, logging each forward's (start, end, images, peak RSS) to a file."""

    def __init__(self, model, log_dir: str):
        self.model, self.log_dir = model, log_dir

    def __getattr__(self, name):
        return getattr(self.model, name)

    def extract_regions(self, images):
        start = time.time()
        out = self.model.extract_regions(images)
        entry = {"pid": os.getpid(), "start": start, "end": time.time(), "images": len(images),
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        with open(os.path.join(self.log_dir, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        return out


def timed_detector(checkpoint: str, log_dir: str) -> TimedModel:
    """Also logs when the actor's process got to build the model and how long loading took."""
    start = time.time()
    model = TimedModel(load_detector(checkpoint), log_dir)
    with open(os.path.join(log_dir, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "event": "loaded", "start": start,
                            "end": time.time()}) + "\n")
    return model


def bare_forward(checkpoint: str, images_uri: str, batch_size: int, limits: DecodeLimits,
                 warmup: bool, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = load_detector(checkpoint).eval()
    pixels = [decode_image(storage.read_bytes(r.uri), limits).pixels for r in list_images(images_uri)]
    batches = [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]
    if warmup:
        model.extract_regions(batches[0])
    start = time.time()
    for batch in batches:
        model.extract_regions(batch)
    seconds = time.time() - start
    return {"images": len(pixels), "seconds": round(seconds, 2),
            "images_per_s": round(len(pixels) / seconds, 4)}


def pipeline(checkpoint: str, images_uri: str, out: str, batch_size: int, actors: int,
             limits: DecodeLimits, threads: int) -> dict:
    log_dir = tempfile.mkdtemp(prefix="log-", dir=os.path.dirname(out))
    cfg = ExtractConfig(images=images_uri, out=out, checkpoint=checkpoint, batch_size=batch_size,
                        num_actors=actors, cpus_per_actor=1, torch_threads=threads,
                        rows_per_shard=64, decode_batch_size=batch_size,
                        min_side=limits.min_side, max_side=limits.max_side)
    started = time.time()
    summary = run_extraction(cfg, model_factory=functools.partial(timed_detector, checkpoint, log_dir))
    done = time.time()
    logged = [json.loads(line) for path in glob.glob(os.path.join(log_dir, "*.jsonl"))
              for line in open(path)]
    calls = [c for c in logged if "event" not in c]
    loads = [c for c in logged if c.get("event") == "loaded" and c["pid"] != os.getpid()]
    n = summary["images_processed"]
    first_forward = min(c["start"] for c in calls)
    steady_seconds = done - first_forward
    per_actor = {}
    for c in calls:
        per_actor[c["pid"]] = max(per_actor.get(c["pid"], 0.0), c["peak_rss_mb"])
    return {"images": n, "errors": summary["errors"], "actors": actors,
            "torch_threads_per_actor": cfg.torch_threads,
            "end_to_end_seconds": summary["seconds"], "end_to_end_images_per_s": summary["images_per_s"],
            "steady_seconds": round(steady_seconds, 2),
            "steady_images_per_s": round(n / steady_seconds, 4),
            "forward_seconds_in_actors": round(sum(c["end"] - c["start"] for c in calls), 2),
            "startup_seconds": {  # from the call to the first forward: the one-off costs
                "driver_checks_and_listing_to_actor_model_load": round(min(c["start"] for c in loads) - started, 2),
                "model_load_in_actor": round(max(c["end"] - c["start"] for c in loads), 2),
                "to_first_forward": round(first_forward - started, 2)},
            "peak_rss_mb_per_actor": sorted(round(v, 1) for v in per_actor.values())}


def efficiency(bare_before: dict, piped: dict, bare_after: dict) -> dict:
    """Ratios against the mean of two bare measurements taken just before and after the
    pipeline run (this machine's load from other processes drifts), plus the load-independent
    share of the steady window the actor spent inside the forward."""
    bare_rate = (bare_before["images_per_s"] + bare_after["images_per_s"]) / 2
    return {"bare_forward": {"before": bare_before, "after": bare_after,
                             "mean_images_per_s": round(bare_rate, 4)},
            "pipeline": piped,
            "efficiency_end_to_end": round(piped["end_to_end_images_per_s"] / bare_rate, 3),
            "efficiency_steady": round(piped["steady_images_per_s"] / bare_rate, 3),
            "forward_share_of_steady_window": round(
                piped["forward_seconds_in_actors"] / piped["actors"] / piped["steady_seconds"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paper-images", type=int, default=4)
    parser.add_argument("--demo-images", type=int, default=600)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the bare forward and of each actor (1: this "
                             "shared 2-core machine is oversubscribed; 2 threads then run slower)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    root = tempfile.mkdtemp(prefix="extract-bench-")
    torch.manual_seed(0)
    import ray

    ray.init(num_cpus=CORES + 1, include_dashboard=False, log_to_driver=False)
    results: dict = {"machine": {"cores": CORES, "cpu": platform.processor() or platform.machine(),
                                 "torch": torch.__version__, "ray": ray.__version__,
                                 "torch_threads_per_forward": args.threads,
                                 "load_average_at_start": os.getloadavg()}}

    # Data and checkpoints (random weights; the forward's cost does not depend on them).
    if not args.skip_paper:
        build_world(WorldConfig(num_images=args.paper_images, image_size=(800, 600), seed=1),
                    f"{root}/paper-world")
        paper_ckpt = f"{root}/ckpt-paper"
        save_detector(BottomUpDetector(paper_config()), paper_ckpt)
        paper_images, paper_limits = f"{root}/paper-world/images", DecodeLimits(600, 1000)
        runs = [bare_forward(paper_ckpt, paper_images, 1, paper_limits, False, args.threads),
                pipeline(paper_ckpt, paper_images, f"{root}/store-paper", 1, 1, paper_limits,
                         args.threads),
                bare_forward(paper_ckpt, paper_images, 1, paper_limits, False, args.threads)]
        results["paper_resnet101_600x1000"] = efficiency(*runs)

    build_world(WorldConfig(num_images=args.demo_images, image_size=128), f"{root}/world")
    vocab = storage.read_text(f"{root}/world/visual_genome/objects_vocab.txt").split("\n")
    attrs = storage.read_text(f"{root}/world/visual_genome/attributes_vocab.txt").split("\n")
    demo_ckpt = f"{root}/ckpt-demo"
    save_detector(BottomUpDetector(world_config(len([v for v in vocab if v]) + 1,
                                                len([a for a in attrs if a]) + 1)), demo_ckpt)
    demo_images, demo_limits = f"{root}/world/images", DecodeLimits(128, 213)
    runs = [bare_forward(demo_ckpt, demo_images, 8, demo_limits, True, args.threads),
            pipeline(demo_ckpt, demo_images, f"{root}/store-demo-1", 8, 1, demo_limits, args.threads),
            bare_forward(demo_ckpt, demo_images, 8, demo_limits, True, args.threads)]
    results["demo_world_detector"] = efficiency(*runs)
    one = runs[1]
    two = pipeline(demo_ckpt, demo_images, f"{root}/store-demo-2", 8, 2, demo_limits, args.threads)
    results["actors"] = {
        "config": "demo", "images": two["images"],
        "one_actor_images_per_s": {"end_to_end": one["end_to_end_images_per_s"],
                                   "steady": one["steady_images_per_s"]},
        "two_actors_images_per_s": {"end_to_end": two["end_to_end_images_per_s"],
                                    "steady": two["steady_images_per_s"]},
        "peak_rss_mb_per_actor": {
            "demo_one_actor": one["peak_rss_mb_per_actor"],
            "demo_two_actors": two["peak_rss_mb_per_actor"],
            "paper": (results["paper_resnet101_600x1000"]["pipeline"]["peak_rss_mb_per_actor"]
                      if not args.skip_paper else None)}}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
