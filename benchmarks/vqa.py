"""Training speed of the Up-Down VQA model and an ensemble's wall-clock on Ray, printed as JSON.

1. Training samples/s (forward + backward + optimiser step, `train_step`) at the paper's
   input size: K = 36 regions of D = 2048, 14-token questions, 3,129 answers, a 19,901-word
   vocabulary (the public re-implementation's dictionary size), for
   * the paper's model: gated tanh, hidden 512, AdaDelta;
   * the re-implementation's variant: ReLU + weight norm, hidden 1024, Adamax.
2. The wall-clock of a small ensemble (`train_ensemble`) on a local Ray cluster, on a toy VQA
   set in the real file formats whose regions encode the answers, and the official accuracy
   of each member and of the ensemble (`predict_ensemble` + `evaluate_vqa`).

3. Where the features live (features/shared.py, features/regions.py), on synthetic stores:
   * PSS (from /proc/<pid>/smaps_rollup, not RSS) of 1 and 4 concurrent "trials" (processes)
     that gather every image and train two steps, either mapping the node's one shared copy
     (the features count once) or each holding its own private copy of the same arrays (the
     features count once per trial; the padded copies of before were larger still);
   * DataLoader throughput (shuffled images/s, 0, 2 and N loader processes) from the store's
     row-group reader and from the shared copy;
   * one VQA epoch of the paper's model at COCO's proportions (443,757 questions, 82,783
     images x 36 x 2048 fp16), scaled by --epoch-scale (0.01 by default: a CPU figure;
     --full-size on a GPU machine, ~12 GB of features), batches gathered on the GPU when
     there is one and the copy fits.

    python benchmarks/vqa.py [--batch 64] [--steps 3] [--members 3] [--epochs 4] [--no-ensemble]
                             [--no-training] [--no-features] [--epoch-scale 0.01 | --full-size]

Runs on CPU (CUDA when available for parts 1 and 3). Deterministic inputs (fixed seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from training_features import (
    FEAT_DIM,
    PSS_MODES,
    REGIONS,
    loader_throughput,
    pss_benchmark,
    serve_until_stdin,
    trial_regions,
    write_synthetic_store,
)

from ray_updown.vqa.config import VqaTrainConfig
from ray_updown.vqa.model import VqaModel
from ray_updown.vqa.train import build_optimizer, train_step

NUM_TOKENS, NUM_ANSWERS, QUESTION_LEN = 19_902, 3129, 14  # 19,901 words + padding


def _batch(batch_size: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    targets = torch.zeros(batch_size, NUM_ANSWERS)
    cols = torch.randint(0, NUM_ANSWERS, (batch_size, 3), generator=g)
    targets.scatter_(1, cols, torch.tensor([1.0, 0.6, 0.3]).expand(batch_size, 3))
    batch = {"question_tokens": torch.randint(1, NUM_TOKENS, (batch_size, QUESTION_LEN), generator=g),
             "feats": torch.relu(torch.randn(batch_size, REGIONS, FEAT_DIM, generator=g)),
             "mask": torch.ones(batch_size, REGIONS, dtype=torch.bool), "targets": targets}
    return {k: v.to(device) for k, v in batch.items()}


def training_speed(preset: str, batch_size: int, steps: int, device: torch.device,
                   precision: str = "fp32", packed_questions: bool = True) -> dict:
    """Samples/s of `train_step` for one preset (its own optimizer) at the paper's sizes."""
    model, optimizer = preset_model(device, preset, packed_questions=packed_questions)
    config = model.config
    batch = _batch(batch_size, device)
    for _ in range(2):  # warm-up (allocations, lazy imports, autotuning)
        train_step(model, optimizer, batch, 0.25, precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, 0.25, precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"preset": preset, "precision": precision, "hidden": config.hidden,
            "nonlinearity": config.nonlinearity, "attention": config.attention,
            "weight_norm": config.weight_norm, "optimizer": type(optimizer).__name__.lower(),
            "packed_questions": packed_questions,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch": batch_size, "steps": steps, "seconds": round(seconds, 2),
            "samples_per_s": round(batch_size * steps / seconds, 1)}


