"""Connecting to Ray: the cluster a job was submitted to, or an embedded local one.

Under `ray job submit` RAY_ADDRESS points at the cluster; run as a plain script the same code
starts a local Ray on this machine. S3 endpoint and wandb settings travel to the workers.
"""

from __future__ import annotations

import json
import os

_FORWARDED = ("AWS_ENDPOINT_URL", "RAY_UPDOWN_S3_ENDPOINT", "WANDB_MODE", "WANDB_PROJECT",
              "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once; a no-op when a driver (or a test fixture) already did."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED if k in os.environ}
    # Under `ray job submit` the job's runtime env already reaches every worker, and Ray
    # refuses a driver runtime env that sets any of the same variables again.
    env = {k: v for k, v in env.items() if k not in _submitted_job_env_vars()}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # With the dashboard (when ray[default] is installed): progress at 127.0.0.1:8265, and
        # Ray Train's placement-group cleaner needs its State API (without it, it warns every
        # few seconds).
        ray.init(num_cpus=num_cpus, **kwargs)


def _submitted_job_env_vars() -> set[str]:
    """Names of the env vars the submitted job's runtime env sets (none outside a job)."""
    try:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return set((job_config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()
