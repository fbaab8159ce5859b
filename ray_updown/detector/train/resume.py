"""A detector training run's checkpoints: how each is written, and how one is read back to
resume the run or to start another from it (`init_from`).

A training checkpoint is a directory in our detector format, so `load_detector` reads any
of them directly::

    detector.safetensors, detector.json   weights, config and vocabularies (save_detector)
    trainer_state.pt                      optimizer state and counters (safe_torch_load)
    train_config.json                     the DetectorTrainConfig of the run

The loop writes them through its session (train/session.py) and reads the last one back
with `read_trainer_state` and `load_weights_from`.
"""

from __future__ import annotations

import json
import os

import torch

from ray_updown import storage
from ray_updown.detector.checkpoint import CONFIG_FILE as DETECTOR_JSON
from ray_updown.detector.checkpoint import load_detector, save_detector
from ray_updown.errors import CheckpointError
from ray_updown.safe_pickle import safe_torch_load
from ray_updown.train.run_checkpoint import check_vocabulary
from ray_updown.weights import load_state_strict

STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


def check_vocabularies(meta: dict, object_names: list[str], attribute_names: list[str],
                       source: str) -> None:
    """CheckpointError unless a detector checkpoint's vocabularies are the data's."""
    for key, names in (("object_vocab", object_names), ("attribute_vocab", attribute_names)):
        check_vocabulary(meta.get(key), names, key, "classes", source)


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
    with open(state_file, "rb") as f:
        return safe_torch_load(f.read(), state_file)
