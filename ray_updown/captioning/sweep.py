"""ASHA sweeps of the captioner in which every trial is itself a multi-worker Ray Train run.

    best = run_captioner_sweep(cfg, {"optim.lr": {"loguniform": [1e-3, 0.1]}}, num_samples=8,
                               workers_per_trial=4, max_concurrent=2, use_gpu=True)

A trial is only a driver (Ray Train V2 inside Ray Tune): `captioner_trial` builds a
`TorchTrainer` of `workers_per_trial` DDP workers running the usual loop (captioning/train.py)
and waits for it. Its `TuneReportCallback` forwards rank 0's report of every epoch (greedy
CIDEr-D on the validation images, the checkpoint's path, and `workers_reporting`) to Tune,
so ASHA sees one result per epoch and stops weak trials; stopping a trial ends its Train run, whose controller and
workers the trial owns. The trial asks for `driver_cpus` (default 1, Ray's); its workers ask
for theirs when the Train run starts, so set `max_concurrent` to the number of Train runs the
cluster can hold at once (8 GPUs, 4 per trial: 2), or the surplus trials wait for workers.

Layout under <storage_path>/<name>/: the Tune experiment `<experiment>/`, the trials' Train
runs `<experiment>-runs/<trial id>/` (checkpoints), best_config.yaml and sweep_results.json.
A trial that Tune restarts (`max_failures`) re-runs the same Train run, which resumes from its
last checkpoint; re-running the sweep with the same names resumes an interrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

from ray_updown import storage
from ray_updown.captioning.config import CaptionTrainConfig
from ray_updown.captioning.train import check_inputs, run_captioner_loop
from ray_updown.config import from_dict, load_config, to_dict
from ray_updown.errors import ConfigError
from ray_updown.train.search import (
    BEST_CONFIG_FILE,
    SWEEP_SUMMARY_FILE,
    asha_tune_config,
    best_config_uri,
    load_search_space,
    restore_or_new_tuner,
    trial_resources,
    trial_row,
    tune_param_space,
    write_sweep_results,
)
from ray_updown.train.session import RayTrainSession
from ray_updown.train.trainer import build_trainer, checkpoint_uri, fit, raise_unwrapped, storage_kwargs

log = logging.getLogger(__name__)

METRIC = "val_cider_d"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # the metric TuneReportCallback adds


@dataclasses.dataclass
class TrialWorkers:
    """What each worker of a trial's Train run asks for besides the trial config's
    `num_workers` and `use_gpu`, and where the trials keep their runs."""

    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=dict)
    runs_uri: str = ""  # <storage_path>/<name>/<experiment>-runs

    def validate(self) -> None:
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"must be positive, got {self.cpus_per_worker}",
                              record="cpus_per_worker")
        trial_resources(self.cpus_per_worker, 0.0, self.resources_per_worker)  # names checked


def _sweep_worker(loop_config: dict) -> None:
    run_captioner_loop(loop_config["cfg"], RayTrainSession())


def _tune_report_callback():
    """Ray's TuneReportCallback (rank 0's metrics and checkpoint path to Tune), adding
    `workers_reporting`: how many workers reported the epoch, i.e. the DDP group's size."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], "workers_reporting": len(metrics)}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return _ReportToTune()


def captioner_trial(config: dict, workers: TrialWorkers) -> None:
    """One Tune trial: a TorchTrainer of `num_workers` DDP workers on this trial's config."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    # The Train run is named by the trial, so a restarted trial resumes its own run.
    cfg = dataclasses.replace(from_dict(CaptionTrainConfig, config), name=trial_id,
                              storage_path=workers.runs_uri)
    trainer = build_trainer(_sweep_worker, {"cfg": cfg}, name=cfg.name,
                            storage_path=cfg.storage_path, num_workers=cfg.num_workers,
                            use_gpu=cfg.use_gpu, cpus_per_worker=workers.cpus_per_worker,
                            resources_per_worker=dict(workers.resources_per_worker),
                            max_failures=cfg.max_failures,
                            keep_checkpoints=cfg.keep_checkpoints or None,
                            callbacks=[_tune_report_callback()])
    fit(trainer, storage.join(cfg.storage_path, cfg.name))


def _absolute(uri: str) -> str:
    """Local relative paths made absolute: Tune runs each trial in its own directory."""
    if not uri or storage.is_remote(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(uri)


def check_sweep_settings(cfg: CaptionTrainConfig, num_samples: int, grace_period: int,
                         reduction_factor: int) -> None:
    """ConfigError unless ASHA's settings make sense and there are validation images to rank by."""
    if num_samples < 1 or grace_period < 1 or reduction_factor < 2:
        raise ConfigError("num_samples >= 1, grace_period >= 1 and reduction_factor >= 2 required",
                          record="sweep")
    if cfg.data.val_images == 0:
        raise ConfigError(f"the sweep ranks trials by {METRIC} on validation images: "
                          "set data.val_images > 0", record="data.val_images")


