"""Connecting to Ray: the cluster a job was submitted to, or an embedded local one.

Under `ray job submit` RAY_ADDRESS points at the cluster; run as a plain script the same code
starts a new local Ray on this machine, never one it happens to find (Ray's own default
would join the last `ray start` cluster, or wait forever on one that is gone and left its
address behind): set RAY_ADDRESS (e.g. `auto`) to use a running cluster. S3 endpoint and
wandb settings travel to the workers.

A local Ray started by a command of the CLI ends with it, even when the command is killed
(SIGKILL, OOM): Ray's own processes follow a dead driver within seconds, except its two
agents, which wait a minute for the dead cluster to take their report; a watchdog process
(`python -m ray_updown.ray_cluster --watch <pid>`) ends them at once.

A command of the CLI keeps the Ray workers' output (their logs, and the tracebacks of a
failed worker) off its console, in Ray's session logs (`worker_logs_dir()`), so a failure
is the package's one line; only the workers' progress lines (`progress_line`: one per epoch)
reach it. RAY_UPDOWN_WORKER_LOGS=1 streams all their output to the console again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

from ray_updown.errors import ConfigError

_FORWARDED = ("AWS_ENDPOINT_URL", "RAY_UPDOWN_S3_ENDPOINT", "WANDB_MODE", "WANDB_PROJECT",
              "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
WORKER_LOGS_ENV = "RAY_UPDOWN_WORKER_LOGS"
PROGRESS_MARK = "[ray-updown progress] "  # a worker line the CLI shows (progress_line)
_cli_command: str | None = None  # inside cli_driver: the CLI's command that is the driver


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
    all_worker_output = os.environ.get(WORKER_LOGS_ENV, "0" if _cli_command else "1") != "0"
    dispatcher = None if all_worker_output else _worker_output_dispatcher()
    kwargs["log_to_driver"] = all_worker_output or dispatcher is not None
    if os.environ.get("RAY_ADDRESS"):
        _join_cluster(os.environ["RAY_ADDRESS"], kwargs)
    else:
        # With the dashboard (when ray[default] is installed): progress at 127.0.0.1:8265, and
        # Ray Train's placement-group cleaner needs its State API (without it, it warns every
        # few seconds).
        if _cli_command and sys.platform.startswith("linux"):
            _start_watchdog()
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    if dispatcher is not None:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_updown_progress", _print_progress_lines)


def _join_cluster(address: str, kwargs: dict) -> None:
    """ray.init to a running cluster; a refused token is one line saying what to set (the
    token itself is never shown)."""
    import ray

    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:
        if not refused_token(exc):
            raise
        raise ConfigError("the Ray cluster refused this client (token authentication): set "
                          "RAY_AUTH_MODE=token and give the cluster's token as a file, "
                          "RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token", file=address) from None


def refused_token(exc: BaseException) -> bool:
    """Whether a failed ray.init was the cluster refusing the token. Ray raises
    ConnectionError from a RuntimeError whose text holds the AuthenticationError's traceback."""
    from ray.exceptions import AuthenticationError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, AuthenticationError) or "InvalidAuthToken" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def progress_line(text: str) -> None:
    """A worker's progress line (one epoch's summary): the one kind of worker output that a
    command of the CLI shows on its console."""
    print(PROGRESS_MARK + text, flush=True)


def _print_progress_lines(batch: dict) -> None:
    if batch.get("is_err"):
        return  # Ray Train's workers copy their stdout to stderr as well: show each line once
    for line in batch.get("lines", ()):
        if line.startswith(PROGRESS_MARK):
            text = line[len(PROGRESS_MARK):]
            print(f"ray-updown {_cli_command}: {text}" if _cli_command else text,
                  file=sys.stderr, flush=True)


def _worker_output_dispatcher():
    """Ray's dispatcher of the workers' output on the driver, where this Ray has it (no public
    API filters that stream); None otherwise, and then no worker output is shown at all."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    has_api = all(callable(getattr(dispatcher, name, None)) for name in ("add_handler", "remove_handler"))
    return dispatcher if has_api else None


@contextlib.contextmanager
def cli_driver(command: str) -> Iterator[None]:
    """For a command of the CLI: a Ray that `ensure_ray` starts or joins meanwhile leaves its
    workers' output in its session logs instead of streaming it to this process's console
    (unless RAY_UPDOWN_WORKER_LOGS=1), except their progress lines, shown as
    `ray-updown <command>: <run>: epoch ...`; and a local one it starts ends with this process."""
    global _cli_command
    saved, _cli_command = _cli_command, command
    try:
        yield
    finally:
        _cli_command = saved


def worker_logs_dir() -> str | None:
    """Where the connected Ray keeps its workers' logs (on the head node), if known."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private.worker import global_worker  # no public API names the folder

        return global_worker.node.get_logs_dir_path()
    except Exception:  # a Ray Client connection, or an internal that moved
        return None


def _start_watchdog() -> None:
    """Start the watchdog of the local Ray this process is about to start."""
    subprocess.Popen([sys.executable, "-m", __name__, "--watch", str(os.getpid())],
                     start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _watch(driver: int, poll_s: float = 1.0) -> None:
    """While the driver (this process's parent) lives, note every descendant it has had (its
    Ray's processes); once it is gone, kill those of them that are left, and theirs.

    The notes accumulate: a scan that runs while the driver dies sees its children already
    handed to init, and would otherwise replace the full list with a part of it."""
    noted: dict[int, str] = {}
    while os.getppid() == driver:
        noted.update(_descendants(driver))
        time.sleep(poll_s)
    for pid in [pid for pid, started in noted.items() if _same_process(pid, started)]:
        noted.update(_descendants(pid))  # what it started after the last scan
    noted.pop(os.getpid(), None)  # the watchdog is one of the driver's children too
    for pid, started in noted.items():
        if _same_process(pid, started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _same_process(pid: int, started: str) -> bool:
    """Whether `pid` is still the process that started at `started` (pids are reused)."""
    stat = _parent_and_start(pid)
    return stat is not None and stat[1] == started


def _descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every descendant of `root`, from /proc."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, pending = {}, list(children.get(root, []))
    while pending:
        pid = pending.pop()
        found[pid] = processes[pid][1]
        pending += children.get(pid, [])
    return found


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of the processes now running (Linux /proc)."""
    stats = {int(entry): _parent_and_start(int(entry))
             for entry in os.listdir("/proc") if entry.isdigit()}
    return {pid: stat for pid, stat in stats.items() if stat is not None}


def _parent_and_start(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a running process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)"
        return int(fields[1]), fields[19]
    except (OSError, IndexError):
        return None


def _submitted_job_env_vars() -> set[str]:
    """Names of the env vars the submitted job's runtime env sets (none outside a job)."""
    try:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return set((job_config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    _watch(int(sys.argv[2]))
