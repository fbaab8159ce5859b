"""The checkpoint directory of a captioner or VQA training run (the detector's runs write its
own format, detector/checkpoint.py, so that any training checkpoint of it is also a detector;
detector/train/resume.py).

    model.safetensors   the weights
    config.json         the model and training configs (+ vocabularies)
    trainer_state.pt    optimizer state and counters: plain tensors and numbers, read back
                        with `weights_only=True`, so a checkpoint can never run code

Every checkpoint a training session writes (of any task, the detector's too) also gets
`manifest.json`, written last: each file's size and sha256. A restore checks it
(`find_damage`) and resumes from the newest checkpoint that is intact (session.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from ray_updown import storage
from ray_updown.errors import CheckpointError, one_line
from ray_updown.safe_pickle import safe_torch_load
from ray_updown.train.worker import unwrap

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


def save_checkpoint_dir(path: str, model: torch.nn.Module, config: dict,
                        trainer_state: dict | None = None) -> None:
    """Write a checkpoint directory (local path)."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, os.path.join(path, MODEL_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, default=str)
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(path, STATE_FILE))


def load_checkpoint_dir(path: str) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(weights, config, trainer_state or None) from a checkpoint directory (local or URI).

    A damaged file (truncated on disk, half uploaded) is a CheckpointError naming it, never
    a raw safetensors, json or torch error."""
    source = str(path)  # errors name the checkpoint's own files, not a local copy
    if storage.is_remote(path):
        local = tempfile.mkdtemp(prefix="ckpt-")
        fs, fs_path = storage.filesystem(path)
        fs.get(fs_path.rstrip("/") + "/", local, recursive=True)
        path = local
    weights_file = os.path.join(path, MODEL_FILE)
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(weights_file) or not os.path.exists(config_file):
        raise CheckpointError(f"not a checkpoint: needs {MODEL_FILE} and {CONFIG_FILE}", file=source)

    def damaged(what: str, name: str, exc: BaseException) -> CheckpointError:
        return CheckpointError(f"unreadable {what} ({one_line(exc, 200)}); the checkpoint is damaged: "
                               "resume from an earlier one or start a new run",
                               file=storage.join(source, name))

    try:
        weights = load_file(weights_file)
    except Exception as exc:
        raise damaged("weights", MODEL_FILE, exc) from None
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged("config", CONFIG_FILE, exc) from None
    state_file = os.path.join(path, STATE_FILE)
    trainer_state = None
    if os.path.exists(state_file):
        try:
            with open(state_file, "rb") as f:
                # The package's loader: torch's own refusal advises weights_only=False.
                trainer_state = safe_torch_load(f.read(), source=state_file)
        except CheckpointError as exc:  # truncated zip, bad pickle stream, refused global
            raise damaged("trainer state", STATE_FILE, exc) from None
        except OSError as exc:
            raise damaged("trainer state", STATE_FILE, exc) from None
    return weights, config, trainer_state


def write_manifest(path: str) -> None:
    """Record every file of a checkpoint directory just written (a local path), so that a
    restore tells a complete checkpoint from one truncated or altered on disk."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            relative = os.path.relpath(full, path).replace(os.sep, "/")
            if relative != MANIFEST_FILE:
                with open(full, "rb") as f:
                    files[relative] = {"bytes": os.path.getsize(full), "sha256": _sha256(f)}
    with open(os.path.join(path, MANIFEST_FILE), "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)


def find_damage(uri: str, contents: bool = True, source: str | None = None
                ) -> CheckpointError | None:
    """The first file of a checkpoint directory (local path or URI) that is not as its
    manifest recorded it: missing, of another size, or (`contents`) other bytes; None when
    all are. A directory without a manifest (written before manifests) counts as intact:
    its loader's own checks apply. `source` names the checkpoint in the error (default `uri`)."""
    source = source or uri
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    try:
        with fs.open(f"{root}/{MANIFEST_FILE}", "rb") as f:
            recorded = json.load(f)["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in recorded.items()}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a damaged manifest
        return CheckpointError(f"unreadable manifest ({one_line(exc, 200)}); the checkpoint is "
                               "damaged", file=storage.join(source, MANIFEST_FILE))
    for name, (size, digest) in sorted(expected.items()):
        try:
            actual = fs.size(f"{root}/{name}")
            if contents and actual == size:
                with fs.open(f"{root}/{name}", "rb") as f:
                    actual_digest = _sha256(f)
        except FileNotFoundError:
            problem = "missing"
        else:
            problem = (f"truncated: {actual} of its {size} bytes" if actual < size else
                       f"{actual} bytes, {size} when written" if actual != size else
                       "other bytes than were written (sha256)"
                       if contents and actual_digest != digest else None)
        if problem is not None:
            return CheckpointError(f"{problem}; the checkpoint is damaged",
                                   file=storage.join(source, name))
    return None


def resuming_before(damage: CheckpointError, intact: str) -> str:
    """The warning of a run that resumes from `intact` because its latest checkpoint is
    damaged (it stays in the run's folder: Ray Train's record of the run names it)."""
    return f"{damage}; resuming from the checkpoint before it, {intact}"


def nothing_intact(damage: CheckpointError) -> CheckpointError:
    """The error of a run whose latest checkpoint is damaged and no earlier one is intact."""
    return CheckpointError(f"{damage.problem}, and no earlier checkpoint of the run is intact: "
                           "start a new run (another name)", file=damage.file)


def _sha256(f) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def check_vocabulary(theirs: list[str] | None, ours: list[str], what: str, unit: str,
                     source: str) -> None:
    """CheckpointError unless a checkpoint's vocabulary (`what`: "vocabulary",
    "object_vocab", ...) is the data's, entry for entry; the error names the first difference."""
    if theirs is None:
        raise CheckpointError(f"has no {what}: cannot check it against the data's", file=source)
    if list(theirs) == list(ours):
        return
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                 min(len(theirs), len(ours)))
    mine = ours[first] if first < len(ours) else "<none>"
    other = theirs[first] if first < len(theirs) else "<none>"
    raise CheckpointError(f"{what} does not match the data's: the checkpoint has {len(theirs)} "
                          f"{unit}, the data {len(ours)}; first difference at index {first}: "
                          f"'{other}' vs '{mine}'", file=source)
