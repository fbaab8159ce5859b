"""VQA training on Ray: the loop (Ray Train, DDP), ensembles and ASHA sweeps (Ray Tune).

The data is a tiny VQA world in the real file formats: each image's regions encode its
answers (region 0: a colour one-hot, region 1: dog or cat, then one region per cup), so the
model can learn colour, yes/no and counting questions from a few dozen questions.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import yaml

from ray_updown import storage
from ray_updown.config import load_config
from ray_updown.errors import ConfigError, DataError
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard
from ray_updown.train.run_checkpoint import load_checkpoint_dir
from ray_updown.train.session import LocalSession
from ray_updown.vqa.config import VqaTrainConfig
from ray_updown.vqa.data import prepare_vqa_data
from ray_updown.vqa.ensemble import (
    load_vqa_checkpoint,
    predict_ensemble,
    read_manifest,
    score_questions,
    server_results_name,
    train_ensemble,
    write_server_results,
)
from ray_updown.vqa.model import VqaModel, vqa_loss
from ray_updown.vqa.sweep import BEST_CONFIG_FILE, resolve_key, run_sweep, tune_param_space
from ray_updown.vqa.train import run_vqa_loop, train_vqa

COLORS = ("red", "blue", "green")
D = 8


def _image(image_id: int, rng) -> tuple[FeatureRecord, list[tuple[str, str, str, str]]]:
    color, dog, cups = int(rng.integers(3)), bool(rng.integers(2)), int(rng.integers(1, 4))
    k = 2 + cups
    feats = rng.normal(0, 0.1, size=(k, D)).astype(np.float32)
    feats[0, color] += 2.0
    feats[1, 3 if dog else 4] += 2.0
    feats[2:, 5] += 2.0
    xy = rng.uniform(0, 50, size=(k, 2)).astype(np.float32)
    record = FeatureRecord(image_id, 100, 80, np.concatenate([xy, xy + 10], 1), feats)
    qas = [("what color is the ball?", COLORS[color], "other", "what color is the"),
           ("is there a dog?", "yes" if dog else "no", "yes/no", "is there a"),
           ("how many cups are there?", str(cups), "number", "how many")]
    return record, qas


def _write_split(root, split: str, image_ids, rng, records):
    questions, annotations = [], []
    for image_id in image_ids:
        record, qas = _image(image_id, rng)
        records.append(record)
        for j, (text, answer, answer_type, question_type) in enumerate(qas):
            qid = image_id * 10 + j
            pool = {"other": COLORS, "yes/no": ("yes", "no"), "number": ("1", "2", "3")}[answer_type]
            noise = str(rng.choice([a for a in pool if a != answer]))
            answers = [answer] * 9 + [noise]
            questions.append({"question_id": qid, "image_id": image_id, "question": text})
            annotations.append({"question_id": qid, "image_id": image_id,
                                "question_type": question_type, "answer_type": answer_type,
                                "multiple_choice_answer": answer,
                                "answers": [{"answer": a, "answer_confidence": "yes",
                                             "answer_id": n + 1} for n, a in enumerate(answers)]})
    q_uri = os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json")
    a_uri = os.path.join(root, f"v2_mscoco_{split}_annotations.json")
    storage.write_json(q_uri, {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                               "data_subtype": split, "license": {}, "questions": questions})
    storage.write_json(a_uri, {"info": {}, "data_type": "mscoco", "data_subtype": split,
                               "license": {}, "annotations": annotations})
    return q_uri, a_uri


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory):
    """Paths of a tiny VQA world: train/val questions + annotations and a feature store."""
    root = str(tmp_path_factory.mktemp("vqa"))
    rng = np.random.default_rng(0)
    records: list[FeatureRecord] = []
    train_q, train_a = _write_split(root, "train2014", range(1, 49), rng, records)
    val_q, val_a = _write_split(root, "val2014", range(101, 121), rng, records)
    store = os.path.join(root, "features")
    write_feature_shard(records, feature_shard_uri(store, 0), StoreMeta(feature_dim=D))
    return {"root": root, "train_questions": train_q, "train_annotations": train_a,
            "val_questions": val_q, "val_annotations": val_a, "features": store}


def tiny_config(paths, storage_path, name, **top) -> VqaTrainConfig:
    data = {k: paths[k] for k in ("train_questions", "train_annotations", "val_questions",
                                  "val_annotations", "features")}
    values = {"data": {**data, "answer_min_count": 1, "max_boxes": 5,
                       "feature_cache_dir": os.path.join(paths["root"], "feature-cache")},
              "model": {"hidden": 32, "embed_dim": 8, "question_len": 6},
              "optimizer": "adamax", "lr": 0.05, "epochs": 6, "batch_size": 16, "patience": 0,
              "storage_path": str(storage_path), "name": name}
    values.update(top)
    return VqaTrainConfig.from_dict(values)


# -- data and helpers (no Ray) --------------------------------------------------------------

def test_batches_hold_padded_regions_and_soft_targets(tiny_vqa, tmp_path):
    cfg = tiny_config(tiny_vqa, tmp_path, "data")
    data = prepare_vqa_data(cfg.data, question_len=6, embed_dim=8)
    assert data.stats["train_questions"] == 144 and data.stats["val_questions"] == 60
    assert sorted(data.vocabs.answers.itos) == sorted(["1", "2", "3", "blue", "green", "no", "red", "yes"])
    assert data.stats["feature_source"] == "shared"  # a tiny store fits the node's cache
    batch = data.train.__getitems__([0, 1, 2])
    # Padding per batch: K = the largest region count of the batch (images have 3-5 regions).
    k = int(batch["mask"].sum(1).max())
    assert batch["question_tokens"].shape == (3, 6) and batch["feats"].shape == (3, k, D)
    assert 3 <= k <= 5 and batch["mask"].dtype == torch.bool and batch["mask"][0].sum() >= 3
    assert torch.all(batch["feats"][~batch["mask"]] == 0)
    # 9 annotators said the answer (score 1), one said another candidate (score 0.3).
    assert sorted(batch["targets"][0][batch["targets"][0] > 0].tolist()) == pytest.approx([0.3, 1.0])


def test_shared_copy_and_store_reader_train_identically(tiny_vqa, tmp_path, monkeypatch):
    """The same run from the node's shared copy and from the store reader: same batches, so
    the same losses to the bit (CPU, fixed seeds)."""
    losses = {}
    for access in ("shared", "store"):
        cfg = tiny_config(tiny_vqa, tmp_path, access, epochs=2)
        cfg.data.feature_access, cfg.data.spatial = access, True
        data = prepare_vqa_data(cfg.data, 6, 8)
        assert data.stats["feature_source"] == access
        session = LocalSession(str(tmp_path / access))
        run_vqa_loop(cfg.to_dict(), session)
        losses[access] = [(m["train_loss"], m["val_accuracy"]) for m, _ in session.reports]
    assert losses["shared"] == losses["store"] and len(losses["shared"]) == 2
    # "auto" falls back to the store reader when the copy would not fit the node's memory.
    from ray_updown.features import shared

    monkeypatch.setattr(shared, "memory_available", lambda: 1024)
    cfg = tiny_config(tiny_vqa, tmp_path, "auto")
    cfg.data.feature_cache_dir = str(tmp_path / "empty-cache")
    assert prepare_vqa_data(cfg.data, 6, 8).stats["feature_source"] == "store"


def test_an_older_configs_features_in_memory_is_replaced_with_one_warning(caplog):
    with caplog.at_level("WARNING", logger="ray_updown.config"):
        cfg = VqaTrainConfig.from_dict({"data": {"features_in_memory": False}})
    assert cfg.data.feature_access == "store" and not hasattr(cfg.data, "features_in_memory")
    assert caplog.messages == ["data.features_in_memory: false is deprecated; write "
                               "data.feature_access: store instead"]


def test_feature_access_options_validate_and_stay_literal():
    cfg = VqaTrainConfig.from_dict({"data": {"feature_access": "store", "feature_cache_dir": "c"}})
    absolute = cfg.absolute()
    assert absolute.data.feature_access == "store"  # not a path, left alone
    assert absolute.data.feature_cache_dir == os.path.abspath("c")
    with pytest.raises(ConfigError, match="data.feature_access"):
        VqaTrainConfig.from_dict({"data": {"feature_access": "ram"}})
    with pytest.raises(ConfigError, match="data.feature_access: features_in_memory = false"):
        VqaTrainConfig.from_dict({"data": {"feature_access": "shared", "features_in_memory": False}})
    with pytest.raises(ConfigError, match="data.device_features_share"):
        VqaTrainConfig.from_dict({"data": {"device_features_share": 1.5}})
    assert VqaTrainConfig.from_dict({"data": {"features_in_memory": False}}).data.feature_access == "store"


def test_config_loads_from_yaml_with_preset(tmp_path):
    path = tmp_path / "vqa.yaml"
    data = {"train_on": ["train", "val"], "features": "f", "train_questions": "q",
            "train_annotations": "a", "val_questions": "vq", "val_annotations": "va"}
    path.write_text(yaml.safe_dump({"model": {"preset": "reimplementation"}, "optimizer": "adamax",
                                    "data": data}))
    cfg = load_config(VqaTrainConfig, str(path), ["model.hidden=256", "epochs=3"])
    base = cfg.model.base()
    assert (base.hidden, base.nonlinearity, base.weight_norm) == (256, "relu", True)
    assert cfg.data.train_on == ["train", "val"] and cfg.epochs == 3
    with pytest.raises(ConfigError, match="vqa.yaml: optimizer"):
        load_config(VqaTrainConfig, str(path), ["optimizer=sgd"])
    with pytest.raises(ConfigError, match="vqa.yaml: model.hidden: must be >= 1"):
        load_config(VqaTrainConfig, str(path), ["model.hidden=0"])
    with pytest.raises(ConfigError, match="optimizer"):
        dataclasses.replace(cfg, optimizer="sgd").validate()


# -- bad input -------------------------------------------------------------------------------

def test_question_missing_from_annotations_is_named(tiny_vqa, tmp_path):
    ann = storage.read_json(tiny_vqa["train_annotations"])
    dropped = ann["annotations"].pop(4)["question_id"]
    bad = str(tmp_path / "annotations.json")
    storage.write_json(bad, ann)
    cfg = tiny_config({**tiny_vqa, "train_annotations": bad}, tmp_path, "bad")
    with pytest.raises(DataError) as err:
        prepare_vqa_data(cfg.data, 6, 8)
    assert f"question_id {dropped}" in str(err.value) and "annotations.json" in str(err.value)


def test_image_without_features_is_named(tiny_vqa, tmp_path):
    questions = storage.read_json(tiny_vqa["val_questions"])
    annotations = storage.read_json(tiny_vqa["val_annotations"])
    questions["questions"][0]["image_id"] = annotations["annotations"][0]["image_id"] = 999
    qid = questions["questions"][0]["question_id"]
    q_uri, a_uri = str(tmp_path / "q.json"), str(tmp_path / "a.json")
    storage.write_json(q_uri, questions)
    storage.write_json(a_uri, annotations)
    cfg = tiny_config({**tiny_vqa, "val_questions": q_uri, "val_annotations": a_uri}, tmp_path, "bad")
    with pytest.raises(DataError) as err:
        prepare_vqa_data(cfg.data, 6, 8)
    text = str(err.value)
    assert "image_id 999" in text and f"question_id {qid}" in text and tiny_vqa["features"] in text
    assert text.count(f"question_id {qid}") == 1


def test_empty_answer_vocabulary_is_a_clear_error(tiny_vqa, tmp_path):
    cfg = tiny_config(tiny_vqa, tmp_path, "bad")
    cfg.data.answer_min_count = 10_000
    with pytest.raises(DataError, match="empty answer vocabulary.*answer_min_count = 10000"):
        prepare_vqa_data(cfg.data, 6, 8)


def test_glove_of_the_wrong_dimension_is_named(tiny_vqa, tmp_path):
    glove = tmp_path / "glove.5d.txt"
    glove.write_text("what 0.1 0.2 0.3 0.4 0.5\ncolor 0.1 0.2 0.3 0.4 0.5\n")
    cfg = tiny_config(tiny_vqa, tmp_path, "bad")
    cfg.data.glove = str(glove)
    with pytest.raises(DataError) as err:
        prepare_vqa_data(cfg.data, 6, 8)
    assert "glove.5d.txt" in str(err.value) and "expected dim = 8" in str(err.value)


def test_search_space_errors_name_the_key(tiny_vqa, tmp_path):
    cfg = tiny_config(tiny_vqa, tmp_path, "space")
    assert resolve_key("hidden", cfg) == ["model", "hidden"] and resolve_key("lr", cfg) == ["lr"]
    with pytest.raises(ConfigError, match="space.hiden"):
        tune_param_space(cfg, {"hiden": {"choice": [8]}})
    with pytest.raises(ConfigError, match="space.lr"):
        tune_param_space(cfg, {"lr": {"loguniform": [0, 1]}})
    with pytest.raises(ConfigError, match="space.optimizer"):
        tune_param_space(cfg, {"optimizer": {"choice": ["adamax", "sgd"]}})
    assert server_results_name("test-dev2015", "updown") == \
        "vqa_OpenEnded_mscoco_test-dev2015_updown_results.json"
    with pytest.raises(ConfigError):
        server_results_name("test-std", "updown")


def test_early_stopping_on_val_accuracy_and_restart_after_it(tiny_vqa, tmp_path):
    # A learning rate this small leaves the accuracy flat: the second epoch is no better.
    cfg = tiny_config(tiny_vqa, tmp_path, "stop", lr=1e-12, patience=1, epochs=6)
    session = LocalSession(str(tmp_path / "stop"))
    run_vqa_loop(cfg.to_dict(), session)
    assert [m["epoch"] for m, _ in session.reports] == [1, 2]
    assert session.reports[-1][0]["stopped_early"] is True
    _, _, state = load_checkpoint_dir(session.reports[-1][1])
    assert state["epoch"] == 2 and state["done"] is True and "optimizer" in state
    # Restarting from the last checkpoint does not train past the stop.
    again = LocalSession(str(tmp_path / "stop"))
    run_vqa_loop(cfg.to_dict(), again)
    assert again.reports == []
    # Training on train+val (server runs) never stops early: val is training data then.
    cfg.data.train_on = ["train", "val"]
    cfg.epochs = 3
    server = LocalSession(str(tmp_path / "server"))
    run_vqa_loop(cfg.to_dict(), server)
    assert [m["epoch"] for m, _ in server.reports] == [1, 2, 3]
    assert server.reports[0][0]["samples_per_s"] > 0


def test_the_learning_rate_warms_up_linearly_then_holds_and_resumes_mid_warmup(tiny_vqa, tmp_path,
                                                                              monkeypatch):
    import ray_updown.vqa.train as vqa_train

    seen: list[float] = []  # the lr of each step, as the optimizer takes it
    plain_step = vqa_train.train_step

    def recording_step(model, optimizer, *args):
        seen.append(optimizer.param_groups[0]["lr"])
        return plain_step(model, optimizer, *args)

    monkeypatch.setattr(vqa_train, "train_step", recording_step)
    cfg = tiny_config(tiny_vqa, tmp_path, "warm", lr=0.04, warmup_epochs=1.5, epochs=3)
    run_vqa_loop(cfg.to_dict(), LocalSession(str(tmp_path / "warm")))
    steps = len(seen) // 3
    warm = round(1.5 * steps)
    assert steps >= 2
    assert seen == pytest.approx([0.04 * (k + 1) / warm for k in range(warm)]
                                 + [0.04] * (3 * steps - warm))
    # Stopped after its first epoch, a run resumes the warmup where it was.
    full, seen[:] = list(seen), []
    run_vqa_loop(dataclasses.replace(cfg, epochs=1).to_dict(), LocalSession(str(tmp_path / "cut")))
    run_vqa_loop(cfg.to_dict(), LocalSession(str(tmp_path / "cut")))
    assert seen == pytest.approx(full)
    # Without warmup every step takes the full lr; a negative warmup is refused by name.
    seen[:] = []
    run_vqa_loop(dataclasses.replace(cfg, warmup_epochs=0.0, epochs=1).to_dict(),
                 LocalSession(str(tmp_path / "flat")))
    assert seen == [0.04] * steps
    with pytest.raises(ConfigError, match="warmup_epochs"):
        dataclasses.replace(cfg, warmup_epochs=-1.0).validate()


# -- Ray -------------------------------------------------------------------------------------

def _train_loss(model: VqaModel, dataset) -> float:
    batch = dataset.__getitems__(list(range(len(dataset))))
    model.eval()
    with torch.no_grad():
        return float(vqa_loss(model(batch["question_tokens"], batch["feats"], batch["mask"]),
                              batch["targets"]))


def test_train_vqa_two_workers_learns_and_resumes(ray_cluster, tiny_vqa, tmp_path):
    cfg = tiny_config(tiny_vqa, tmp_path / "runs", "single", num_workers=2)
    out = train_vqa(cfg)

    assert out["metrics"]["epoch"] == 6
    trained = load_vqa_checkpoint(out["latest_checkpoint"])
    data = prepare_vqa_data(cfg.data, 6, 8, vocabs=trained.vocabs)
    fresh = VqaModel(trained.model.config, seed=cfg.seed)
    assert _train_loss(trained.model, data.train) < 0.6 * _train_loss(fresh, data.train)
    assert out["best_val_accuracy"] > 0.5  # chance is ~1/3 per question type
    # Re-running with more epochs resumes from the checkpoint instead of starting over.
    cfg.epochs = 7
    again = train_vqa(cfg)
    assert out["metrics"]["resumed_from_epoch"] == 0
    assert again["metrics"]["epoch"] == 7 and again["metrics"]["resumed_from_epoch"] == 6


class InterruptOnce:
    """A Tune callback that kills the driver's run when the first trial completes (once)."""

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self):
        from ray import tune

        flag = self.flag

        class _Interrupt(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                if os.path.exists(flag):
                    os.remove(flag)
                    raise KeyboardInterrupt("simulated interruption of the driver")

        return _Interrupt()


def _snapshot(folder: str) -> dict[str, float]:
    """Checkpoint files with their modification times (training writes one per epoch)."""
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files if "/checkpoint_" in d + "/"}


