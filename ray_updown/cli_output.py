"""What a command of the CLI prints besides its summary: one line per warning or error.

    sys.exit(run_command("train-vqa", lambda: ...))

- A package error, raised on the driver or inside a Ray worker or Tune trial (found through
  Ray's wrappers), is one line on stderr, `ray-updown <command>: error: <file>: <record>:
  <problem>`, exit status 2.
- Any other failure of a Ray worker (a bug, an out-of-memory kill) is one line naming the
  worker's exception and where its traceback is (Ray's session logs), exit status 1.
- The package's warnings (its `ray_updown.*` loggers) are one line each,
  `ray-updown <command>: warning: ...`.
- The Ray workers' own output stays in Ray's session logs, and a local Ray the command
  starts ends with it even when the command is killed (ray_cluster.cli_driver);
  RAY_UPDOWN_WORKER_LOGS=1 streams the workers' output to the console. Tune logs a failed
  trial on the driver with the trial's traceback: its one line is kept, the traceback is in
  the trial's error.txt, whose path Tune prints.
Any other exception on the driver is a bug of the package: its traceback is printed as usual.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator

from ray_updown.errors import RayUpdownError, package_error
from ray_updown.ray_cluster import cli_driver, worker_logs_dir

_PACKAGE_LOGGER = "ray_updown"
# Ray loggers of the driver that log a worker's traceback (kept in Ray's files as well).
_RAY_TRACEBACK_LOGGERS = ("ray.tune.execution.tune_controller",)


def run_command(command: str, run: Callable[[], None]) -> int:
    """Run one command; its exit status (see the module docstring)."""
    try:
        with cli_driver(command), _warnings_as_lines(command), _no_ray_tracebacks():
            run()
    except RayUpdownError as exc:
        return _error(command, exc, 2)
    except KeyboardInterrupt:
        print(f"ray-updown {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A package error that reached us inside Ray's or Tune's wrappers is still ours.
        error = package_error(exc)
        if error is not None:
            return _error(command, error, 2)
        failure = _worker_failure(exc)
        if failure is None:
            raise
        return _error(command, failure, 1)
    return 0


def _error(command: str, message: object, status: int) -> int:
    print(f"ray-updown {command}: error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"ray-updown {command}: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger(_PACKAGE_LOGGER)
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # once, not again through a root handler Ray may have set
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


class _WithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = record.stack_info = None
        return True


@contextlib.contextmanager
def _no_ray_tracebacks() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _RAY_TRACEBACK_LOGGERS]
    without = _WithoutTraceback()
    for logger in loggers:
        logger.addFilter(without)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(without)


def _worker_failure(exc: BaseException) -> str | None:
    """One line for a Ray worker's or trial's failure that is not a package error: the
    worker's own exception and where its traceback is. None for anything else."""
    if "ray" not in sys.modules:  # nothing ran on Ray
        return None
    import ray.exceptions
    from ray.train import TrainingFailedError
    from ray.tune import TuneError

    if not isinstance(exc, (ray.exceptions.RayError, TrainingFailedError, TuneError)):
        return None
    cause = _innermost(exc)
    text = " ".join(f"{type(cause).__name__}: {cause}".split("\n", 1)[0].split())[:300]
    logs = worker_logs_dir()
    where = f"Ray's worker logs in {logs}" if logs else "Ray's worker logs (`ray logs`)"
    return f"a Ray worker failed: {text}; its traceback is in {where}"


def _innermost(exc: BaseException) -> BaseException:
    """The exception a worker raised, under Train's worker failures and Ray's wrappers."""
    while True:
        failures = list((getattr(exc, "worker_failures", None) or {}).values())
        inner = failures[0] if failures else next(
            (c for c in (getattr(exc, "cause", None), exc.__cause__)
             if isinstance(c, BaseException)), None)
        if inner is None or inner is exc:
            return exc
        exc = inner
