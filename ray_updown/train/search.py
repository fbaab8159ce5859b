"""What every Ray Tune experiment of the project shares: search spaces over a typed config,
what one trial asks the cluster for, and a finished sweep's outputs (its best config and the
summary of its trials).

A search space is a plain mapping (YAML-able) from config keys to distributions::

    lr: {loguniform: [0.001, 1.0]}         # dotted paths work too: top-level settings,
    model.hidden: {choice: [256, 512]}     # model and data settings are nested
    batch_size: {grid: [128, 256]}         # every value, crossed with the other grids
    model.dropout: {uniform: [0.0, 0.5]}
    epochs: 10                             # a plain value fixes the key for every trial

Supported: choice, grid, uniform, loguniform, randint, lograndint, quniform [low, high, q].
A bare name that is not a top-level field ("hidden") is resolved to the one section holding
it ("model.hidden"). Works for any dataclass config (VqaTrainConfig, CaptionTrainConfig).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable, Mapping, Sequence

from ray_updown import storage
from ray_updown.config import dump_config, from_dict, read_yaml_mapping, to_dict
from ray_updown.errors import ConfigError

BEST_CONFIG_FILE = "best_config.yaml"  # a sweep's outputs, in its folder
SWEEP_SUMMARY_FILE = "sweep_results.json"
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint", "quniform")
_BUILT_IN = {"cpu", "gpu", "CPU", "GPU", "memory"}  # not custom resources


def load_search_space(uri: str) -> dict:
    """A search space from a YAML (or JSON) file."""
    return read_yaml_mapping(uri, "a search space is a mapping of config keys")


def resolve_key(key: str, cfg: Any) -> list[str]:
    """A space key as a path into the config dict ("hidden" -> ["model", "hidden"])."""
    values = to_dict(cfg)
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


def domain(key: str, spec: Any):
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


def tune_param_space(cfg: Any, space: Mapping[str, Any]) -> dict:
    """The full config dict with the space's keys replaced by Tune samplers.

    Values given outright and every choice/grid candidate are type-checked now (as a config
    of cfg's class), so a bad space fails before any trial starts.
    """
    params = to_dict(cfg)
    for key, spec in space.items():
        path = resolve_key(str(key), cfg)
        if isinstance(spec, Mapping):
            kind = next(iter(spec)) if len(spec) == 1 else None
            listed = spec.get(kind) if kind in ("choice", "grid") else None
            candidates = list(listed) if isinstance(listed, (list, tuple)) else []
        else:
            candidates = [spec]
        for value in candidates:
            trial = to_dict(cfg)
            set_path(trial, path, value)
            try:
                from_dict(type(cfg), trial).validate()
            except ConfigError as exc:
                raise ConfigError(f"value {value!r}: {exc.problem}", record=f"space.{key}") from None
        set_path(params, path, domain(str(key), spec))
    return params


def set_path(values: dict, path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        values = values[part]
    values[path[-1]] = value


def searched_values(config: dict, space: Mapping[str, Any], cfg: Any) -> dict:
    """{space key: the value a trial's config dict holds for it}."""
    values = {}
    for key in space:
        node: Any = config
        for part in resolve_key(str(key), cfg):
            node = node.get(part) if isinstance(node, dict) else None
        values[str(key)] = node
    return values


# Tune keeps one registry of trainables per process, and Tuner.fit() writes the trainable it is
# given into it; two experiments started at once from two threads (the demo's VQA tracks) can
# break that dict's iteration. Registering goes through this lock, and a Tuner given the name
# registers nothing.
_REGISTRY = threading.Lock()


def registered_trainable(base: str, trainable: Any, resources: Mapping[str, Any]) -> str:
    """Register `trainable` with Tune under a name of `base` and its resources, and return the
    name (what a Tuner or Tuner.restore takes instead of the trainable)."""
    from ray import tune

    name = "-".join([base] + [re.sub(r"[^\w.]", "_", f"{k}{v:g}") for k, v in sorted(resources.items())])
    with _REGISTRY:
        tune.register_trainable(name, trainable)
    return name


def trial_resources(cpus: float, gpus: float = 0.0,
                    custom: Mapping[str, float] | None = None) -> dict[str, float]:
    """`tune.with_resources` dict of one trial: CPUs, a GPU or a fraction of one, and custom
    resources (e.g. {"spot_gpu_node": 1}) that only some node types of a cluster declare,
    which is how trials are steered to, or make an autoscaler launch, those nodes."""
    if cpus < 0 or gpus < 0:
        raise ConfigError(f"cpus and gpus per trial must be >= 0, got {cpus}, {gpus}",
                          record="resources")
    resources: dict[str, float] = {"cpu": float(cpus)}
    if gpus > 0:
        resources["gpu"] = float(gpus)
    for name, amount in (custom or {}).items():
        if name in _BUILT_IN:
            raise ConfigError(f"{name!r} is not a custom resource: use the cpus/gpus settings",
                              record=f"resources.{name}")
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
            raise ConfigError(f"must be a positive number, got {amount!r}",
                              record=f"resources.{name}")
        resources[str(name)] = float(amount)
    return resources


def asha_tune_config(metric: str, max_t: int, grace_period: int, reduction_factor: int,
                     num_samples: int, max_concurrent: int = 0):
    """TuneConfig of a search maximising `metric` with ASHA early stopping on
    training_iteration (one per epoch): `num_samples` draws, at most `max_concurrent` trials
    at once (0: as many as the cluster's resources allow)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                              grace_period=grace_period, reduction_factor=reduction_factor)
    return tune.TuneConfig(metric=metric, mode="max", num_samples=num_samples, scheduler=scheduler,
                           max_concurrent_trials=max_concurrent or None)


def tune_experiment_path(root: str, experiment: str) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) of the Tune experiment <root>/<experiment>, as
    `Tuner.can_restore` and `Tuner.restore` want them."""
    from ray_updown.train.trainer import storage_kwargs

    kwargs = storage_kwargs(root)
    return kwargs["storage_path"].rstrip("/") + "/" + experiment, kwargs.get("storage_filesystem")


def restore_tuner(root: str, experiment: str, trainable: Any, *, message: str | None = None,
                  logger: logging.Logger | None = None):
    """The interrupted Tune experiment <root>/<experiment>, restored (finished trials stay
    finished, unfinished ones continue, errored ones restart), or None when there is none.

    `message` (with one %s for the experiment's path) is logged at INFO on `logger` when
    the experiment is restored.
    """
    from ray import tune

    path, fs = tune_experiment_path(root, experiment)
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return None
    if message:
        (logger or logging.getLogger(__name__)).info(message, path)
    return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                              storage_filesystem=fs)


def restore_or_new_tuner(root: str, experiment: str, trainable: Any, new_tuner: Callable[[], Any],
                         *, message: str | None = None, logger: logging.Logger | None = None):
    """`restore_tuner`'s tuner, or `new_tuner()` (called only then) when there is nothing to
    restore: re-running an experiment under the same storage and name resumes it."""
    tuner = restore_tuner(root, experiment, trainable, message=message, logger=logger)
    return new_tuner() if tuner is None else tuner


def trial_name(result) -> str:
    """The trial folder's name of a Tune result."""
    return result.path.rstrip("/").rsplit("/", 1)[-1]


def trial_row(result, space: Mapping[str, Any], cfg: Any, metric: str,
              best: float | None) -> dict:
    """One trial of a sweep's summary: its name, searched values, epochs run, best value of
    `metric` and error."""
    return {"trial": trial_name(result), "config": searched_values(result.config, space, cfg),
            "epochs": int(result.metrics.get("training_iteration", 0)) if result.metrics else 0,
            metric: best, "error": None if result.error is None else str(result.error)[:300]}


def write_sweep_results(root: str, best_cfg: Any, metric: str, trials: list[dict],
                        **extra: Any) -> None:
    """A finished ASHA sweep's two outputs in its folder `root`: the best trial's whole config
    (BEST_CONFIG_FILE, a config file every command takes) and the summary of its trials, best
    first (SWEEP_SUMMARY_FILE), with `extra` entries."""
    trials = sorted(trials, key=lambda t: -(t[metric] if t[metric] is not None else -1.0))
    summary = {"metric": metric, "mode": "max", "scheduler": "ASHA", **extra, "trials": trials,
               "best_config": BEST_CONFIG_FILE}
    storage.write_text(storage.join(root, BEST_CONFIG_FILE), dump_config(best_cfg))
    storage.write_json(storage.join(root, SWEEP_SUMMARY_FILE), summary, indent=2)


def best_config_uri(cfg: Any) -> str:
    """Where the sweep named by `cfg` (storage_path, name) writes its best config."""
    return storage.join(cfg.storage_path, cfg.name, BEST_CONFIG_FILE)


__all__ = ["BEST_CONFIG_FILE", "SWEEP_SUMMARY_FILE", "trial_row", "write_sweep_results",
           "best_config_uri", "SAMPLERS", "load_search_space", "resolve_key", "domain",
           "tune_param_space", "set_path", "searched_values", "trial_resources", "trial_name",
           "asha_tune_config", "tune_experiment_path", "restore_tuner", "restore_or_new_tuner"]
