"""Training the captioner: data batches, XE on 2 Ray Train workers with resume, SCST (both
forms) on a tiny overfit set, evaluation files and metrics, and bad input.

The toy world: each image holds two objects; its five captions name them ("a dog next to a
cat", ...), and its region features carry them (one region per object with the object's
one-hot code, the first-named one flagged, plus 1-3 distractor regions), so captioning is
learnable in a few dozen steps of a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_updown.captioning.config import CaptionModelConfig, CaptionTrainConfig, OptimConfig
from ray_updown.captioning.data import CaptionData, CaptionDataConfig, make_loader
from ray_updown.captioning.model import UpDownCaptioner
from ray_updown.captioning.objectives import CiderReward, SCSTConfig, greedy_cider, scst_loss, xe_loss
from ray_updown.captioning.predict import evaluate_split, load_captioner, predict_captions, predict_with_attention
from ray_updown.captioning.train import checkpoint_config, model_config, run_captioner_loop, train_captioner
from ray_updown.errors import CheckpointError, ConfigError, DataError
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard
from ray_updown.train.run_checkpoint import load_checkpoint_dir, save_checkpoint_dir
from ray_updown.train.session import LocalSession
from ray_updown.train.worker import shard_batches

OBJECTS = ["dog", "cat", "car", "tree", "boat", "bird", "horse", "ball"]
TEMPLATES = ["a {a} next to a {b}", "a {a} and a {b}", "the {a} is near the {b}",
             "a {a} with a {b}", "there is a {a} by a {b}"]
FEATURE_DIM = len(OBJECTS) + 2
CPU = torch.device("cpu")


def build_toy_world(root, n_train=32, n_val=6, n_test=6, seed=0, without_features=(),
                    without_captions=()):
    """(karpathy uri, feature store uri) of a toy world in `root`."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    pairs = [(a, b) for a in OBJECTS for b in OBJECTS if a != b]
    rng.shuffle(pairs)
    images, records = [], []
    for i, split in enumerate(["train"] * n_train + ["val"] * n_val + ["test"] * n_test):
        (a, b), image_id = pairs[i % len(pairs)], i + 1
        folder = "train2014" if split == "train" else "val2014"
        sentences = [] if image_id in without_captions else [
            {"tokens": t.format(a=a, b=b).split(), "raw": t.format(a=a, b=b).capitalize() + "."}
            for t in TEMPLATES]
        images.append({"cocoid": image_id, "filepath": folder, "split": split,
                       "filename": f"COCO_{folder}_{image_id:012d}.jpg", "sentences": sentences})
        k = 2 + int(nrng.integers(1, 4))  # 3-5 regions: batches need padding
        feats = nrng.normal(0, 0.1, (k, FEATURE_DIM)).astype(np.float32)
        feats[0, OBJECTS.index(a)] += 1.0
        feats[0, -2] = 1.0  # the object named first
        feats[1, OBJECTS.index(b)] += 1.0
        boxes = np.array([[j, j, 20 + j, 30 + j] for j in range(k)], dtype=np.float32)
        order = nrng.permutation(k)
        if image_id not in without_features:
            records.append(FeatureRecord(image_id, 64, 48, boxes[order], feats[order]))
    os.makedirs(root, exist_ok=True)
    karpathy = os.path.join(root, "dataset_coco.json")
    with open(karpathy, "w") as f:
        json.dump({"dataset": "coco", "images": images}, f)
    store = os.path.join(root, "features")
    write_feature_shard(records, feature_shard_uri(store, 0), StoreMeta(feature_dim=FEATURE_DIM))
    return karpathy, store


def toy_config(karpathy, store, tmp_path, **kwargs) -> CaptionTrainConfig:
    data = CaptionDataConfig(karpathy=karpathy, features=store, vocab_min_count=2, val_images=6)
    cfg = CaptionTrainConfig(name="toy", storage_path=str(tmp_path / "runs"), data=data,
                             model=CaptionModelConfig(16, 32, 16, 0.0),
                             optim=OptimConfig("adam", 0.02, schedule="constant"),
                             epochs=2, batch_size=4, num_workers=2)
    return dataclasses.replace(cfg, **kwargs)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    return build_toy_world(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="module")
