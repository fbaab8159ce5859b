"""Training speed of the Up-Down VQA model and an ensemble's wall-clock on Ray, printed as JSON.

1. Training samples/s (forward + backward + optimiser step, `train_step`) at the paper's
   input size: K = 36 regions of D = 2048, 14-token questions, 3,129 answers, a 19,901-word
   vocabulary (the public re-implementation's dictionary size), for
   * the paper's model: gated tanh, hidden 512, AdaDelta;
   * the re-implementation's variant: ReLU + weight norm, hidden 1024, Adamax.
2. The wall-clock of a small ensemble (`train_ensemble`) on a local Ray cluster, on a toy VQA
   set in the real file formats whose regions encode the answers, and the official accuracy
   of each member and of the ensemble (`predict_ensemble` + `evaluate_vqa`).

    python benchmarks/vqa.py [--batch 64] [--steps 3] [--members 3] [--epochs 4] [--no-ensemble]

Runs on CPU (CUDA when available for part 1). Deterministic inputs (fixed seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from ray_updown.vqa.config import VqaTrainConfig
from ray_updown.vqa.model import VqaConfig, VqaModel
from ray_updown.vqa.train import build_optimizer, train_step

NUM_TOKENS, NUM_ANSWERS, REGIONS, FEAT_DIM, QUESTION_LEN = 19901, 3129, 36, 2048, 14


def _batch(batch_size: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    targets = torch.zeros(batch_size, NUM_ANSWERS)
    cols = torch.randint(0, NUM_ANSWERS, (batch_size, 3), generator=g)
    targets.scatter_(1, cols, torch.tensor([1.0, 0.6, 0.3]).expand(batch_size, 3))
    batch = {"question_tokens": torch.randint(1, NUM_TOKENS, (batch_size, QUESTION_LEN), generator=g),
             "feats": torch.relu(torch.randn(batch_size, REGIONS, FEAT_DIM, generator=g)),
             "mask": torch.ones(batch_size, REGIONS, dtype=torch.bool), "targets": targets}
    return {k: v.to(device) for k, v in batch.items()}


def training_speed(preset: str, batch_size: int, steps: int, device: torch.device) -> dict:
    sizes = dict(num_tokens=NUM_TOKENS, num_answers=NUM_ANSWERS, feat_dim=FEAT_DIM,
                 question_len=QUESTION_LEN)
    config = VqaConfig.paper(**sizes) if preset == "paper" else VqaConfig.reimplementation(**sizes)
    optimizer_name = "adadelta" if preset == "paper" else "adamax"
    model = VqaModel(config, seed=0).to(device).train()
    optimizer = build_optimizer(VqaTrainConfig(optimizer=optimizer_name), model.parameters())
    batch = _batch(batch_size, device)
    train_step(model, optimizer, batch, 0.25)  # warm-up (allocations, lazy imports)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, 0.25)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"preset": preset, "hidden": config.hidden, "nonlinearity": config.nonlinearity,
            "weight_norm": config.weight_norm, "optimizer": optimizer_name,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "batch": batch_size, "steps": steps, "seconds": round(seconds, 2),
            "samples_per_s": round(batch_size * steps / seconds, 1)}


# -- a toy VQA set for the ensemble --------------------------------------------------------

COLORS = ("red", "blue", "green", "yellow")


def write_toy_vqa(root: str, train_images: int, val_images: int, dim: int = 32, seed: int = 0) -> dict:
    """VQA v2 question/annotation files + a feature store; regions encode the answers."""
    from ray_updown import storage
    from ray_updown.features.store import FeatureRecord, StoreMeta, feature_shard_uri, write_feature_shard

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
    from ray_updown.ray_session import ensure_ray
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-ensemble", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"benchmark": "vqa", "device": str(device), "torch_threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "input": {"regions": REGIONS, "feat_dim": FEAT_DIM, "question_len": QUESTION_LEN,
                     "answers": NUM_ANSWERS, "vocabulary": NUM_TOKENS},
           "training": [training_speed(p, args.batch, args.steps, device)
                        for p in ("paper", "reimplementation")]}
    if not args.no_ensemble:
        out["ensemble"] = ensemble_wall_clock(args.members, args.epochs, args.cpus)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
