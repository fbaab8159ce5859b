"""A tiny VQA world in the real file formats, shared by the fault and cluster suites (each
runs in its own pytest process): regions encode each image's answers, as in
tests/test_train_vqa.py, so a model has something to learn."""

from __future__ import annotations

import os

import numpy as np

from ray_updown import storage
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard

COLORS = ("red", "blue", "green")
DIM = 8


def write_vqa_world(root: str, train_images: int = 24, val_images: int = 8) -> dict:
    """Questions, annotations and a feature store; returns a VqaTrainConfig data section.
    Region 0 carries a colour, region 1 a dog or a cat: colour and yes/no questions."""
    rng = np.random.default_rng(0)
    records, paths = [], {}
    for split, ids in (("train2014", range(1, train_images + 1)),
                       ("val2014", range(1001, 1001 + val_images))):
        questions, annotations = [], []
        for image_id in ids:
            color, dog = int(rng.integers(3)), bool(rng.integers(2))
            feats = rng.normal(0, 0.1, size=(3, DIM)).astype(np.float32)
            feats[0, color] += 2.0
            feats[1, 3 if dog else 4] += 2.0
            xy = rng.uniform(0, 50, size=(3, 2)).astype(np.float32)
            records.append(FeatureRecord(image_id, 100, 80, np.concatenate([xy, xy + 10], 1),
                                         feats))
            for j, (text, answer, kind, qtype) in enumerate((
                    ("what color is the ball?", COLORS[color], "other", "what color is the"),
                    ("is there a dog?", "yes" if dog else "no", "yes/no", "is there a"))):
                qid = image_id * 10 + j
                questions.append({"question_id": qid, "image_id": image_id, "question": text})
                annotations.append({"question_id": qid, "image_id": image_id,
                                    "question_type": qtype, "answer_type": kind,
                                    "multiple_choice_answer": answer,
                                    "answers": [{"answer": answer, "answer_confidence": "yes",
                                                 "answer_id": n + 1} for n in range(10)]})
        key = split[:-4]
        paths[f"{key}_questions"] = os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json")
        paths[f"{key}_annotations"] = os.path.join(root, f"v2_mscoco_{split}_annotations.json")
        storage.write_json(paths[f"{key}_questions"], {
            "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
            "license": {}, "questions": questions})
        storage.write_json(paths[f"{key}_annotations"], {
            "info": {}, "data_type": "mscoco", "data_subtype": split, "license": {},
            "annotations": annotations})
    paths["features"] = os.path.join(root, "features")
    write_feature_shard(records, feature_shard_uri(paths["features"], 0), StoreMeta(feature_dim=DIM))
    return {**paths, "answer_min_count": 1, "max_boxes": 3}


def vqa_config(data: dict, storage_path: str, name: str, **top):
    """A tiny VqaTrainConfig over write_vqa_world's data."""
    from ray_updown.vqa.config import VqaTrainConfig

    values = {"data": data, "model": {"hidden": 16, "embed_dim": 8, "question_len": 6},
              "optimizer": "adamax", "lr": 0.05, "epochs": 3, "batch_size": 8, "patience": 0,
              "storage_path": storage_path, "name": name, **top}
    return VqaTrainConfig.from_dict(values)
