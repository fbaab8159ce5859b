"""The driver side of a training run: one way to build the `TorchTrainer`, where Ray keeps
the run, and what comes back from it.

    trainer = build_trainer(worker, loop_config, name=..., storage_path=..., num_workers=2)
    result = fit(trainer, run_uri)   # a worker's package error is raised as itself
    checkpoint_uri(result.checkpoint, storage_path)

Re-running with the same `storage_path` and `name` resumes from the run's last checkpoint
(Ray Train's own restore; the loop reads it through `session.restore()`). At least two are
kept, so that a latest checkpoint damaged on disk has an earlier one to fall back to: `fit`
says so in one warning line, or fails with one line before any worker starts when none of
the run's checkpoints is intact.

Each job reads and checks its data files on the driver before it builds the trainer (its
`check_inputs`), so bad input is one line before any Ray worker starts; what can only fail
inside a worker comes back from `fit` as the package's own error.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from ray_updown import storage
from ray_updown.errors import StorageError, package_error
from ray_updown.train.run_checkpoint import find_damage, nothing_intact, resuming_before

log = logging.getLogger(__name__)


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # seconds between the controller's polls


def storage_kwargs(uri: str) -> dict:
    """RunConfig's `storage_path` (+ `storage_filesystem` for object stores, so custom S3
    endpoints go through the project's storage module)."""
    if storage.is_remote(uri):
        filesystem, path = storage.pyarrow_filesystem(uri)
        return {"storage_path": path, "storage_filesystem": filesystem}
    if uri.startswith("file://"):  # Ray resolves file:// URIs itself
        return {"storage_path": uri}
    return {"storage_path": os.path.abspath(uri)}


def build_trainer(worker: Callable[[dict], None], loop_config: dict, *, name: str,
                  storage_path: str, num_workers: int, use_gpu: bool = False,
                  cpus_per_worker: float = 1.0, max_failures: int = 0,
                  keep_checkpoints: int | None = None, score_metric: str | None = None,
                  resources_per_worker: dict[str, float] | None = None,
                  callbacks: list | None = None):
    """A TorchTrainer of `num_workers` DDP workers (NCCL on GPU, gloo on CPU) running
    `worker(loop_config)`. Keeps `keep_checkpoints` checkpoints (None: all; at least 2), the
    best by `score_metric` (max) when one is given, else the latest (Ray always keeps the
    latest too). `resources_per_worker` adds custom resources to each worker's CPUs;
    `callbacks` are Ray Train callbacks (inside a Tune trial, `TuneReportCallback` forwards
    rank 0's reports to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_updown.ray_cluster import ensure_ray

    ensure_ray()
    # Ray Train's controller polls its workers every 2 s by default, and a finished run waits
    # for several polls before fit() returns (6.3 s after the last report on 2 cores); every
    # 0.5 s it returns in ~1.5 s. The driver's value reaches the controller; a user's stays.
    os.environ.setdefault(TRAIN_POLL_ENV, "0.5")
    scoring = {"checkpoint_score_attribute": score_metric, "checkpoint_score_order": "max"} \
        if score_metric else {}
    return TorchTrainer(
        worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={**(resources_per_worker or {}),
                                                           "CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, **storage_kwargs(storage_path), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=max(keep_checkpoints, 2) if keep_checkpoints else None,
                                 **scoring)))


def checkpoint_uri(checkpoint, storage_path: str) -> str:
    """A Ray checkpoint's location (a Checkpoint or its path) as a URI of our storage module
    (Ray drops the scheme)."""
    path = checkpoint if isinstance(checkpoint, str) else checkpoint.path
    if storage.is_remote(storage_path):
        scheme = storage_path.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path


def history(result) -> list[dict]:
    """The metrics of every checkpoint Ray kept, by epoch."""
    return sorted((m for _, m in (result.best_checkpoints or [])), key=lambda m: m["epoch"])


def raise_unwrapped(exc: BaseException):
    """Raise the package error inside `exc` (one line in the CLI), else `exc` itself."""
    error = package_error(exc)
    if error is not None:
        raise error from None
    raise exc


def latest_checkpoint(run_uri: str, marker: str) -> str | None:
    """The newest checkpoint directory Ray wrote under a run (`checkpoint_*` holding the file
    `marker`), if any: what a re-run resumes from, for the driver's checks."""
    try:
        found = storage.list_files(storage.join(run_uri, "checkpoint_*", marker))
    except StorageError:
        return None
    return found[-1].rsplit("/", 1)[0] if found else None


def fit(trainer, run_uri: str | None = None) -> Any:
    """`trainer.fit()`, raising a worker's package error as itself (one clear line in the CLI)
    rather than as Ray's wrapper around it. A new run (`run_uri` did not exist) that fails
    before its first checkpoint leaves no folder behind: there is nothing in it to resume."""
    new_run = run_uri is not None and not storage.exists(run_uri)
    if run_uri is not None and not new_run:
        _check_resume(run_uri)
    try:
        return trainer.fit()
    except Exception as exc:
        if new_run and not _has_checkpoint(run_uri):
            storage.remove(run_uri, recursive=True)
        raise_unwrapped(exc)


def _check_resume(run_uri: str) -> None:
    """Before a re-run starts its workers: warn when its latest checkpoint is damaged and the
    workers will resume from an earlier one (session.restore), fail when none is intact.
    Files in object storage are checked by size (their bytes by the workers, once fetched)."""
    contents = not storage.is_remote(run_uri)
    checkpoints = _checkpoint_dirs(run_uri)
    damage = find_damage(checkpoints[0], contents) if checkpoints else None
    if damage is None:
        return
    intact = next((c for c in checkpoints[1:] if find_damage(c, contents) is None), None)
    if intact is None:
        raise nothing_intact(damage)
    log.warning(resuming_before(damage, intact))


def _checkpoint_dirs(run_uri: str) -> list[str]:
    """The run's `checkpoint_*` directories, newest first (Ray names them in order)."""
    fs, path = storage.filesystem(run_uri)
    try:
        found = [p for p in fs.glob(path.rstrip("/") + "/checkpoint_*") if fs.isdir(p)]
    except OSError:
        return []
    return sorted((storage.join(run_uri, p.rsplit("/", 1)[1]) for p in found), reverse=True)


def _has_checkpoint(run_uri: str) -> bool:
    try:
        return any("/checkpoint_" in f for f in storage.list_files(run_uri))
    except StorageError:
        return False
