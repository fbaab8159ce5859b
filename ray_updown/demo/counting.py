"""Fixed 36 regions or the paper's 10-100: how each covers the shapes, and what it does to VQA.

    python -m ray_updown.demo.counting --demo runs/demo [--seeds 2]

Runs on a finished `make demo` folder, with its world and its detector:

1. extracts the region features again under the paper's adaptive rule (every region whose
   best class scores above the detector's threshold, at least 10 and at most 100), next to
   the demo's fixed count (36; on the world only the shapes and the backdrop pass the
   threshold, so the adaptive rule keeps its minimum, 10, almost always);
2. counts, on the VQA val images, how the kept regions cover the annotated shapes: regions
   per image, *copies* per shape (regions at IoU >= 0.5 with it: more than one is a
   duplicate, which a soft-attention model cannot tell from a second shape), and regions
   covering no shape;
3. trains the demo's single Up-Down VQA model on both stores, for `--seeds` seeds each, and
   scores them by answer type on VQA val.

Prints one JSON summary and writes it to <demo>/counting/summary.json, with a picture of the
accuracies (counting.png). Finished steps are kept (<demo>/counting/stages), so a re-run
resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from ray_updown import storage
from ray_updown.data.vqa import ANSWER_TYPES
from ray_updown.data.world import BACKDROP_CLASS, VG_ID_OFFSET
from ray_updown.demo.run import load_demo_config, vqa_seeds
from ray_updown.demo.stages import (
    StageBook,
    WorldFiles,
    evaluate_vqa_model,
    extract,
    log,
    train_vqa_trials,
    vqa_config,
)
from ray_updown.errors import RayUpdownError
from ray_updown.metrics.detection import box_iou_coco

ADAPTIVE = (10, 100)  # the paper: 10 to 100 regions above the confidence threshold
IOU_SAME_OBJECT = 0.5


def region_coverage(regions: dict[int, np.ndarray], shapes: dict[int, np.ndarray]) -> dict:
    """How the kept regions ([k, 4] per image) cover the annotated shapes ([m, 4] per image)."""
    copies, unmatched, kept = [], [], []
    for image_id, boxes in regions.items():
        truth = shapes.get(image_id, np.zeros((0, 4)))
        kept.append(len(boxes))
        if len(truth) == 0 or len(boxes) == 0:
            unmatched.append(len(boxes))
            copies += [0] * len(truth)
            continue
        iou = box_iou_coco(truth, boxes)
        copies += (iou >= IOU_SAME_OBJECT).sum(1).tolist()
        unmatched.append(int((iou.max(0) < IOU_SAME_OBJECT).sum()))
    copies_arr = np.asarray(copies, dtype=float)
    return {"images": len(kept), "shapes": len(copies),
            "regions_per_image": round(float(np.mean(kept)), 2) if kept else 0.0,
            "copies_per_shape": round(float(copies_arr.mean()), 2) if len(copies) else 0.0,
            "shapes_with_duplicates": round(float((copies_arr >= 2).mean()), 3) if len(copies) else 0.0,
            "shapes_missed": round(float((copies_arr == 0).mean()), 3) if len(copies) else 0.0,
            "regions_on_no_shape_per_image": round(float(np.mean(unmatched)), 2) if kept else 0.0}


def annotated_shapes(world_root: str) -> dict[int, np.ndarray]:
    """COCO id -> the annotated shapes' boxes (x1, y1, x2, y2), the backdrop left out."""
    backdrop_names = {BACKDROP_CLASS[0], *BACKDROP_CLASS[1]}
    out = {}
    for image in storage.read_json(storage.join(world_root, "visual_genome", "objects.json")):
        boxes = [(o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]) for o in image["objects"]
                 if o["names"][0] not in backdrop_names]
        out[image["image_id"] - VG_ID_OFFSET] = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return out


def stored_boxes(store: str, image_ids: list[int]) -> dict[int, np.ndarray]:
    from ray_updown.features.reader import FeatureStore

    fs = FeatureStore(store)
    return {i: fs.get(i).boxes.astype(float) for i in image_ids}


