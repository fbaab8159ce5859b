"""Where a detector training run's checkpoints go and come from.

A training checkpoint is a directory in our detector format, so `load_detector` reads any
of them directly::

    detector.safetensors, detector.json   weights, config and vocabularies (save_detector)
    trainer_state.pt                      optimizer state and counters (weights_only load)
    train_config.json                     the DetectorTrainConfig of the run

The training loop talks to a session: `RayTrainSession` inside a Ray Train worker (rank 0
attaches the checkpoint to `ray.train.report`, every rank reports, `get_checkpoint()`
resumes), or `LocalSession` in one process without Ray (checkpoints in a local folder) for
debugging and fast tests of the same loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Iterator

import torch

from ray_updown import storage
from ray_updown.detector.checkpoint import CONFIG_FILE as DETECTOR_JSON
from ray_updown.detector.checkpoint import load_detector, load_state_strict, save_detector
from ray_updown.errors import CheckpointError, StorageError

STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


def check_vocabularies(meta: dict, object_names: list[str], attribute_names: list[str],
                       source: str) -> None:
    """CheckpointError unless a detector checkpoint's vocabularies are the data's."""
    for key, names in (("object_vocab", object_names), ("attribute_vocab", attribute_names)):
        theirs = meta.get(key)
        if theirs is None:
            raise CheckpointError(f"has no {key}: cannot check it against the data's", file=source)
        if list(theirs) == list(names):
            continue
        first = next((i for i, (a, b) in enumerate(zip(theirs, names)) if a != b),
                     min(len(theirs), len(names)))
        ours = names[first] if first < len(names) else "<none>"
        other = theirs[first] if first < len(theirs) else "<none>"
        raise CheckpointError(f"{key} does not match the data's: the checkpoint has "
                              f"{len(theirs)} classes, the data {len(names)}; first difference "
                              f"at index {first}: '{other}' vs '{ours}'", file=source)


def read_meta(uri: str) -> dict:
    """detector.json of a checkpoint directory; CheckpointError when there is none."""
    config_uri = storage.join(uri, DETECTOR_JSON)
    if not storage.exists(config_uri):
        raise CheckpointError(f"not a detector checkpoint: no {DETECTOR_JSON}", file=uri)
    return storage.read_json(config_uri)


def load_weights_from(model: torch.nn.Module, uri: str, object_names: list[str],
                      attribute_names: list[str], source: str) -> None:
    """Vocabularies checked, then the checkpoint's weights copied strictly into `model`."""
    check_vocabularies(read_meta(uri), object_names, attribute_names, source)
    load_state_strict(model, load_detector(uri).state_dict(), source)


def save_training_checkpoint(path: str, model: torch.nn.Module, train_config: dict,
                             trainer_state: dict) -> None:
    """Write a training checkpoint into the local directory `path`."""
    save_detector(model, path)
    torch.save(trainer_state, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, TRAIN_CONFIG_FILE), "w") as f:
        json.dump(train_config, f, indent=1, default=str)


def read_trainer_state(path: str) -> dict:
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.exists(state_file):
        raise CheckpointError(f"no {STATE_FILE}: a detector, not a training checkpoint", file=path)
    return torch.load(state_file, weights_only=True)


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest checkpoint directory Ray Train wrote under a run, if any."""
    try:
        found = storage.list_files(storage.join(run_uri, "checkpoint_*", DETECTOR_JSON))
    except StorageError:
        return None
    return found[-1].rsplit("/", 1)[0] if found else None


class RayTrainSession:
    """The loop's view of a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    @contextlib.contextmanager
    def last_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def report(self, metrics: dict, write_checkpoint: Callable[[str], None]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="det-ckpt-") as tmp:
            write_checkpoint(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class LocalSession:
    """One process, no Ray: checkpoint n goes to `folder/checkpoint_{n:06d}`; resumes from
    the newest one there."""

    rank, world = 0, 1

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.reports: list[tuple[dict, str]] = []

    @contextlib.contextmanager
    def last_checkpoint(self) -> Iterator[str | None]:
        names = sorted(n for n in os.listdir(self.folder) if n.startswith("checkpoint_")) \
            if os.path.isdir(self.folder) else []
        yield os.path.join(self.folder, names[-1]) if names else None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, write_checkpoint: Callable[[str], None]) -> None:
        existing = [n for n in os.listdir(self.folder) if n.startswith("checkpoint_")] \
            if os.path.isdir(self.folder) else []
        path = os.path.join(self.folder, f"checkpoint_{len(existing):06d}")
        os.makedirs(path)
        write_checkpoint(path)
        self.reports.append((dict(metrics), path))
