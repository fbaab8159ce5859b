"""Checkpoint directories: round trip and strict loading with a full mismatch report."""

from __future__ import annotations

import pytest
import torch

from ray_updown.errors import CheckpointError
from ray_updown.train import common


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    common.save_checkpoint_dir(str(tmp_path), model, {"hidden": 4},
                               {"epoch": 3, "optimizer": opt.state_dict()})
    weights, config, state = common.load_checkpoint_dir(str(tmp_path))
    assert config == {"hidden": 4} and state["epoch"] == 3
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    common.load_weights_strict(fresh, weights, str(tmp_path))
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])


def test_strict_load_reports_every_problem(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights.pop("1.bias")
    weights["0.weight"] = torch.zeros(5, 3)
    weights["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        common.load_weights_strict(model, weights, "ckpt/")
    text = str(err.value)
    assert "ckpt/" in text and "missing 1: 1.bias" in text and "unexpected 1: extra" in text
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in text


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        common.load_checkpoint_dir(str(tmp_path))


def test_wandb_is_off_when_disabled_and_offline_when_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert common.init_wandb("proj", {"a": 1}) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert common.init_wandb(None, {"a": 1}) is None  # no project configured: no run
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "ray-updown-test")
    run = common.init_wandb(None, {"lr": 0.1}, name="t")
    run.log({"loss": 1.0})
    run.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


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