# -- a toy VQA set for the ensemble --------------------------------------------------------

COLORS = ("red", "blue", "green", "yellow")


def write_toy_vqa(root: str, train_images: int, val_images: int, dim: int = 32, seed: int = 0) -> dict:
    """VQA v2 question/annotation files + a feature store; regions encode the answers."""
    from ray_updown import storage
    from ray_updown.features.records import FeatureRecord
    from ray_updown.features.schema import StoreMeta
    from ray_updown.features.writer import feature_shard_uri, write_feature_shard

    rng = np.random.default_rng(seed)
    records, paths = [], {}
    for split, ids in (("train2014", range(1, train_images + 1)),
                       ("val2014", range(100_001, 100_001 + val_images))):
        questions, annotations = [], []
        for image_id in ids:
            color, dog, cups = int(rng.integers(len(COLORS))), bool(rng.integers(2)), int(rng.integers(1, 5))
            k = 2 + cups + int(rng.integers(0, 4))  # plus distractor regions
            feats = rng.normal(0, 0.2, size=(k, dim)).astype(np.float32)
            feats[0, color] += 2.0
            feats[1, 4 if dog else 5] += 2.0
            feats[2:2 + cups, 6] += 2.0
            feats[2 + cups:, 7] += 2.0
            xy = rng.uniform(0, 400, size=(k, 2)).astype(np.float32)
            records.append(FeatureRecord(image_id, 640, 480, np.concatenate([xy, xy + 60], 1), feats))
            qas = [("what color is the ball?", COLORS[color], "other", "what color is the"),
                   ("is there a dog?", "yes" if dog else "no", "yes/no", "is there a"),
                   ("how many cups are there?", str(cups), "number", "how many")]
            for j, (text, answer, answer_type, question_type) in enumerate(qas):
                qid = image_id * 10 + j
                answers = [answer] * 8 + [str(rng.choice(COLORS + ("yes", "no", "1", "2")))] * 2
                questions.append({"question_id": qid, "image_id": image_id, "question": text})
                annotations.append({"question_id": qid, "image_id": image_id,
                                    "question_type": question_type, "answer_type": answer_type,
                                    "multiple_choice_answer": answer,
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n}
                                                for n, a in enumerate(answers, 1)]})
        name = "train" if split.startswith("train") else "val"
        paths[f"{name}_questions"] = os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json")
        paths[f"{name}_annotations"] = os.path.join(root, f"v2_mscoco_{split}_annotations.json")
        storage.write_json(paths[f"{name}_questions"], {"data_subtype": split, "questions": questions})
        storage.write_json(paths[f"{name}_annotations"], {"data_subtype": split, "annotations": annotations})
    paths["features"] = os.path.join(root, "features")
    write_feature_shard(records, feature_shard_uri(paths["features"], 0), StoreMeta(feature_dim=dim))
    return paths


def ensemble_wall_clock(members: int, epochs: int, num_cpus: int) -> dict:
    from ray_updown.metrics.vqa_eval import evaluate_vqa
    from ray_updown.ray_cluster import ensure_ray
    from ray_updown.vqa.ensemble import predict_ensemble, train_ensemble

    root = tempfile.mkdtemp(prefix="vqa-bench-")
    paths = write_toy_vqa(root, train_images=120, val_images=40)
    cfg = VqaTrainConfig.from_dict({
        "data": {**paths, "answer_min_count": 1, "max_boxes": 10},
        "model": {"hidden": 64, "embed_dim": 16, "question_len": 6},
        "optimizer": "adamax", "lr": 0.03, "epochs": epochs, "batch_size": 32, "patience": 0,
        "storage_path": os.path.join(root, "runs"), "name": "ensemble"})
    started = time.perf_counter()
    ensure_ray(num_cpus=num_cpus)
    ray_start = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; stdout is the JSON
        manifest = train_ensemble(cfg, members=members, cpus_per_trial=1)
    wall = time.perf_counter() - started
    accuracy = {}
    for m in manifest["members"]:
        predicted = predict_ensemble([m["checkpoint"]], paths["val_questions"], paths["features"])
        accuracy[f"member_seed{m['seed']}"] = evaluate_vqa(paths["val_questions"], paths["val_annotations"],
                                                          list(predicted.items()))["overall"]
    predicted = predict_ensemble(manifest["uri"], paths["val_questions"], paths["features"])
    accuracy["ensemble"] = evaluate_vqa(paths["val_questions"], paths["val_annotations"],
                                        list(predicted.items()))["overall"]
    return {"members": members, "epochs": epochs, "cluster_cpus": num_cpus, "cpus_per_trial": 1,
            "train_questions": 360, "val_questions": 120, "ray_start_s": round(ray_start, 1),
            "wall_clock_s": round(wall, 1), "per_member_s": round(wall / members, 1),
            "val_accuracy": accuracy}