def _by_hand(checkpoints, cfg):
    """Average the members' sigmoid scores without the ensemble code."""
    from ray_updown.vqa.data import VqaVocabularies
    from ray_updown.vqa.model import VqaConfig

    total = None
    for uri in checkpoints:
        weights, config, _ = load_checkpoint_dir(uri)
        model = VqaModel(VqaConfig.from_dict(config["model"]))
        model.load_state_dict(weights)
        model.eval()
        vocabs = VqaVocabularies.from_json(config)
        val = prepare_vqa_data(cfg.data, 6, 8, vocabs=vocabs).val
        batch = val.__getitems__(list(range(len(val))))
        with torch.no_grad():
            scores = torch.sigmoid(model(batch["question_tokens"], batch["feats"], batch["mask"]))
        total = scores if total is None else total + scores
    mean = total / len(checkpoints)
    answers = [vocabs.answers.itos[i] for i in mean.argmax(1).tolist()]
    return dict(zip(batch["question_id"].tolist(), answers)), mean


def _official_accuracy_by_hand(annotations_file: str, predicted: dict[int, str]) -> dict:
    """VQA accuracy of `predicted` in percent: per question the mean over the 10 annotators of
    min(1, matches among the other 9 / 3); the world's answers need no normalising."""
    annotations = json.loads(open(annotations_file).read())["annotations"]
    scores: dict[str, list[float]] = {}
    for a in annotations:
        answers = [x["answer"] for x in a["answers"]]
        guess = predicted[a["question_id"]]
        score = np.mean([min(1.0, sum(o == guess for o in answers[:i] + answers[i + 1:]) / 3)
                         for i in range(len(answers))])
        scores.setdefault(a["answer_type"], []).append(100 * score)
    out = {t: float(np.mean(v)) for t, v in scores.items()}
    out["overall"] = float(np.mean([x for v in scores.values() for x in v]))
    return out


