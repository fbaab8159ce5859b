"""Trial resources and the captioner sweep's checks before Ray starts (no cluster needed; the
runs themselves are in tests/cluster/)."""

from __future__ import annotations

import pytest

from ray_updown.captioning.config import CaptionTrainConfig
from ray_updown.captioning.data import CaptionDataConfig
from ray_updown.captioning.sweep import run_captioner_sweep
from ray_updown.errors import ConfigError
from ray_updown.train.search import resolve_key, trial_resources, tune_param_space


def test_trial_resources_carry_fractional_gpus_and_custom_resources():
    assert trial_resources(1, 0.25, {"member_node": 1}) == {"cpu": 1.0, "gpu": 0.25,
                                                            "member_node": 1.0}
    assert trial_resources(2) == {"cpu": 2.0}
    with pytest.raises(ConfigError, match="resources.GPU: 'GPU' is not a custom resource"):
        trial_resources(1, 0, {"GPU": 1})
    with pytest.raises(ConfigError, match="resources.spot: must be a positive number"):
        trial_resources(1, 0, {"spot": 0})


def test_search_spaces_work_on_the_captioner_config():
    cfg = CaptionTrainConfig()
    assert resolve_key("hidden_dim", cfg) == ["model", "hidden_dim"]
    with pytest.raises(ConfigError, match=r"space\.lr: ambiguous: in sections \['optim', 'scst'\]"):
        resolve_key("lr", cfg)
    space = tune_param_space(cfg, {"optim.lr": {"loguniform": [1e-3, 0.1]}, "epochs": 3})
    assert space["epochs"] == 3 and space["optim"]["lr"].lower == 1e-3
    with pytest.raises(ConfigError, match=r"space\.objective: value 'rl'"):
        tune_param_space(cfg, {"objective": {"choice": ["xe", "rl"]}})


def test_captioner_sweep_refuses_bad_settings_before_ray_starts(tmp_path):
    cfg = CaptionTrainConfig(data=CaptionDataConfig(karpathy="k.json", features="f"),
                             batch_size=2, storage_path=str(tmp_path))
    with pytest.raises(ConfigError, match="batch_size 2 is smaller than num_workers 4"):
        run_captioner_sweep(cfg, {}, workers_per_trial=4)
    with pytest.raises(ConfigError, match="resources.CPU: 'CPU' is not a custom resource"):
        run_captioner_sweep(cfg, {}, workers_per_trial=2, resources_per_worker={"CPU": 2})
    no_val = CaptionTrainConfig(data=CaptionDataConfig(val_images=0))
    with pytest.raises(ConfigError, match="data.val_images: the sweep ranks trials"):
        run_captioner_sweep(no_val, {})
