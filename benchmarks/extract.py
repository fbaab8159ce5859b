"""Extraction pipeline benchmarks. Prints one JSON object.

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
(d) traffic per image of the demo run: bytes the driver received (the workers' per-shard
    counts), object-store bytes (shard ranges in, counts out), and the decoded-pixel and
    encoded bytes the workers keep in their own processes (what a read -> decode -> detect
    stream would put through the object store, and a driver-side writer through the driver).
(e) planning at scale: benchmarks/planning.py.
(f) images/s of the demo configuration on a local multi-node cluster
    (`ray.cluster_utils.Cluster`, raylets on 127.0.0.1) with 1, 2 and 3 nodes, one actor
    (and one CPU) per node. On this 2-core machine that checks overhead, not scaling.

The extraction actors take one logical CPU each; Ray is started with one logical CPU more than
the machine has cores so the decode tasks always have a slot (they use ~1% of a core here).
Each detector forward uses the same number of torch threads as the bare forward (--threads).

    .venv/bin/python benchmarks/extract.py [--paper-images 4] [--demo-images 160] [--skip-paper]
        [--skip-nodes] [--node-images 96]
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
from ray_updown.data.images import DecodeLimits, decode_image
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.detector import BottomUpDetector, load_detector, paper_config, save_detector, world_config
from ray_updown.extraction.inputs import list_images
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

CORES = os.cpu_count() or 1


class TimedModel:
    """The real model, logging each forward's (start, end, images, peak RSS) to a file."""

    def __init__(self, model, log_dir: str):
        self.model, self.log_dir = model, log_dir

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _log(self, start: float, images: int) -> None:
        entry = {"pid": os.getpid(), "start": start, "end": time.time(), "images": images,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        with open(os.path.join(self.log_dir, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def extract_regions(self, images):
        start = time.time()
        out = self.model.extract_regions(images)
        self._log(start, len(images))
        return out

    def extract_batches(self, chunks):
        """The actor's streaming path (stages.BatchDetector uses it when the model has it)."""
        if not hasattr(self.model, "extract_batches"):  # the stand-in: one call per chunk
            for chunk in chunks:
                yield self.extract_regions(chunk)
            return
        start = time.time()
        for chunk, out in zip(chunks, self.model.extract_batches(chunks)):
            self._log(start, len(chunk))
            yield out
            start = time.time()


def timed_stand_in(model_class, rate: float, log_dir: str) -> TimedModel:
    """The stand-in model of fixed speed (stand_in.py), logging its forwards like the detector."""
    return TimedModel(model_class(rate), log_dir)


def stand_in_pipeline(root: str, rates: list[float], images: int, batch_size: int,
                      rows_per_shard: int, cpus: float) -> dict:
    """(g) The pipeline alone: `run_extraction` with a stand-in model of fixed speed R (no
    detector), one actor with `cpus` CPUs, over `images` JPEGs of 640x480. Efficiency = rate /
    R. Three rates: end to end (the run's own clock: actor start included), steady (from the
    first forward to the last features part written: the actor's start excluded) and the
    actor's start (from the call to the first forward)."""
    import stand_in
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(stand_in)  # the actor imports nothing from benchmarks/
    folder = f"{root}/stand-in-jpegs"
    stand_in.write_jpegs(folder, images)
    out: dict = {"model": "STAND-IN of fixed speed (benchmarks/stand_in.py), not the detector",
                 "images": images, "jpeg_size": "640x480", "batch_size": batch_size,
                 "rows_per_shard": rows_per_shard, "actors": 1, "cpus_per_actor": cpus}
    for rate in rates:
        log_dir = tempfile.mkdtemp(prefix="stand-in-log-", dir=root)
        store = f"{root}/store-stand-in-{rate:g}"
        cfg = ExtractConfig(images=folder, out=store, batch_size=batch_size, num_actors=1,
                            cpus_per_actor=cpus, rows_per_shard=rows_per_shard,
                            min_side=600, max_side=1000)
        started = time.time()
        summary = run_extraction(cfg, model_factory=functools.partial(
            timed_stand_in, stand_in.StandInModel, rate, log_dir))
        calls = [json.loads(line) for path in glob.glob(os.path.join(log_dir, "*.jsonl"))
                 for line in open(path)]
        first = min(c["start"] for c in calls)
        last_write = max(os.path.getmtime(p) for p in glob.glob(f"{store}/features/part-*.parquet"))
        n = summary["images_processed"]
        steady = n / (last_write - first)
        out[f"R={rate:g}"] = {
            "errors": summary["errors"],
            "end_to_end_images_per_s": summary["images_per_s"],
            "steady_images_per_s": round(steady, 2),
            "actor_start_seconds": round(first - started, 2),
            "efficiency_steady": round(steady / rate, 3),
            "efficiency_end_to_end": round(summary["images_per_s"] / rate, 3)}
        shutil.rmtree(store, ignore_errors=True)
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
            "traffic_per_image_bytes": traffic(summary),
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


def traffic(summary: dict) -> dict:
    n = max(1, summary["images_processed"])
    return {"driver_received": round(summary["driver_received_bytes"] / n, 1),
            "object_store": round(summary["object_store_bytes"] / n, 1),
            "decoded_pixels_kept_in_workers": round(summary["decoded_bytes_in_workers"] / n),
            "encoded_read_in_workers": round(summary["encoded_bytes_read"] / n)}


def nodes_benchmark(checkpoint: str, images_uri: str, root: str, limits: DecodeLimits,
                    threads: int, max_nodes: int = 3) -> dict:
    """Demo images/s with 1..max_nodes raylets (head + workers), one actor and CPU each."""
    import ray
    import ray._private.ray_constants
    from ray.cluster_utils import Cluster

    ray.shutdown()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback addresses
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    node = {"num_cpus": 1, "resources": {"extract_node": 1}, "node_ip_address": "127.0.0.1"}
    out = {}
    for count in range(1, max_nodes + 1):
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            for _ in range(count - 1):
                cluster.add_node(**node)
            ray.init(address=cluster.address, log_to_driver=False)
            cfg = ExtractConfig(images=images_uri, out=f"{root}/store-nodes-{count}",
                                checkpoint=checkpoint, batch_size=8, num_actors=count,
                                cpus_per_actor=1, torch_threads=threads, rows_per_shard=16,
                                actor_resources={"extract_node": 1},
                                min_side=limits.min_side, max_side=limits.max_side)
            summary = run_extraction(cfg)
            out[f"{count}_nodes"] = {"images": summary["images_processed"],
                                     "images_per_s": summary["images_per_s"],
                                     "shards_by_node": sorted(summary["shards_by_node"].values())}
        finally:
            ray.shutdown()
            cluster.shutdown()
    return out


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
    parser.add_argument("--skip-nodes", action="store_true")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--node-images", type=int, default=96)
    parser.add_argument("--skip-stand-in", action="store_true")
    parser.add_argument("--stand-in-only", action="store_true",
                        help="only (g): the pipeline with the stand-in model")
    parser.add_argument("--stand-in-images", type=int, default=1024)
    parser.add_argument("--stand-in-rates", default="100,200,1000")
    parser.add_argument("--stand-in-cpus", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the bare forward and of each actor (1: this "
                             "shared 2-core machine is oversubscribed; 2 threads then run slower)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    root = tempfile.mkdtemp(prefix="extract-bench-")
    torch.manual_seed(0)
    import ray

    results: dict = {"machine": {"cores": CORES, "cpu": platform.processor() or platform.machine(),
                                 "torch": torch.__version__, "ray": ray.__version__,
                                 "torch_threads_per_forward": args.threads,
                                 "load_average_at_start": os.getloadavg()}}
    if args.stand_in_only or not args.skip_stand_in:
        ray.init(num_cpus=max(CORES, int(args.stand_in_cpus)), include_dashboard=False,
                 log_to_driver=False)
        results["stand_in_pipeline"] = stand_in_pipeline(
            root, [float(r) for r in args.stand_in_rates.split(",")], args.stand_in_images,
            batch_size=32, rows_per_shard=128, cpus=args.stand_in_cpus)
        ray.shutdown()
        if args.stand_in_only:
            shutil.rmtree(root, ignore_errors=True)
            print(json.dumps(results, indent=1))
            return
        os.remove(f"{root}/manifest.parquet")

    build_world(WorldConfig(num_images=args.demo_images, image_size=128), f"{root}/world")
    vocab = storage.read_text(f"{root}/world/visual_genome/objects_vocab.txt").split("\n")
    attrs = storage.read_text(f"{root}/world/visual_genome/attributes_vocab.txt").split("\n")
    demo_ckpt = f"{root}/ckpt-demo"
    save_detector(BottomUpDetector(world_config(len([v for v in vocab if v]) + 1,
                                                len([a for a in attrs if a]) + 1)), demo_ckpt)
    demo_images, demo_limits = f"{root}/world/images", DecodeLimits(128, 213)
    if not args.skip_efficiency:
        ray.init(num_cpus=CORES + 1, include_dashboard=False, log_to_driver=False)
        efficiency_runs(args, root, results, demo_ckpt, demo_images, demo_limits)
        ray.shutdown()
    if not args.skip_nodes:
        build_world(WorldConfig(num_images=args.node_images, image_size=128), f"{root}/node-world")
        results["nodes_demo_images_per_s"] = nodes_benchmark(
            demo_ckpt, f"{root}/node-world/images", root, demo_limits, args.threads)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))


def efficiency_runs(args, root: str, results: dict, demo_ckpt: str, demo_images: str,
                    demo_limits: DecodeLimits) -> None:
    """(a), (c) and (d): pipeline against bare forward, 1 and 2 actors, traffic per image."""
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
    runs = [bare_forward(demo_ckpt, demo_images, 8, demo_limits, True, args.threads),
            pipeline(demo_ckpt, demo_images, f"{root}/store-demo-1", 8, 1, demo_limits, args.threads),
            bare_forward(demo_ckpt, demo_images, 8, demo_limits, True, args.threads)]
    results["demo_world_detector"] = efficiency(*runs)
    one = runs[1]
    results["traffic_per_image_bytes"] = {
        "demo": one["traffic_per_image_bytes"],
        "paper": (results["paper_resnet101_600x1000"]["pipeline"]["traffic_per_image_bytes"]
                  if not args.skip_paper else None)}
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


if __name__ == "__main__":
    main()