def test_ensemble_of_three_averages_members_and_resumes(ray_cluster, tiny_vqa, tmp_path):
    cfg = tiny_config(tiny_vqa, tmp_path / "runs", "ens", epochs=2)
    flag = tmp_path / "interrupt.flag"
    flag.write_text("1")
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(cfg, members=3, max_concurrent_trials=1,
                       callbacks=[InterruptOnce(str(flag))()])
    experiment = tmp_path / "runs" / "ens" / "members-000"
    first_trials = [p for p in experiment.iterdir() if p.name.startswith("vqa_trainable")]
    assert len(first_trials) == 1  # the driver died after member 0, before members 1 and 2
    before = _snapshot(str(first_trials[0]))
    assert before

    manifest = train_ensemble(cfg, members=3)  # resumes the interrupted experiment
    assert [m["seed"] for m in manifest["members"]] == [0, 1, 2]
    assert {m["experiment"] for m in manifest["members"]} == {"members-000"}
    assert _snapshot(str(first_trials[0])) == before  # member 0 was not trained again
    assert manifest["members"][0]["checkpoint"].startswith(str(first_trials[0]))
    assert read_manifest(manifest["uri"])["members"] == manifest["members"]

    # The averaged prediction equals averaging the members by hand.
    store = tiny_vqa["features"]
    checkpoints = [m["checkpoint"] for m in manifest["members"]]
    predicted = predict_ensemble(manifest["uri"], tiny_vqa["val_questions"], store)
    expected, mean = _by_hand(checkpoints, cfg)
    assert predicted == expected
    ids, scores, _ = score_questions(checkpoints, tiny_vqa["val_questions"], store)
    assert ids.tolist() == list(expected) and torch.allclose(scores, mean, atol=1e-6)
    # Server files: the official name; the official metric reads them back.
    uri = write_server_results(predicted, str(tmp_path / "results"), "tiny", "val2014")
    assert uri.endswith("vqa_OpenEnded_mscoco_val2014_tiny_results.json")
    from ray_updown.metrics.vqa_eval import evaluate_vqa

    accuracy = evaluate_vqa(tiny_vqa["val_questions"], tiny_vqa["val_annotations"], uri)
    by_hand = _official_accuracy_by_hand(tiny_vqa["val_annotations"], predicted)
    assert accuracy["overall"] == pytest.approx(by_hand.pop("overall"), abs=0.01)
    assert accuracy["perAnswerType"] == pytest.approx(by_hand, abs=0.01)

    # Asking for one more member trains only that one, in a new experiment.
    members_before = _snapshot(str(experiment))
    grown = train_ensemble(cfg, members=4)
    assert [m["seed"] for m in grown["members"]] == [0, 1, 2, 3]
    assert grown["members"][:3] == manifest["members"]
    assert grown["members"][3]["experiment"] == "members-001"
    assert _snapshot(str(experiment)) == members_before
    # Nothing left to train: returns the manifest as it is.
    assert train_ensemble(cfg, members=4)["members"] == grown["members"]
    assert not (tmp_path / "runs" / "ens" / "members-002").exists()


