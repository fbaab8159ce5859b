"""Hyperparameter sweeps of the VQA model with Ray Tune and ASHA early stopping.

A search space is a plain mapping (YAML-able) from config keys to distributions::

    lr: {loguniform: [0.001, 1.0]}         # dotted paths work too: optimizer settings are top
    model.hidden: {choice: [256, 512]}     # level, model and data settings are nested
    batch_size: {grid: [128, 256]}         # every value, crossed with the other grids
    model.dropout: {uniform: [0.0, 0.5]}
    epochs: 10                             # a plain value fixes the key for every trial

Supported: choice, grid, uniform, loguniform, randint, lograndint, quniform [low, high, q].
A bare name that is not a top-level field ("hidden") is resolved to the one section holding
it ("model.hidden"). Each trial is a single-worker `vqa_trainable` run reporting the
validation accuracy every epoch; ASHA stops the weak ones at its rungs. The best trial's full
configuration is written to `<storage_path>/<name>/best_config.yaml`, which
`train_ensemble` accepts as its config.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

from ray_updown import storage
from ray_updown.config import dump_config, load_config, read_yaml_mapping
from ray_updown.errors import ConfigError
from ray_updown.train.trainer import raise_unwrapped
from ray_updown.vqa.config import METRIC, VqaTrainConfig
from ray_updown.vqa.train import check_inputs, tune_experiment_path, tune_run_config, tune_trainable

log = logging.getLogger(__name__)

BEST_CONFIG_FILE = "best_config.yaml"
SWEEP_SUMMARY_FILE = "sweep_results.json"
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint", "quniform")


def load_search_space(uri: str) -> dict:
    """A search space from a YAML (or JSON) file."""
    return read_yaml_mapping(uri, "a search space is a mapping of config keys")


def resolve_key(key: str, cfg: VqaTrainConfig) -> list[str]:
    """A space key as a path into the config dict ("hidden" -> ["model", "hidden"])."""
    values = cfg.to_dict()
    if "." in key:
        path, node = key.split("."), values
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError("not a config key", record=f"space.{key}")
            node = node[part]
        return path
    if key in values:
        return [key]
    owners = [section for section, v in values.items() if isinstance(v, dict) and key in v]
    if len(owners) != 1:
        problem = "not a config key" if not owners else f"ambiguous: in sections {owners}"
        raise ConfigError(problem, record=f"space.{key}")
    return [owners[0], key]


def _domain(key: str, spec: Any):
    """A Tune sampler for one spec ({"loguniform": [a, b]} ...), or the plain value."""
    from ray import tune

    if not isinstance(spec, Mapping):
        return spec
    if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise ConfigError(f"expected one of {list(SAMPLERS)} as the only key, got {dict(spec)}",
                          record=f"space.{key}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{kind} needs a non-empty list, got {args!r}", record=f"space.{key}")
    if kind in ("choice", "grid"):
        return tune.choice(list(args)) if kind == "choice" else tune.grid_search(list(args))
    n = 3 if kind == "quniform" else 2
    if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                 for a in args):
        raise ConfigError(f"{kind} needs {n} numbers, got {args!r}", record=f"space.{key}")
    low, high = args[0], args[1]
    if not low < high or (kind.startswith("log") and low <= 0):
        raise ConfigError(f"{kind} needs 0 < low < high (low < high for linear), got {args!r}",
                          record=f"space.{key}")
    if kind == "quniform":
        return tune.quniform(low, high, args[2])
    return getattr(tune, kind)(low, high)


def tune_param_space(cfg: VqaTrainConfig, space: Mapping[str, Any]) -> dict:
    """The full config dict with the space's keys replaced by Tune samplers.

    Values given outright and every choice/grid candidate are type-checked now, so a bad space
    fails before any trial starts.
    """
    params = cfg.to_dict()
    for key, spec in space.items():
        path = resolve_key(str(key), cfg)
        if isinstance(spec, Mapping):
            kind = next(iter(spec)) if len(spec) == 1 else None
            listed = spec.get(kind) if kind in ("choice", "grid") else None
            candidates = list(listed) if isinstance(listed, (list, tuple)) else []
        else:
            candidates = [spec]
        for value in candidates:
            trial = cfg.to_dict()
            _set_path(trial, path, value)
            try:
                VqaTrainConfig.from_dict(trial).validate()
            except ConfigError as exc:
                raise ConfigError(f"value {value!r}: {exc.problem}", record=f"space.{key}") from None
        _set_path(params, path, _domain(str(key), spec))
    return params


def _set_path(values: dict, path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        values = values[part]
    values[path[-1]] = value


def run_sweep(cfg: VqaTrainConfig | str, space: Mapping[str, Any] | str, num_samples: int = 8,
              max_concurrent: int = 0, *, overrides: Sequence[str] = (),
              cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None,
              grace_period: int = 1, reduction_factor: int = 2, experiment: str = "sweep",
              callbacks: Iterable[Any] | None = None) -> VqaTrainConfig:
    """Search `space` with ASHA on the validation accuracy; returns the best trial's config.

    `cfg` / `space` may be YAML files. Trials: `num_samples` draws (times each grid), at most
    `max_concurrent` at once (0: as many as the cluster's resources allow). Writes
    best_config.yaml and sweep_results.json under <storage_path>/<name>/. Re-running with the
    same storage and `experiment` name resumes an interrupted sweep.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ray_updown.ray_session import ensure_ray

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
    ensure_ray()
    root = storage.join(cfg.storage_path, cfg.name)
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if cfg.use_gpu else 0.0)
    trainable = tune_trainable(cpus_per_trial, gpus)
    path, fs = tune_experiment_path(root, experiment)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("resuming the sweep at %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs,
                                  grace_period=grace_period, reduction_factor=reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=num_samples,
                                        scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent or None),
            run_config=tune_run_config(cfg, root, experiment, callbacks))
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
    storage.write_text(storage.join(root, BEST_CONFIG_FILE), dump_config(best_cfg))
    storage.write_json(storage.join(root, SWEEP_SUMMARY_FILE), _summary(grid, space, cfg), indent=2)
    return best_cfg


def _summary(grid, space: Mapping[str, Any], cfg: VqaTrainConfig) -> dict:
    """Per trial: the searched values, epochs run, best val accuracy and status."""
    paths = {str(k): resolve_key(str(k), cfg) for k in space}
    trials = []
    for r in grid:
        values = {}
        for key, path in paths.items():
            node = r.config
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            values[key] = node
        df = r.metrics_dataframe
        best = float(df[METRIC].max()) if df is not None and METRIC in df else None
        trials.append({"trial": r.path.rstrip("/").rsplit("/", 1)[-1], "config": values,
                       "epochs": int(r.metrics.get("training_iteration", 0)) if r.metrics else 0,
                       METRIC: best, "error": None if r.error is None else str(r.error)[:300]})
    trials.sort(key=lambda t: -(t[METRIC] if t[METRIC] is not None else -1.0))
    return {"metric": METRIC, "mode": "max", "scheduler": "ASHA", "trials": trials,
            "best_config": BEST_CONFIG_FILE}


def best_config_uri(cfg: VqaTrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name, BEST_CONFIG_FILE)


__all__ = ["run_sweep", "load_search_space", "tune_param_space", "resolve_key", "best_config_uri",
           "BEST_CONFIG_FILE", "SAMPLERS"]
