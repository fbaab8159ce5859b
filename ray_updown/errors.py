"""The package's exceptions.

Every error a user can cause (bad files, bad configs, bad URIs, bad checkpoints) is raised as
one of these, naming the file, the record and the problem, so the CLI can print one line and
exit non-zero instead of a stack trace.
"""

from __future__ import annotations

import re


class RayUpdownError(Exception):
    """Base class: `file: record: problem`, leaving out the parts that are unknown."""

    def __init__(self, problem: str, file: str | None = None, record: object = None):
        self.problem = problem
        self.file = file
        self.record = record
        parts = [str(p) for p in (file, record) if p is not None and p != ""]
        super().__init__(": ".join(parts + [problem]))


class DataError(RayUpdownError):
    """A data file is malformed, truncated, missing a field or inconsistent."""


class ConfigError(RayUpdownError):
    """A configuration value or command-line override is invalid."""


class StorageError(RayUpdownError):
    """A URI does not exist, cannot be read or cannot be written."""


class CheckpointError(RayUpdownError):
    """A checkpoint is unsafe, malformed or does not match the model."""


# Ray's messages carry colour codes; a worker's traceback inside them ends in a line such as
# "ray_updown.errors.StorageError: s3://b/x: cannot write (...)".
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.+)$")


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one line of at most `limit` characters (a package error as it prints,
    any other with its type's name first)."""
    text = str(exc) if isinstance(exc, RayUpdownError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:limit]


def message_lines(exc: BaseException) -> list[str]:
    """The non-empty lines of an exception's message, without colour codes."""
    return [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]


def raised_line(exc: BaseException) -> tuple[str, str] | None:
    """(exception class name, message) of the last exception line in a wrapper's message."""
    for line in reversed(message_lines(exc)):
        found = _RAISED.match(line)
        if found:
            return found.group(1), found.group(2)
    return None


def package_error(exc: BaseException) -> RayUpdownError | None:
    """The package error inside `exc`, if one is why it failed: found through Ray Train's
    worker failures, Ray's, Ray Data's and Tune's wrappers and their causes (not
    `__context__`: an error raised while handling ours is another failure), or, where a
    wrapper carries the worker's exception only as text (Ray Data's UserCodeException), in
    its last exception line. Returned as the base class of this module it belongs to."""
    pending, seen = [exc], []
    while pending and len(seen) < 50:
        failure = pending.pop(0)
        if any(failure is s for s in seen):
            continue
        seen.append(failure)
        if isinstance(failure, RayUpdownError):
            base = next(c for c in type(failure).__mro__ if c.__module__ == __name__)
            return base(failure.problem, file=failure.file, record=failure.record)
        pending += list((getattr(failure, "worker_failures", None) or {}).values())
        pending += [c for c in (getattr(failure, "cause", None), failure.__cause__)
                    if isinstance(c, BaseException)]
    raised = raised_line(exc)
    errors = {cls.__name__: cls for cls in (RayUpdownError, *_subclasses(RayUpdownError))
              if cls.__module__ == __name__}
    if raised and raised[0] in errors:
        return errors[raised[0]](raised[1])
    return None


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]