def xe_run(ray_cluster, toy_world, tmp_path_factory):
    """A 2-worker XE run of 2 epochs, then the same run resumed to 3 epochs."""
    tmp = tmp_path_factory.mktemp("xe")
    cfg = toy_config(*toy_world, tmp)
    first = train_captioner(cfg)
    second = train_captioner(dataclasses.replace(cfg, epochs=3))
    return cfg, first, second


def test_batches_pad_regions_and_captions(toy_world):
    data = CaptionData.load(CaptionDataConfig(karpathy=toy_world[0], features=toy_world[1],
                                              vocab_min_count=2, max_len=4, spatial=True))
    assert data.vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and "dog" in data.vocab
    # Worker 1 of 2 with 6 images a step: 3 images of each of the 5 full steps of 32 images.
    batches = shard_batches(len(data.train_ids), 6, rank=1, world=2, seed=0)
    loader = make_loader(data, data.open_regions(), data.train_ids, batches)
    assert len(loader) == 5
    batch = next(iter(loader))
    assert batch.image_ids == [data.train_ids[i] for i in batches[0]]
    assert batch.feats.shape[0] == 3 and batch.feats.shape[2] == FEATURE_DIM + 7
    assert batch.mask.sum(1).min() >= 3 and not bool(batch.feats[~batch.mask].any())
    assert batch.num_captions == 15 and batch.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # targets: at most max_len words then EOS; inputs: BOS then the targets shifted right
    assert batch.targets.shape[1] == 5 and (batch.targets == data.vocab.eos_id).sum() == 15
    assert torch.equal(batch.inputs[:, 0], torch.full((15,), data.vocab.bos_id))
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    words = data.vocab.decode(batch.targets[0].tolist())
    assert words == " ".join(data.images[batch.image_ids[0]].tokens[0][:4])


def test_the_loop_runs_without_ray_and_resumes_from_its_last_checkpoint(toy_world, tmp_path):
    cfg = toy_config(*toy_world, tmp_path, num_workers=1, epochs=1)
    first = LocalSession(str(tmp_path / "local"))
    run_captioner_loop(cfg, first)
    (metrics, path), = first.reports
    assert metrics["epoch"] == 1 and metrics["step"] == 8 and metrics["val_cider_d"] >= 0
    weights, config, state = load_checkpoint_dir(path)
    assert state["epoch"] == 1 and state["step"] == 8 and state["objective"] == "xe"
    assert config["vocab"] and set(weights) == set(UpDownCaptioner(
        model_config(cfg, CaptionData.load(cfg.data).vocab, FEATURE_DIM)).state_dict())
    again = LocalSession(str(tmp_path / "local"))
    run_captioner_loop(dataclasses.replace(cfg, epochs=2), again)
    (metrics, _), = again.reports
    assert metrics["epoch"] == 2 and metrics["resumed_from_epoch"] == 1 and metrics["step"] == 16


def test_xe_on_two_workers_learns_and_resumes(xe_run):
    cfg, first, second = xe_run
    assert [m["epoch"] for m in first["history"]] == [1, 2]
    assert first["history"][-1]["loss"] < first["history"][0]["loss"]
    # the second run continued at epoch 3 from the last checkpoint instead of restarting
    assert [m["epoch"] for m in second["history"]] == [1, 2, 3]
    assert second["metrics"]["epoch"] == 3 and second["metrics"]["resumed_from_epoch"] == 2
    assert second["history"][:2] == first["history"]
    assert second["metrics"]["loss"] < first["history"][0]["loss"]
    assert second["metrics"]["step"] == 3 * first["history"][0]["step"]
    assert "val_cider_d" in second["metrics"] and second["checkpoint"] != first["checkpoint"]
    loaded = load_captioner(second["checkpoint"])
    assert loaded.model.config.vocab_size == len(loaded.vocab) and loaded.max_regions == 100


