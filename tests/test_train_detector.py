"""Training the detector: VG data -> targets, batches and schedule, a 2-worker Ray Train run
whose losses fall, the exported detector, the same loop in one process resuming from its
checkpoint and stopping at a time budget, and bad configurations."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch

from ray_updown.config import load_config
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.detector import load_detector
from ray_updown.detector.train.config import DetectorTrainConfig, demo_detector_config, demo_model_config
from ray_updown.detector.train.data import DetectorData, DetectorDataConfig, flips_for
from ray_updown.detector.train.loop import check_inputs, run_detector_loop, train_detector
from ray_updown.detector.train.optim import DetectorOptimConfig, learning_rate
from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.train.session import LocalSession

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    build_world(WorldConfig(num_images=16, image_size=96, captions_per_image=1,
                            questions_per_image=1, vg_questions_per_image=0, write_threads=4), root)
    return root


def tiny_config(root: str, storage_path: str, **kwargs) -> DetectorTrainConfig:
    model = demo_model_config(depth=10, width=8, rpn_channels=16, min_size=96, max_size=160,
                              anchor_sizes=(16.0, 32.0, 64.0, 128.0),
                              pooler_resolution=4, roi_batch_per_image=16,
                              rpn_post_nms_train=32, rpn_pre_nms_train=200, rpn_pre_nms_test=200,
                              rpn_post_nms_test=20, attr_embed_dim=8, attr_hidden_dim=16,
                              rpn_batch_per_image=64)
    cfg = DetectorTrainConfig(name="tiny", storage_path=storage_path,
                              data=DetectorDataConfig(root=root, load_threads=4), model=model,
                              optim=DetectorOptimConfig(lr=3e-3, warmup_steps=2),
                              epochs=3, batch_size=4, num_workers=2, cpus_per_worker=1,
                              keep_checkpoints=0)
    return dataclasses.replace(cfg, **kwargs)


def test_data_keeps_coco_splits_and_builds_targets(tiny_world):
    data = DetectorData.load(DetectorDataConfig(root=tiny_world))
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 14, "val": 1, "test": 1}  # the Karpathy split of the world
    assert data.object_vocab.names[0] == "__background__" and data.num_classes == 10
    assert data.num_attributes == 24  # "no attribute", 13 for the shapes, 3 + 7 for the backdrop
    image = data.decode("train", 96, 160)[0]
    pixels, target = image.target(flip=False)
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
    assert target.labels.min() >= 1 and target.boxes.shape == (len(target.labels), 4)
    # attributes: indices >= 1 (the colour first), padded with -1
    assert (target.attributes[:, 0] >= 1).all() and target.attributes.min() >= -1
    flipped, ftarget = image.target(flip=True)
    assert np.array_equal(flipped, pixels[:, ::-1])
    assert torch.allclose(ftarget.boxes[:, [2, 0]], 96 - target.boxes[:, [0, 2]])
    assert torch.equal(ftarget.boxes[:, [1, 3]], target.boxes[:, [1, 3]])


def test_image_without_attributes_trains_as_no_attribute(tiny_world):
    data = DetectorData.load(DetectorDataConfig(root=tiny_world))
    image = dataclasses.replace(data.decode("val", 96, 160)[0])
    image.attributes = [()] * len(image.labels)
    _, target = image.target()
    assert target.attributes[:, 0].eq(0).all() and target.attributes.shape[1] == 1


def test_flips_are_seeded_and_can_be_off():
    assert flips_for([1, 2, 3], 0, 0, 0, 0, False) == [False] * 3
    flips = flips_for(list(range(64)), 1, 2, 0, 0, True)
    assert flips == flips_for(list(range(64)), 1, 2, 0, 0, True)  # reproducible on resume
    assert 10 < sum(flips) < 54 and flips != flips_for(list(range(64)), 1, 3, 0, 0, True)


def test_learning_rate_warms_up_and_decays():
    o = DetectorOptimConfig(lr=1.0, warmup_steps=10, min_lr_fraction=0.0)
    assert learning_rate(o, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(o, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate(o, 50, 0.5) == pytest.approx(0.5)
    assert learning_rate(o, 99, 1.0) == pytest.approx(0.0)
    step = dataclasses.replace(o, schedule="step", step_milestones=(0.5, 0.8), step_gamma=0.1)
    assert [learning_rate(step, 20, p) for p in (0.4, 0.6, 0.9)] == pytest.approx([1, 0.1, 0.01])


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "det.yaml"
    path.write_text("data:\n  root: runs/world\nmodel:\n  depth: 34\n  anchor_sizes: [8, 16]\n")
    cfg = load_config(DetectorTrainConfig, str(path), ["optim.optimizer=sgd", "max_minutes=3"])
    assert cfg.model.depth == 34 and cfg.model.anchor_sizes == (8.0, 16.0)
    assert cfg.optim.optimizer == "sgd" and cfg.max_minutes == 3.0
    assert cfg.data.root == "runs/world" and cfg.model.pooler_resolution == 5
    with pytest.raises(ConfigError, match="optim.optimizer"):
        load_config(DetectorTrainConfig, None, ["optim.optimizer=adagrad"])
    with pytest.raises(ConfigError, match="depth"):
        load_config(DetectorTrainConfig, None, ["model.depth=19"])
    demo = demo_detector_config("runs/world")
    assert demo.num_workers == 2 and demo.torch_threads == 1 and 0 < demo.max_minutes <= 8


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tiny_world, tmp_path_factory):
    """3 epochs on 2 DDP workers under Ray Train."""
    cfg = tiny_config(tiny_world, str(tmp_path_factory.mktemp("runs")))
    return cfg, train_detector(cfg)


def test_two_workers_losses_fall_and_checkpoints_load(tiny_run):
    cfg, first = tiny_run
    history = first["history"]
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert first["metrics"]["epoch"] == 3 and first["metrics"]["step"] == 9
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["loss_rpn_cls"] < history[0]["loss_rpn_cls"]
    for key in ("val_map50", "val_attr_acc", "test_map50", "loss_attr", "loss_rpn_cls"):
        assert key in first["metrics"]
    assert 0.0 <= first["metrics"]["val_map50"] <= 1.0 and first["metrics"]["finished"]
    detector = load_detector(first["detector"])
    assert detector.config.num_classes == 10 and detector.object_vocab[1] == "circle"
    assert detector.config.depth == 10 and detector.attribute_vocab[1] == "red"
    # every Ray checkpoint is itself a detector directory
    assert load_detector(first["checkpoint"]).config.hash() == detector.config.hash()
    out = detector.detect([np.zeros((96, 96, 3), np.uint8)])
    assert out[0]["boxes"].shape[1] == 4


@pytest.fixture(scope="module")
def local_runs(tiny_world, tmp_path_factory):
    """The same loop in one process: 2 epochs, then re-runs with a budget for one more step."""
    folder = str(tmp_path_factory.mktemp("local"))
    cfg = tiny_config(tiny_world, folder, num_workers=1, epochs=2)
    first = LocalSession(folder)
    run_detector_loop(cfg, first)
    budget = (first.reports[-1][0]["train_seconds"] + 1e-6) / 60.0
    more = dataclasses.replace(cfg, epochs=4, max_minutes=budget)
    resumed, again = LocalSession(folder), LocalSession(folder)
    run_detector_loop(more, resumed)
    run_detector_loop(more, again)
    return cfg, folder, first.reports, resumed.reports, again.reports


def test_rerun_resumes_from_the_last_checkpoint_and_stops_at_the_budget(local_runs):
    _, _, first, resumed, again = local_runs
    assert [m["epoch"] for m, _ in first] == [1, 2] and first[-1][0]["step"] == 6
    (m, path), = resumed
    assert m["resumed_from_epoch"] == 2 and m["epoch"] == 3 and m["finished"]
    assert m["step"] == 7  # one step after the checkpoint's 6, then out of budget
    assert m["train_seconds"] > first[-1][0]["train_seconds"] and "test_map50" in m
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 7 and state["optimizer"]["state"]  # Adam moments carried over
    # A finished run re-run trains nothing and reports its last result again.
    (m_again, _), = again
    assert m_again["step"] == 7 and m_again["resumed_from_epoch"] == 3


def world_with_one_more_word(world: str, tmp_path, vocab_file: str, word: str) -> str:
    """A copy of `world` whose Visual Genome vocabulary `vocab_file` has one word more."""
    other = str(tmp_path / "world")
    shutil.copytree(world, other)
    with open(os.path.join(other, "visual_genome", vocab_file), "a") as f:
        f.write(word + "\n")
    return other


def test_resuming_with_another_vocabulary_is_refused(local_runs, tiny_world, tmp_path):
    cfg, folder, _, _, _ = local_runs
    other = world_with_one_more_word(tiny_world, tmp_path, "objects_vocab.txt", "pentagon")
    rerun = dataclasses.replace(cfg, data=DetectorDataConfig(root=other), epochs=6)
    with pytest.raises(CheckpointError, match="object_vocab does not match.*10 classes, the data 11"
                       ) as info:
        run_detector_loop(rerun, LocalSession(folder))
    assert "the last checkpoint of run tiny" in info.value.file


def test_starting_checkpoint_with_another_vocabulary_is_refused(tiny_run, tiny_world, tmp_path):
    cfg, first = tiny_run
    other = world_with_one_more_word(tiny_world, tmp_path, "attributes_vocab.txt", "shiny")
    bad = tiny_config(other, str(tmp_path / "runs"), init_from=first["detector"])
    with pytest.raises(CheckpointError, match="attribute_vocab does not match") as info:
        check_inputs(bad)
    assert info.value.file == first["detector"]
    with pytest.raises(CheckpointError, match="not a detector checkpoint"):
        check_inputs(dataclasses.replace(bad, init_from=str(tmp_path)))


def test_driver_refuses_a_rerun_with_another_vocabulary(tiny_run, tiny_world, tmp_path):
    cfg, _ = tiny_run
    other = world_with_one_more_word(tiny_world, tmp_path, "objects_vocab.txt", "pentagon")
    rerun = dataclasses.replace(cfg, data=DetectorDataConfig(root=other), epochs=6)
    with pytest.raises(CheckpointError, match="object_vocab does not match") as info:
        check_inputs(rerun)  # train_detector calls it before any worker starts
    assert "the last checkpoint of run tiny" in info.value.file


def test_bad_settings_are_config_errors(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        tiny_config(tiny_world, str(tmp_path), batch_size=1).validate()
    with pytest.raises(ConfigError, match="data.root"):
        check_inputs(tiny_config("", str(tmp_path)))
