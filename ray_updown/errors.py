"""The package's exceptions.

Every error a user can cause (bad files, bad configs, bad URIs, bad checkpoints) is raised as
one of these, naming the file, the record and the problem, so the CLI can print one line and
exit non-zero instead of a stack trace.
"""

from __future__ import annotations


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