def test_asha_sweep_writes_a_best_config_the_ensemble_starts_from(ray_cluster, tiny_vqa, tmp_path,
                                                                  s3_bucket):
    cfg = tiny_config(tiny_vqa, tmp_path / "runs", "sweep", epochs=3)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"loguniform": [0.005, 0.1]},
                                     "hidden": {"choice": [16, 32]}}))
    best = run_sweep(cfg, str(space), num_samples=4, max_concurrent=2)
    best_uri = tmp_path / "runs" / "sweep" / BEST_CONFIG_FILE
    from_file = load_config(VqaTrainConfig, str(best_uri))
    assert from_file == best
    assert 0.005 <= best.lr <= 0.1 and best.model.hidden in (16, 32)
    summary = json.loads((tmp_path / "runs" / "sweep" / "sweep_results.json").read_text())
    assert len(summary["trials"]) == 4 and summary["scheduler"] == "ASHA"
    assert summary["trials"][0]["config"] == {"lr": best.lr, "hidden": best.model.hidden}
    assert all(1 <= t["epochs"] <= 3 for t in summary["trials"])
    # The ensemble starts from the best config file (its checkpoints in object storage).
    manifest = train_ensemble(str(best_uri), members=1,
                              overrides=["epochs=1", f"storage_path={s3_bucket}/runs"])
    assert manifest["uri"] == f"{s3_bucket}/runs/sweep/ensemble.json"
    assert manifest["members"][0]["checkpoint"].startswith(f"{s3_bucket}/runs/sweep/members-000/")
    member = load_vqa_checkpoint(manifest["members"][0]["checkpoint"])
    assert member.model.config.hidden == best.model.hidden
    assert member.train_config.lr == pytest.approx(best.lr)


def test_tune_runs_log_to_wandb_through_rays_callback_when_a_project_is_configured(tmp_path,
                                                                                   monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback

    from ray_updown.vqa.config import VqaTrainConfig
    from ray_updown.vqa.train import tune_run_config

    def wandb_callbacks(cfg):
        run_config = tune_run_config(cfg, str(tmp_path), "exp")
        return [c for c in run_config.callbacks or [] if isinstance(c, WandbLoggerCallback)]

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_callbacks(VqaTrainConfig()) == []
    (callback,) = wandb_callbacks(VqaTrainConfig(wandb_project="from-config"))
    assert callback.project == "from-config" and callback.group == "exp"
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    (callback,) = wandb_callbacks(VqaTrainConfig())
    assert callback.project == "from-env"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_callbacks(VqaTrainConfig()) == []
