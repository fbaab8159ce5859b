"""Ray's failures of the extraction pipeline as the package's one line.

    with ray_failures_as_one_line(out, shards, max_restarts, max_task_retries):
        ... iterate the Ray Data pipeline and write shards ...

Actors that died more often than `max_restarts` allows, lost nodes or objects and tasks that
failed beyond their retries become an `ExtractionError` naming the failure and saying that a
re-run resumes (complete shards are kept; pipeline.py). A package error a worker raised comes
back as itself, and a shard the driver could not write as a StorageError with the same hint.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from ray_updown.errors import RayUpdownError, StorageError, message_lines, package_error, raised_line

RESUME = "the shards written before it are complete and kept: re-run to resume"

# Where Ray Data logs a failed execution's stack trace on the console.
_RAY_DATA_TRACE_LOGGERS = ("ray.data.exceptions",
                           "ray.data._internal.execution.operators.actor_pool_map_operator",
                           "ray.data._internal.execution.streaming_executor_state")


class ExtractionError(RayUpdownError):
    """The extraction's workers failed beyond their retries; a re-run resumes."""


class _HideOnConsole(logging.Filter):
    """Marks ERROR records with Ray Data's `hide` flag: its console handler drops them, its
    log file keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.hide = True
        return True


@contextlib.contextmanager
def ray_failures_as_one_line(out: str, shards: int, max_restarts: int,
                             max_task_retries: int) -> Iterator[None]:
    """See the module docstring. Ray Data's console stack traces are hidden meanwhile (they
    stay in its log file): the user sees one line, not a hundred."""
    import ray.exceptions
    from ray.data.exceptions import ExecutionTimeoutError

    hide = _HideOnConsole()
    loggers = [logging.getLogger(name) for name in _RAY_DATA_TRACE_LOGGERS]
    for logger in loggers:
        logger.addFilter(hide)
    try:
        yield
    except StorageError as exc:  # the driver could not write a shard
        raise StorageError(f"{exc.problem}; {RESUME}", file=exc.file, record=exc.record) from None
    except (ray.exceptions.RayError, ExecutionTimeoutError) as exc:
        inner = package_error(exc)
        if inner is not None:
            raise inner from None
        raise ExtractionError(f"{describe(exc, max_restarts, max_task_retries)}, with {shards} "
                              f"shard(s) to write; {RESUME}", file=out) from None
    finally:
        for logger in loggers:
            logger.removeFilter(hide)


def describe(exc: BaseException, max_restarts: int, max_task_retries: int) -> str:
    """One line: what failed, how often it may (the retry settings), Ray's own first words."""
    import ray.exceptions

    lines = message_lines(exc)
    name = type(exc).__name__
    if isinstance(exc, ray.exceptions.RayActorError):
        retries = f"max_restarts={max_restarts}, max_task_retries={max_task_retries}"
        if exc.actor_init_failed:  # Ray's last line is the constructor's exception
            return f"a detector actor failed to start ({retries}): {lines[-1] if lines else name}"
        return (f"a detector actor died more often than its restarts allow ({retries}): "
                f"{name}: {lines[0] if lines else ''}")
    raised = raised_line(exc)  # a worker's own exception says more than Ray's wrapper
    what = f"{raised[0]}: {raised[1]}" if raised else f"{name}: {lines[0] if lines else ''}"
    return f"the Ray pipeline failed: {what}"[:400]