def trial_base_config(cfg: CaptionTrainConfig, workers_per_trial: int | None,
                      use_gpu: bool | None) -> CaptionTrainConfig:
    """The config every trial starts from: local paths absolute, and the sweep's worker count
    and GPU choice (each defaulting to the config's)."""
    data = dataclasses.replace(cfg.data, karpathy=_absolute(cfg.data.karpathy),
                               features=_absolute(cfg.data.features),
                               feature_cache_dir=_absolute(cfg.data.feature_cache_dir))
    return dataclasses.replace(
        cfg, data=data, storage_path=_absolute(cfg.storage_path),
        scst=dataclasses.replace(cfg.scst, init_from=_absolute(cfg.scst.init_from)),
        num_workers=workers_per_trial or cfg.num_workers,
        use_gpu=cfg.use_gpu if use_gpu is None else use_gpu)


def best_result(grid):
    """The trial result with the highest METRIC; the first trial's error (or a ConfigError)
    when no trial reported it."""
    if not any(r.error is None and r.metrics and METRIC in r.metrics for r in grid):
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise_unwrapped(errors[0])
        raise ConfigError(f"no trial reported {METRIC}", record="sweep")
    return grid.get_best_result(metric=METRIC, mode="max", scope="all")


def run_captioner_sweep(cfg: CaptionTrainConfig | str, space: Mapping[str, Any] | str,
                        num_samples: int = 8, max_concurrent: int = 0, *,
                        overrides: Sequence[str] = (), workers_per_trial: int | None = None,
                        cpus_per_worker: float = 1.0, use_gpu: bool | None = None,
                        resources_per_worker: Mapping[str, float] | None = None,
                        driver_cpus: float = 1.0,
                        driver_resources: Mapping[str, float] | None = None,
                        grace_period: int = 1, reduction_factor: int = 2,
                        experiment: str = "sweep",
                        callbacks: Iterable[Any] | None = None) -> CaptionTrainConfig:
    """Search `space` with ASHA on validation CIDEr-D; returns the best trial's config.

    `workers_per_trial` DDP workers per trial (default cfg.num_workers), each with
    `cpus_per_worker`, a GPU when `use_gpu` (default cfg.use_gpu) and `resources_per_worker`.
    The trial's driver asks for `driver_cpus` and `driver_resources` (e.g. a custom resource
    of on-demand nodes, so that drivers stay off spot nodes). Writes best_config.yaml and
    sweep_results.json (per trial: searched values, epochs, best CIDEr-D and its checkpoint).
    """
    from ray import tune

    from ray_updown.ray_cluster import ensure_ray

    if isinstance(cfg, str):
        cfg = load_config(CaptionTrainConfig, cfg, overrides)
    elif overrides:
        raise ConfigError("overrides apply to a config file; edit the CaptionTrainConfig instead")
    space = load_search_space(space) if isinstance(space, str) else dict(space)
    check_sweep_settings(cfg, num_samples, grace_period, reduction_factor)
    cfg = trial_base_config(cfg, workers_per_trial, use_gpu)
    root = storage.join(cfg.storage_path, cfg.name)
    workers = TrialWorkers(cpus_per_worker=cpus_per_worker,
                           resources_per_worker=dict(resources_per_worker or {}),
                           runs_uri=storage.join(root, f"{experiment}-runs"))
    workers.validate()
    check_inputs(cfg)  # before Ray starts; also checks batch_size >= num_workers
    param_space = tune_param_space(cfg, space)
    trainable = tune.with_resources(tune.with_parameters(captioner_trial, workers=workers),
                                    trial_resources(driver_cpus, 0.0, driver_resources))
    ensure_ray()

    def new_tuner():
        return tune.Tuner(
            trainable, param_space=param_space,
            tune_config=asha_tune_config(METRIC, cfg.epochs, grace_period, reduction_factor,
                                         num_samples, max_concurrent),
            run_config=tune.RunConfig(name=experiment, **storage_kwargs(root),
                                      callbacks=list(callbacks or []) or None,
                                      failure_config=tune.FailureConfig(
                                          max_failures=cfg.max_failures)))

    tuner = restore_or_new_tuner(root, experiment, trainable, new_tuner,
                                 message="resuming the sweep at %s", logger=log)
    grid = tuner.fit()
    best_cfg = from_dict(CaptionTrainConfig, best_result(grid).config)
    write_sweep_results(root, best_cfg, METRIC, [summary_row(r, space, cfg) for r in grid],
                        workers_per_trial=cfg.num_workers, config=to_dict(cfg))
    return best_cfg


def summary_row(result, space: Mapping[str, Any], cfg: CaptionTrainConfig) -> dict:
    """A trial's row of the sweep summary, with its best CIDEr-D's checkpoint."""
    df = result.metrics_dataframe
    best, checkpoint = None, None
    if df is not None and METRIC in df and df[METRIC].notna().any():
        row = df.loc[df[METRIC].idxmax()]
        best = float(row[METRIC])
        if isinstance(row.get(CHECKPOINT_PATH_KEY), str):
            checkpoint = checkpoint_uri(row[CHECKPOINT_PATH_KEY], cfg.storage_path)
    return {**trial_row(result, space, cfg, METRIC, best), "checkpoint": checkpoint}


__all__ = ["run_captioner_sweep", "captioner_trial", "TrialWorkers", "best_config_uri",
           "METRIC", "BEST_CONFIG_FILE", "SWEEP_SUMMARY_FILE"]
