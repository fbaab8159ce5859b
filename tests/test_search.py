"""Trial resources and the captioner sweep's checks before Ray starts (no cluster needed; the
runs themselves are in tests/cluster/)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ray_updown.captioning.config import CaptionTrainConfig
from ray_updown.captioning.data import CaptionDataConfig
from ray_updown.captioning.sweep import run_captioner_sweep
from ray_updown.config import load_config
from ray_updown.errors import ConfigError
from ray_updown.train.search import (
    SWEEP_SUMMARY_FILE,
    best_config_uri,
    resolve_key,
    trial_resources,
    trial_row,
    tune_param_space,
    write_sweep_results,
)


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


def test_a_sweeps_outputs_list_trials_best_first_and_keep_the_best_config(tmp_path):
    cfg = CaptionTrainConfig(storage_path=str(tmp_path), name="sweep")
    space = {"optim.lr": {"loguniform": [1e-3, 0.1]}}
    results = [SimpleNamespace(path=f"/runs/sweep/trial_{i}", config={"optim": {"lr": lr}},
                               metrics={"training_iteration": epochs}, error=error)
               for i, (lr, epochs, error) in enumerate([(0.01, 2, None), (0.002, 0, "died"),
                                                        (0.05, 3, None)])]
    rows = [trial_row(r, space, cfg, "val_cider_d", best)
            for r, best in zip(results, [0.4, None, 0.9])]
    assert rows[1] == {"trial": "trial_1", "config": {"optim.lr": 0.002}, "epochs": 0,
                       "val_cider_d": None, "error": "died"}
    best = CaptionTrainConfig(storage_path=str(tmp_path), name="sweep", epochs=7)
    write_sweep_results(str(tmp_path / "sweep"), best, "val_cider_d", rows, workers_per_trial=2)
    summary = json.loads((tmp_path / "sweep" / SWEEP_SUMMARY_FILE).read_text())
    assert [t["trial"] for t in summary["trials"]] == ["trial_2", "trial_0", "trial_1"]
    assert (summary["metric"], summary["workers_per_trial"]) == ("val_cider_d", 2)
    assert load_config(CaptionTrainConfig, best_config_uri(cfg)) == best
