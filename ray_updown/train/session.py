"""The one way a training loop talks to whatever runs it.

Every loop (detector/train/loop.py, captioning/train.py, vqa/train.py) is a function of its
config and a `Session`:

    session.rank, session.world     this worker's place in the DDP group
    with session.restore() as path: the local directory of the last checkpoint, or None
    session.wrap(model)             DistributedDataParallel when world > 1
    session.report(metrics, write_checkpoint=None)
                                    every worker reports; rank 0 also calls
                                    write_checkpoint(dir) and attaches that directory
    session.logs_to_wandb           whether the loop starts its own wandb run

Three sessions run the same loop: `RayTrainSession` in a Ray Train worker (Train V2 wants a
report from every rank; only rank 0's checkpoint is kept), `TuneSession` in a Ray Tune
function trial (one worker; wandb goes through Tune's callback), and `LocalSession` in one
plain process with no Ray at all, for debugging and fast tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, ContextManager, Iterator, Protocol

import torch

CheckpointWriter = Callable[[str], None]  # writes a checkpoint into the directory it is given


class Session(Protocol):
    rank: int
    world: int
    logs_to_wandb: bool

    def restore(self) -> ContextManager[str | None]: ...

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None: ...


@contextlib.contextmanager
def _as_directory(checkpoint) -> Iterator[str | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield path


def _report_to(api, metrics: dict, write_checkpoint: CheckpointWriter | None) -> None:
    """`api.report` (ray.train or ray.tune), with a checkpoint written to a temporary
    directory that Ray copies to the run's storage before the call returns."""
    if write_checkpoint is None:
        api.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        write_checkpoint(tmp)
        api.report(metrics, checkpoint=api.Checkpoint.from_directory(tmp))


class RayTrainSession:
    """A Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.logs_to_wandb = self.rank == 0

    def restore(self) -> ContextManager[str | None]:
        import ray.train

        return _as_directory(ray.train.get_checkpoint())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None:
        import ray.train

        _report_to(ray.train, metrics, write_checkpoint if self.rank == 0 else None)


class TuneSession:
    """A Ray Tune function trial: one worker."""

    rank, world, logs_to_wandb = 0, 1, False  # Tune's WandbLoggerCallback logs the trial

    def restore(self) -> ContextManager[str | None]:
        import ray.tune

        return _as_directory(ray.tune.get_checkpoint())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None:
        import ray.tune

        _report_to(ray.tune, metrics, write_checkpoint)


class LocalSession:
    """One process, no Ray: report n writes `folder/checkpoint_{n:06d}`; `restore` gives the
    newest one there. `reports` keeps (metrics, checkpoint path or None) of this process."""

    rank, world, logs_to_wandb = 0, 1, True

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.reports: list[tuple[dict, str | None]] = []

    def _checkpoints(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(n for n in os.listdir(self.folder)
                      if n.startswith("checkpoint_") and not n.endswith(".partial"))

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        names = self._checkpoints()
        yield os.path.join(self.folder, names[-1]) if names else None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None:
        path = None
        if write_checkpoint is not None:
            path = os.path.join(self.folder, f"checkpoint_{len(self._checkpoints()):06d}")
            partial = path + ".partial"  # a crash mid-write must not look like a checkpoint
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            write_checkpoint(partial)
            os.replace(partial, path)
        self.reports.append((dict(metrics), path))