# -- where the features live: shared copy (PSS), loader throughput, a COCO-sized epoch ------
# (the synthetic stores, PSS runs and loader timing: benchmarks/training_features.py)

COCO_QUESTIONS, COCO_IMAGES = 443_757, 82_783  # VQA v2 train; COCO train2014 images


def preset_model(device: torch.device, preset: str = "paper", **overrides):
    """(model, its optimizer) of a preset at the paper's sizes, with `overrides` of its
    VqaConfig fields."""
    from ray_updown.vqa.config import PRESETS, VqaModelOptions

    sizes = dict(num_tokens=NUM_TOKENS, num_answers=NUM_ANSWERS, feat_dim=FEAT_DIM,
                 question_len=QUESTION_LEN, **overrides)
    model = VqaModel(PRESETS[preset](**sizes), seed=0).to(device).train()
    options = VqaTrainConfig(model=VqaModelOptions(preset=preset))
    return model, build_optimizer(options, model.parameters())


def pss_child(path: str, batch: int, mode: str) -> None:
    """One VQA 'trial': gather every image once (touching all of the features) and take two
    training steps with the paper's model."""
    def work():
        regions = trial_regions(path, mode)
        model, optimizer = preset_model(torch.device("cpu"))
        rows = np.arange(regions.shared.num_images)
        for n, start in enumerate(range(0, len(rows), batch)):
            feats, mask = regions.gather(rows[start:start + batch])
            if n < 2:
                b = _batch(len(feats), torch.device("cpu"), seed=n)
                train_step(model, optimizer, {**b, "feats": feats, "mask": mask}, 0.25)
        return regions, model

    serve_until_stdin(work)