def test_scst_beam_form_runs_on_ray_from_the_xe_checkpoint(xe_run, tmp_path):
    cfg, _, xe = xe_run
    scst = dataclasses.replace(cfg, name="toy-scst", objective="scst", epochs=1,
                               storage_path=str(tmp_path / "runs"),
                               scst=SCSTConfig(form="beam", lr=1e-3, init_from=xe["checkpoint"]))
    out = train_captioner(scst)
    assert out["metrics"]["objective"] == "scst" and out["metrics"]["epoch"] == 1
    assert out["metrics"]["train_reward"] > 0 and np.isfinite(out["metrics"]["loss"])
    start, tuned = load_captioner(xe["checkpoint"]), load_captioner(out["checkpoint"])
    assert tuned.config["objective"] == "scst" and tuned.vocab.itos == start.vocab.itos
    changed = [n for n, p in tuned.model.named_parameters()
               if not torch.equal(p, dict(start.model.named_parameters())[n])]
    assert changed  # the policy gradient moved the weights


def _overfit_setup(toy_world, xe_steps):
    data = CaptionData.load(CaptionDataConfig(karpathy=toy_world[0], features=toy_world[1],
                                              vocab_min_count=2, train_images=8, val_images=0))
    regions = data.open_regions()
    cfg = toy_config(*toy_world, Path("unused"))
    torch.manual_seed(0)
    model = UpDownCaptioner(model_config(cfg, data.vocab, regions.feature_dim))
    batch = next(iter(make_loader(data, regions, data.train_ids, [list(range(8))])))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(xe_steps):
        loss, _ = xe_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), batch, CiderReward(data.training_references(), data.vocab)


