"""Hyperparameter sweeps of the VQA model with Ray Tune and ASHA early stopping.

The search space is a YAML-able mapping of config keys to distributions (train/search.py):
`lr: {loguniform: [0.001, 1.0]}`, `hidden: {choice: [256, 512]}`, `batch_size: {grid: [...]}`.
Each trial is a single-worker `vqa_trainable` run reporting the validation accuracy every
epoch; ASHA stops the weak ones at its rungs. The best trial's full configuration is written
to `<storage_path>/<name>/best_config.yaml`, which `train_ensemble` accepts as its config.

On an autoscaling cluster, `resources_per_trial={"trial_node": 1}` (a custom resource only
a worker node type declares) makes every trial wait for such a node, so the autoscaler
launches them, and removes them after its idle timeout once the sweep ends.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

from ray_updown import storage
from ray_updown.config import load_config
from ray_updown.errors import ConfigError
from ray_updown.train.search import (
    BEST_CONFIG_FILE,
    SAMPLERS,
    SWEEP_SUMMARY_FILE,
    asha_tune_config,
    best_config_uri,
    load_search_space,
    resolve_key,
    restore_or_new_tuner,
    trial_resources,
    trial_row,
    tune_param_space,
    write_sweep_results,
)
from ray_updown.train.trainer import raise_unwrapped
from ray_updown.vqa.config import METRIC, VqaTrainConfig
from ray_updown.vqa.train import check_inputs, tune_run_config, vqa_trainable

log = logging.getLogger(__name__)


def vqa_trial(cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
              resources_per_trial: Mapping[str, float] | None = None):
    """`vqa_trainable` with its resources: CPUs, a (fraction of a) GPU, custom resources."""
    from ray import tune

    return tune.with_resources(vqa_trainable, trial_resources(cpus_per_trial, gpus_per_trial,
                                                              resources_per_trial))


def run_sweep(cfg: VqaTrainConfig | str, space: Mapping[str, Any] | str, num_samples: int = 8,
              max_concurrent: int = 0, *, overrides: Sequence[str] = (),
              cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None,
              resources_per_trial: Mapping[str, float] | None = None,
              grace_period: int = 1, reduction_factor: int = 2, experiment: str = "sweep",
              callbacks: Iterable[Any] | None = None) -> VqaTrainConfig:
    """Search `space` with ASHA on the validation accuracy; returns the best trial's config.

    `cfg` / `space` may be YAML files. Trials: `num_samples` draws (times each grid), at most
    `max_concurrent` at once (0: as many as the cluster's resources allow), each asking for
    `cpus_per_trial`, `gpus_per_trial` and the custom `resources_per_trial`. Writes
    best_config.yaml and sweep_results.json under <storage_path>/<name>/. Re-running with the
    same storage and `experiment` name resumes an interrupted sweep.
    """
    from ray import tune

    from ray_updown.ray_cluster import ensure_ray

    if isinstance(cfg, str):
        cfg = load_config(VqaTrainConfig, cfg, overrides)
    space = load_search_space(space) if isinstance(space, str) else dict(space)
    if num_samples < 1 or grace_period < 1 or reduction_factor < 2:
        raise ConfigError("num_samples >= 1, grace_period >= 1 and reduction_factor >= 2 required",
                          record="sweep")
    cfg = check_inputs(cfg)  # before Ray starts: bad data is one line, not N failed trials
    if "val" in cfg.data.train_on:
        log.warning("data.train_on includes val: the sweep's metric is then a training accuracy")
    param_space = tune_param_space(cfg, space)
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if cfg.use_gpu else 0.0)
    trainable = vqa_trial(cpus_per_trial, gpus, resources_per_trial)
    ensure_ray()
    root = storage.join(cfg.storage_path, cfg.name)

    def new_tuner():
        return tune.Tuner(
            trainable, param_space=param_space,
            tune_config=asha_tune_config(METRIC, cfg.epochs, grace_period, reduction_factor,
                                         num_samples, max_concurrent),
            run_config=tune_run_config(cfg, root, experiment, callbacks))

    tuner = restore_or_new_tuner(root, experiment, trainable, new_tuner,
                                 message="resuming the sweep at %s", logger=log)
    grid = tuner.fit()
    finished = [r for r in grid if r.error is None and r.metrics and METRIC in r.metrics]
    if not finished:
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise_unwrapped(errors[0])
        raise ConfigError("no trial reported a validation accuracy (is data.val_questions set?)",
                          record="sweep")
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    best_cfg = VqaTrainConfig.from_dict(best.config)
    write_sweep_results(root, best_cfg, METRIC, [trial_row(r, space, cfg, METRIC, best_value(r))
                                                 for r in grid])
    return best_cfg


def best_value(result) -> float | None:
    """A trial's best val accuracy over its epochs (None if it reported none)."""
    df = result.metrics_dataframe
    return float(df[METRIC].max()) if df is not None and METRIC in df else None


__all__ = ["run_sweep", "load_search_space", "tune_param_space", "resolve_key", "best_config_uri",
           "BEST_CONFIG_FILE", "SWEEP_SUMMARY_FILE", "SAMPLERS"]