def vqa_epoch(store: str, cache: str, questions: int, images: int, batch: int,
              device: torch.device, preset: str = "paper", precision: str = "fp32") -> dict:
    """One training epoch of a preset: batches gathered from the shared copy (on the GPU when
    it fits), synthetic questions and soft targets."""
    from ray_updown.features.regions import FlatRegions, regions_to_device
    from ray_updown.features.shared import shared_features
    from ray_updown.train.worker import shard_batches
    from ray_updown.vqa.data import EncodedQuestions, VqaDataset

    rng = np.random.default_rng(0)
    index = np.full((questions, 10), -1, np.int64)
    index[:, :3] = rng.integers(0, NUM_ANSWERS, (questions, 3))
    score = np.zeros((questions, 10), np.float32)
    score[:, :3] = [1.0, 0.6, 0.3]
    encoded = EncodedQuestions(np.arange(questions), rng.integers(0, images, questions).tolist(),
                               rng.integers(1, NUM_TOKENS, (questions, QUESTION_LEN)), index, score,
                               ["other"] * questions, annotated=True)
    started = time.perf_counter()
    dataset = VqaDataset(encoded, FlatRegions(shared_features(store, cache), REGIONS, False),
                         NUM_ANSWERS)
    on_device = regions_to_device(dataset.regions, device, 0.5)
    if on_device:
        dataset.to(device)
    setup = time.perf_counter() - started
    model, optimizer = preset_model(device, preset)
    batches = shard_batches(questions, batch, 0, 1, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    for idx in batches:
        dataset.__getitems__(idx)
    sync()
    gather = time.perf_counter() - started
    started = time.perf_counter()
    for idx in batches:
        b = {k: v.to(device, non_blocking=True) for k, v in dataset.__getitems__(idx).items()}
        train_step(model, optimizer, b, 0.25, precision)
    sync()
    seconds = time.perf_counter() - started
    samples = len(batches) * batch
    return {"device": str(device), "preset": preset, "precision": precision,
            "features_on_device": on_device, "questions": questions,
            "images": images, "batch": batch, "setup_s": round(setup, 2),
            "gather_only_epoch_s": round(gather, 2), "epoch_s": round(seconds, 2),
            "samples_per_s": round(samples / seconds, 1),
            "full_epoch_s_extrapolated": round(seconds * COCO_QUESTIONS / samples, 1)}


def features_benchmarks(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = 1.0 if args.full_size else args.epoch_scale
    images, questions = max(1, round(COCO_IMAGES * scale)), max(1, round(COCO_QUESTIONS * scale))
    root = tempfile.mkdtemp(prefix="vqa-features-", dir=args.work_dir)
    try:
        out: dict = {"pss": pss_benchmark(root, args.pss_images, os.path.abspath(__file__),
                                          trials=tuple(args.pss_trials))}
        store = write_synthetic_store(os.path.join(root, "store"), images)
        cache = os.path.join(root, "cache")
        workers = sorted({0, 2, *args.loader_workers})
        out["loader"] = {"images_in_store": images, "batch": 64,
                         "rows": loader_throughput(store, cache, images, workers, 64,
                                                   {"store_reader": args.reader_images,
                                                    "shared_copy": args.shared_images})}
        out["epoch"] = {"scale": scale, "coco_size": {"questions": COCO_QUESTIONS, "images": COCO_IMAGES,
                                                      "regions": REGIONS, "feat_dim": FEAT_DIM},
                        **vqa_epoch(store, cache, questions, images, args.epoch_batch, device)}
        if device.type != "cuda":
            out["epoch"]["gpu_epoch_s"] = "not measured (no GPU on this machine)"
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-ensemble", action="store_true")
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--no-features", action="store_true",
                        help="skip PSS, loader throughput and the COCO-sized epoch")
    parser.add_argument("--full-size", action="store_true",
                        help="the epoch at COCO size (82,783 images x 36 x 2048: ~12 GB of features)")
    parser.add_argument("--epoch-scale", type=float, default=0.01,
                        help="fraction of COCO's questions and images for the epoch (CPU default)")
    parser.add_argument("--epoch-batch", type=int, default=512)
    parser.add_argument("--pss-images", type=int, default=2000, help="images of the PSS copy")
    parser.add_argument("--loader-workers", type=int, nargs="*", default=[4],
                        help="loader processes measured besides 0 and 2")
    parser.add_argument("--reader-images", type=int, default=1000,
                        help="images read per store-reader run (it is slow)")
    parser.add_argument("--shared-images", type=int, default=8000,
                        help="images read per shared-copy run")
    parser.add_argument("--work-dir", default=None, help="where the synthetic stores go")
    parser.add_argument("--pss-trials", type=int, nargs="*", default=[1, 4],
                        help="concurrent trial processes of the PSS runs")
    parser.add_argument("--pss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pss-mode", default="shared", choices=PSS_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pss_child:
        return pss_child(args.pss_child, args.batch, args.pss_mode)
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"benchmark": "vqa", "device": str(device), "torch_threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "input": {"regions": REGIONS, "feat_dim": FEAT_DIM, "question_len": QUESTION_LEN,
                     "answers": NUM_ANSWERS, "vocabulary": NUM_TOKENS},
           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}
    if not args.no_training:
        out["training"] = [training_speed(p, args.batch, args.steps, device)
                           for p in ("paper", "reimplementation", "projection")]
    if not args.no_features:
        out["features"] = features_benchmarks(args)
    if not args.no_ensemble:
        out["ensemble"] = ensemble_wall_clock(args.members, args.epochs, args.cpus)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
