"""`ray-updown submit`: `ray job submit`, with one-line errors.

    ray-updown submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env cluster/runtime_env.yaml -- python jobs/extract.py ...

It submits the command to the cluster's job API (Ray's `JobSubmissionClient`, so the client
sends the token as `ray job submit` does: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), streams the job's log, and ends with the job's status. A cluster that
refuses the client's token, an address with no job API, or a job that fails is one line,
exit status 2, never a traceback, and never the token.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from ray_updown.errors import ConfigError, RayUpdownError
from ray_updown.ray_cluster import refused_token

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(RayUpdownError):
    """The submitted job ended in FAILED or STOPPED."""


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        if refused_token(exc):
            raise ConfigError("the cluster's job API refused this client (token authentication): "
                              "set RAY_AUTH_MODE=token and give the cluster's token as a file, "
                              "RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token", file=address) from None
        raise ConfigError(f"no Ray job API answers there ({type(exc).__name__})",
                          file=address) from None


def _runtime_env(working_dir: str | None, runtime_env: str | None) -> dict:
    import yaml

    env: dict = {}
    if runtime_env:
        try:
            with open(runtime_env) as f:
                env = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the runtime env ({type(exc).__name__})",
                              file=runtime_env) from None
        if not isinstance(env, dict):
            raise ConfigError("a runtime env is a mapping", file=runtime_env)
    if working_dir:
        env["working_dir"] = os.path.abspath(working_dir)
    return env


def submit_job(address: str, entrypoint: list[str], working_dir: str | None = None,
               runtime_env: str | None = None, wait: bool = True, poll_s: float = 1.0) -> dict:
    """Submit `entrypoint`; with `wait`, print its log as it grows and return its end."""
    if not entrypoint:
        raise ConfigError("give the job's command after --", record="entrypoint")
    client = _client(address)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint),
                               runtime_env=_runtime_env(working_dir, runtime_env) or None)
    print(f"ray-updown submit: job {job_id} submitted to {address}", file=sys.stderr, flush=True)
    if not wait:
        return {"job_id": job_id, "status": str(client.get_job_status(job_id).value)}
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        log = client.get_job_logs(job_id)
        sys.stdout.write(log[shown:])
        sys.stdout.flush()
        shown = len(log)
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        said = (client.get_job_info(job_id).message or "").strip().splitlines()
        raise JobFailed(f"the job ended {status}" + (f": {said[-1]}" if said else ""),
                        file=address, record=job_id)
    return {"job_id": job_id, "status": status}
