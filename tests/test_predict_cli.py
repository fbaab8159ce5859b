"""`ray-updown predict`: leaderboard files from checkpoints and a feature store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ray_updown import storage
from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
from ray_updown.cli import main
from ray_updown.config import to_dict
from ray_updown.data.text import Vocab
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard
from ray_updown.train.run_checkpoint import save_checkpoint_dir
from ray_updown.vqa.config import VqaTrainConfig
from ray_updown.vqa.model import VqaConfig, VqaModel

D = 8


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    records = [FeatureRecord(image_id=i, image_w=64, image_h=48,
                             boxes=np.array([[0, 0, 10, 10], [5, 5, 40, 30]], np.float32),
                             features=rng.random((2, D), dtype=np.float32)) for i in (1, 2, 3)]
    uri = str(tmp_path / "store")
    write_feature_shard(records, feature_shard_uri(uri, 0), StoreMeta(feature_dim=D, detector="test"))
    return uri


def test_predict_captions_writes_the_coco_server_file(tmp_path, store, capsys):
    torch.manual_seed(0)
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "circle"])
    config = CaptionerConfig(vocab_size=len(vocab), feat_dim=D, embed_dim=8, hidden_dim=8,
                             att_dim=8, max_len=5)
    ckpt = str(tmp_path / "captioner")
    save_checkpoint_dir(ckpt, UpDownCaptioner(config), {
        "kind": "updown_captioner", "model": to_dict(config), "vocab": vocab.itos,
        "data": {"max_regions": 10}})
    out = str(tmp_path / "leaderboard")
    assert main(["predict", "captions", "--checkpoint", ckpt, ckpt, "--features", store,
                 "--out", out, "--split", "val", "--name", "updown"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["results"].endswith("captions_val2014_updown_results.json") and summary["models"] == 2
    results = storage.read_json(summary["results"])
    assert sorted(r["image_id"] for r in results) == [1, 2, 3]
    assert all(set(r["caption"].split()) <= {"a", "red", "circle", "<unk>"} for r in results)


def test_predict_vqa_writes_the_server_file(tmp_path, store, capsys):
    questions = {"questions": [{"image_id": 1, "question": "what color is it?", "question_id": 10},
                               {"image_id": 3, "question": "is it red?", "question_id": 30}]}
    qfile = str(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json")
    storage.write_json(qfile, questions)
    qvocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "what", "color", "is", "it", "red"])
    answers = ["yes", "no", "red"]
    config = VqaConfig(num_tokens=len(qvocab), num_answers=len(answers), embed_dim=6, hidden=8,
                       feat_dim=D)
    ckpt = str(tmp_path / "vqa")
    save_checkpoint_dir(ckpt, VqaModel(config, seed=0), {
        "model": config.to_dict(), "train": to_dict(VqaTrainConfig()),
        "question_vocab": qvocab.itos, "answer_vocab": answers})
    out = str(tmp_path / "leaderboard")
    assert main(["predict", "vqa", "--checkpoint", ckpt, "--features", store, "--questions", qfile,
                 "--out", out, "--split", "test-dev2015", "--name", "updown"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["results"].endswith("vqa_OpenEnded_mscoco_test-dev2015_updown_results.json")
    results = storage.read_json(summary["results"])
    assert sorted(r["question_id"] for r in results) == [10, 30]
    assert all(r["answer"] in answers for r in results)