def run_study(demo: str, seeds: int) -> dict:
    """The study on a finished demo folder (see the module docstring); returns its summary."""
    from ray_updown.ray_cluster import ensure_ray

    if seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {seeds}")
    cfg, detector = finished_demo(demo)
    fixed = f"fixed{cfg.max_regions}"
    world = WorldFiles(storage.join(demo, "world"))
    out = storage.join(demo, "counting")
    ensure_ray(cfg.num_cpus or None)
    stores = {fixed: storage.join(demo, "features", "regions"),
              "adaptive": storage.join(out, "regions_adaptive")}
    study = StageBook(out)
    study.run("extract_adaptive", lambda: extract(world, stores["adaptive"], detector, None,
                                                  cfg.extract_threads, ADAPTIVE))

    val_ids = [q["image_id"] for q in storage.read_json(world.questions("val"))["questions"]]
    val_ids = sorted(set(val_ids))
    shapes = annotated_shapes(world.root)
    coverage = {name: region_coverage(stored_boxes(store, val_ids), shapes)
                for name, store in stores.items()}
    log(f"coverage of the val images' shapes: {json.dumps(coverage)}")

    scores = train_and_score(study, cfg, world, stores, seeds)
    summary = {"demo": demo, "world_seed": cfg.seed, "vqa_seeds": seeds, "fixed": fixed,
               "coverage": coverage, "vqa": accuracies(scores)}
    storage.write_json(storage.join(out, "summary.json"), summary, indent=1)
    draw_study(summary, storage.join(out, "counting.png"))
    return summary


def finished_demo(demo: str):
    """A finished demo folder's config (DemoConfig) and detector checkpoint; SystemExit when
    it has no region features or kept other than a fixed region count."""
    book = StageBook(demo)
    if not storage.exists(book.record_uri("extract_regions")):
        raise SystemExit(f"{demo}: not a demo folder with its region features (run `make demo` first)")
    cfg = load_demo_config(demo)  # ConfigError, naming the file, when the record is missing
    if cfg.min_regions != cfg.max_regions or not cfg.max_regions:
        raise SystemExit(f"{demo}: the study compares a fixed region count with 10-100; this demo "
                         f"kept {cfg.min_regions}-{cfg.max_regions}")
    detector = storage.read_json(book.record_uri("detector"))["result"]["detector"]
    return cfg, detector


def train_and_score(study, cfg, world, stores: dict[str, str], seeds: int) -> dict[str, list[dict]]:
    """The demo's single Up-Down VQA model on each store for `seeds` seeds (from the demo's
    seed on), every store with every seed as trials of one Tune experiment: {store name:
    [VQA val scores per seed]}."""
    out = study.out
    runs = storage.join(out, "runs")
    epochs = cfg.epochs(cfg.vqa_epochs)
    seed_list = vqa_seeds(cfg, seeds)
    configs = {f"{name}-seed{seed}": vqa_config(dataclasses.replace(cfg, seed=seed), world, store,
                                                ADAPTIVE[1] if name == "adaptive" else cfg.max_regions,
                                                runs, f"vqa-{name}", epochs)
               for seed in seed_list for name, store in stores.items()}
    trained = study.run("vqa_trials", lambda: train_vqa_trials(configs, runs, "vqa-counting"))
    return {name: [study.run(f"val_{name}_seed{seed}", lambda: evaluate_vqa_model(
                       world, [trained[f"{name}-seed{seed}"]["checkpoint"]], store,
                       f"{name}-seed{seed}", storage.join(out, "results")))
                   for seed in seed_list]
            for name, store in stores.items()}


def accuracies(scores: dict[str, list[dict]]) -> dict[str, dict]:
    """{store name: {overall and each answer type: [accuracy per seed], "mean": {...}}}."""
    vqa = {name: {"overall": [s["overall"] for s in per_seed],
                  **{t: [s["per_answer_type"][t] for s in per_seed]
                     for t in ANSWER_TYPES}}
           for name, per_seed in scores.items()}
    for name in vqa:
        vqa[name]["mean"] = {k: round(float(np.mean(v)), 2) for k, v in vqa[name].items()}
    return vqa


def draw_study(summary: dict, uri: str) -> None:
    """VQA val accuracy by answer type, fixed 36 vs adaptive 10-100 (mean over the seeds)."""
    from ray_updown.viz.plots import plot_bars

    fixed = summary.get("fixed", "fixed36")
    labels = {fixed: f"fixed {fixed[len('fixed'):]} regions", "adaptive": "10-100 regions (paper's rule)"}
    groups = {kind: {labels[name]: summary["vqa"][name]["mean"][kind] for name in labels}
              for kind in ("overall", *ANSWER_TYPES)}
    plot_bars(groups, f"Up-Down VQA on world seed {summary['world_seed']}: regions kept "
                      f"(mean of {summary['vqa_seeds']} seeds)", "VQA val accuracy", uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo folder")
    parser.add_argument("--seeds", type=int, default=2, help="VQA seeds per region rule")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        summary = run_study(args.demo, args.seeds)
    except RayUpdownError as exc:  # a missing or malformed file of a demo folder: one line
        raise SystemExit(f"counting: error: {exc}") from None
    summary["minutes"] = round((time.perf_counter() - started) / 60, 2)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