def _scst_steps(model, batch, reward, scst, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=scst.lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = scst_loss(model, batch, reward, scst, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_scst_beam_form_raises_greedy_cider_on_an_overfit_set(toy_world):
    model, batch, reward = _overfit_setup(toy_world, xe_steps=25)
    before = greedy_cider(model, [batch], reward, CPU)[0] / 8
    _scst_steps(model, batch, reward, SCSTConfig(form="beam", lr=1e-3), steps=15)
    after = greedy_cider(model, [batch], reward, CPU)[0] / 8
    assert after > before + 0.3, (before, after)


@pytest.mark.parametrize("baseline", ["greedy", "mean_of_others"])
def test_scst_sample_form_raises_expected_cider(toy_world, baseline):
    from ray_updown.captioning.decoding import sample_decode

    model, batch, reward = _overfit_setup(toy_world, xe_steps=25)

    def expected_reward() -> float:  # 16 samples of each image, fixed seed
        g = torch.Generator().manual_seed(1)
        tokens = sample_decode(model, batch.feats, batch.mask, num_samples=16, generator=g).tokens
        with torch.no_grad():
            return float(reward(tokens, [r for r in batch.references for _ in range(16)]).mean())

    before = expected_reward()
    _scst_steps(model, batch, reward, SCSTConfig(form="sample", baseline=baseline, lr=4e-3),
                steps=30)
    assert expected_reward() > before + 0.1, before


def test_evaluate_split_writes_server_file_and_all_metrics(xe_run, tmp_path):
    cfg, _, xe = xe_run
    out = evaluate_split(xe["checkpoint"], cfg.data.karpathy, cfg.data.features, split="test",
                         name="toy", out_dir=str(tmp_path))
    assert out["results_file"].endswith("captions_test2014_toy_results.json")
    with open(out["results_file"]) as f:
        records = json.load(f)
    assert sorted(r["image_id"] for r in records) == list(range(39, 45))
    assert {r["image_id"]: r["caption"] for r in records} == out["captions"]
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0.0 <= out["metrics"][key] <= 10.0, key
    assert out["metrics"]["Bleu_1"] > 0  # 24 steps already say "a ..."
    assert out["metrics"]["num_images"] == 6


def test_predictions_of_an_ensemble_and_attention(xe_run):
    cfg, first, second = xe_run
    a, b = load_captioner(first["checkpoint"]), load_captioner(second["checkpoint"])
    from ray_updown.features.reader import FeatureStore

    store = FeatureStore(cfg.data.features)
    captions = predict_captions([a.model, b.model], store, [39, 40], a.vocab, beam_size=3)
    assert set(captions) == {39, 40} and all(isinstance(c, str) for c in captions.values())
    pictures = predict_with_attention(b.model, store, [39, 40], b.vocab)
    for image_id, p in pictures.items():
        k = store.get(image_id).num_boxes
        assert p.attention.shape == (len(p.words) + 1, k) and p.boxes.shape == (k, 4)
        np.testing.assert_allclose(p.attention.sum(1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- bad input
def test_image_without_features_is_named(tmp_path):
    karpathy, store = build_toy_world(str(tmp_path), without_features={5})
    with pytest.raises(DataError, match=r"image 5 has no region features") as err:
        train_captioner(toy_config(karpathy, store, tmp_path))  # fails before Ray starts
    assert store in str(err.value)


def test_checkpoint_with_another_vocabulary_is_refused(toy_world, tmp_path):
    cfg = toy_config(*toy_world, tmp_path)
    data = CaptionData.load(cfg.data)
    other = CaptionData.load(dataclasses.replace(cfg.data, vocab_min_count=40))  # fewer words
    model = UpDownCaptioner(model_config(cfg, other.vocab, FEATURE_DIM))
    save_checkpoint_dir(str(tmp_path / "ckpt"), model,
                        checkpoint_config(cfg, model.config, other.vocab))
    scst = dataclasses.replace(cfg, objective="scst",
                               scst=SCSTConfig(init_from=str(tmp_path / "ckpt")))
    with pytest.raises(CheckpointError, match="vocabulary does not match") as err:
        train_captioner(scst)
    assert str(tmp_path / "ckpt") in str(err.value)
    assert f"{len(other.vocab)} words, the data {len(data.vocab)}" in str(err.value)


def test_image_without_references_is_named(toy_world, tmp_path):
    karpathy, store = build_toy_world(str(tmp_path), without_captions={3, 40})
    with pytest.raises(DataError, match="image 3: has no reference captions"):
        CaptionData.load(CaptionDataConfig(karpathy=karpathy, features=store, vocab_min_count=2))
    cfg = toy_config(*toy_world, tmp_path)
    data = CaptionData.load(cfg.data)
    model = UpDownCaptioner(model_config(cfg, data.vocab, FEATURE_DIM))
    save_checkpoint_dir(str(tmp_path / "m"), model,
                        checkpoint_config(cfg, model.config, data.vocab))
    with pytest.raises(DataError, match="image 40: has no reference captions"):
        evaluate_split(str(tmp_path / "m"), karpathy, store, split="test")


def test_a_worker_error_reaches_the_caller_as_the_package_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from ray_updown.errors import package_error

    failure = RuntimeError("wrapped")
    failure.__cause__ = CheckpointError("vocabulary does not match", file="ckpt/")
    error = package_error(WorkerGroupError("worker 1 failed", {1: failure}))
    assert type(error) is CheckpointError and str(error) == "ckpt/: vocabulary does not match"
    assert package_error(WorkerGroupError("oom", {0: MemoryError()})) is None


def test_unknown_split_is_refused(toy_world, tmp_path):
    with pytest.raises(ConfigError, match="unknown split 'testing'"):
        evaluate_split("no-such-checkpoint", *toy_world, split="testing")
    bad = CaptionDataConfig(karpathy=toy_world[0], features=toy_world[1], val_split="bogus")
    with pytest.raises(ConfigError, match="data.val_split: expected one of .*'bogus'"):
        CaptionData.load(bad)
    with pytest.raises(ConfigError, match="objective"):
        CaptionTrainConfig(objective="rl").validate()


def test_bf16_training_follows_the_fp32_loss_curve(toy_world, tmp_path):
    """Three epochs of XE, then an SCST epoch, in fp32 and in bf16 autocast: each epoch's
    training loss within 10% of fp32's (bf16 keeps 8 bits of mantissa; no loss scaling)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = toy_config(*toy_world, tmp_path / precision, num_workers=1, epochs=3,
                         precision=precision)
        session = LocalSession(str(tmp_path / precision / "xe"))
        run_captioner_loop(cfg, session)
        losses[precision] = [m["loss"] for m, _ in session.reports]
        scst = dataclasses.replace(cfg, objective="scst", epochs=1, scst=SCSTConfig(
            form="beam", lr=1e-3, init_from=session.reports[-1][1]))
        tuned = LocalSession(str(tmp_path / precision / "scst"))
        run_captioner_loop(scst, tuned)
        (metrics, _), = tuned.reports
        assert np.isfinite(metrics["loss"]) and metrics["train_reward"] > 0
    assert losses["fp32"][-1] < losses["fp32"][0]
    assert np.allclose(losses["bf16"], losses["fp32"], rtol=0.10), losses
