"""The one way a training loop talks to whatever runs it.

Every loop (detector/train/loop.py, captioning/train.py, vqa/train.py) is a function of its
config and a `Session`:

    session.rank, session.world     this worker's place in the DDP group
    with session.restore() as path: the local directory of the last intact checkpoint, or None
    session.wrap(model)             DistributedDataParallel when world > 1
    session.report(metrics, write_checkpoint=None)
                                    every worker reports; rank 0 also calls
                                    write_checkpoint(dir) and attaches that directory
    session.logs_to_wandb           whether the loop starts its own wandb run

Three sessions run the same loop: `RayTrainSession` in a Ray Train worker (Train V2 wants a
report from every rank; only rank 0's checkpoint is kept), `TuneSession` in a Ray Tune
function trial (one worker; wandb goes through Tune's callback), and `LocalSession` in one
plain process with no Ray at all, for debugging and fast tests.

A checkpoint damaged on disk (truncated by a full disk, half uploaded) is not resumed from:
`restore` checks each checkpoint's manifest (run_checkpoint.py) and falls back to the newest
earlier one that is intact, or raises a CheckpointError naming the damaged file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
from typing import Callable, ContextManager, Iterable, Iterator, Protocol

import torch

from ray_updown.ray_cluster import progress_line
from ray_updown.train.run_checkpoint import MANIFEST_FILE, find_damage, nothing_intact, resuming_before, write_manifest

log = logging.getLogger(__name__)

CheckpointWriter = Callable[[str], None]  # writes a checkpoint into the directory it is given


class Session(Protocol):
    rank: int
    world: int
    logs_to_wandb: bool

    def restore(self) -> ContextManager[str | None]: ...

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None: ...


@contextlib.contextmanager
def _newest_intact(checkpoints: Iterable[tuple[str, ContextManager[str], bool]]
                   ) -> Iterator[str | None]:
    """The local directory of the first intact one of `checkpoints` (newest first: its URI, a
    context that gives its local directory, and whether Ray registered it), None when there
    are none. An unregistered one counts only when its manifest shows it complete."""
    damage = None
    for uri, directory, registered in checkpoints:
        with directory as path:
            complete = registered or os.path.exists(os.path.join(path, MANIFEST_FILE))
            found = find_damage(path, source=uri) if complete else None
            if complete and found is None:
                if damage is not None:
                    log.warning(resuming_before(damage, uri))
                yield path
                return
        if registered:
            damage = damage or found
    if damage is not None:
        raise nothing_intact(damage)
    yield None


def _run_checkpoints(registered, filesystem=None, folder: str | None = None
                     ) -> Iterator[tuple[str, ContextManager[str], bool]]:
    """The run's checkpoints in `folder` (default: the one beside `registered`, the checkpoint
    Ray restores, a ray.train/ray.tune Checkpoint or None), newest first (Ray names them in
    the order it wrote them). Those newer than `registered` were persisted by a worker whose
    report Ray never took in (its node died in between: Ray would restart from the checkpoint
    before, or from scratch); they are offered as unregistered."""
    import pyarrow.fs
    import ray.train

    if folder is None:
        if registered is None:
            return
        filesystem, folder = registered.filesystem, posixpath.dirname(registered.path.rstrip("/"))
    kind = type(registered) if registered is not None else ray.train.Checkpoint
    newest_registered = posixpath.basename(registered.path.rstrip("/")) if registered else ""
    try:
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
    except (FileNotFoundError, OSError):
        found = []
    names = sorted((f.base_name for f in found if f.type == pyarrow.fs.FileType.Directory
                    and f.base_name.startswith("checkpoint_")), reverse=True)
    for name in names:
        checkpoint = kind(posixpath.join(folder, name), filesystem=filesystem)
        yield _ray_uri(checkpoint), checkpoint.as_directory(), name <= newest_registered


def _ray_uri(checkpoint) -> str:
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path.lstrip('/')}"


def _report_to(api, metrics: dict, write_checkpoint: CheckpointWriter | None) -> None:
    """`api.report` (ray.train or ray.tune), with a checkpoint written to a temporary
    directory that Ray copies to the run's storage before the call returns."""
    if write_checkpoint is None:
        api.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        write_checkpoint(tmp)
        write_manifest(tmp)
        api.report(metrics, checkpoint=api.Checkpoint.from_directory(tmp))


class RayTrainSession:
    """A Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.logs_to_wandb = self.rank == 0
        self.run_name = context.get_experiment_name()

    def restore(self) -> ContextManager[str | None]:
        import ray.train

        storage = ray.train.get_context().get_storage()
        return _newest_intact(_run_checkpoints(ray.train.get_checkpoint(),
                                               storage.storage_filesystem,
                                               storage.experiment_fs_path))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None:
        import ray.train

        _report_to(ray.train, metrics, write_checkpoint if self.rank == 0 else None)
        if self.rank == 0:
            progress_line(f"{self.run_name}: {epoch_summary(metrics)}")


def epoch_summary(metrics: dict) -> str:
    """`epoch 3: train_loss 0.412, val_accuracy 61.2, ...`: the numbers of one report."""
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"epoch {metrics.get('epoch', '?')}: {numbers}"


class TuneSession:
    """A Ray Tune function trial: one worker."""

    rank, world, logs_to_wandb = 0, 1, False  # Tune's WandbLoggerCallback logs the trial

    def restore(self) -> ContextManager[str | None]:
        import ray.tune

        return _newest_intact(_run_checkpoints(ray.tune.get_checkpoint()))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, write_checkpoint: CheckpointWriter | None = None) -> None:
        import ray.tune

        _report_to(ray.tune, metrics, write_checkpoint)


class LocalSession:
    """One process, no Ray: report n writes `folder/checkpoint_{n:06d}`; `restore` gives the
    newest intact one there. `reports` keeps (metrics, checkpoint path or None) of this process."""

    rank, world, logs_to_wandb = 0, 1, True

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.reports: list[tuple[dict, str | None]] = []

    def _checkpoints(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(n for n in os.listdir(self.folder)
                      if n.startswith("checkpoint_") and not n.endswith(".partial"))

    def restore(self) -> ContextManager[str | None]:
        paths = [os.path.join(self.folder, n) for n in reversed(self._checkpoints())]
        return _newest_intact((p, contextlib.nullcontext(p), True) for p in paths)

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
            write_manifest(partial)
            os.replace(partial, path)
        self.reports.append((dict(metrics), path))
