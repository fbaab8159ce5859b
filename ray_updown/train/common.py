"""What every Ray Train loop of the project shares: devices, checkpoints, reporting, wandb.

Our checkpoints are a directory with `model.safetensors` (weights), `config.json` (the model
and training configs) and `trainer_state.pt` (optimizer state and counters, plain tensors and
numbers, loaded with `weights_only=True`). Rank 0 writes the checkpoint; every rank calls
`ray.train.report` (Train V2 requires it) and only rank 0 attaches the checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ray_updown import storage
from ray_updown.errors import CheckpointError, RayUpdownError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"


def pick_device() -> torch.device:
    """CUDA when the worker was given a GPU, else CPU."""
    if torch.cuda.is_available():
        try:
            import ray.train

            return ray.train.torch.get_device()
        except Exception:  # outside a Ray Train worker
            return torch.device("cuda")
    return torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel, if wrapped."""
    return model.module if hasattr(model, "module") else model


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
    """(weights, config, trainer_state or None) from a checkpoint directory (local or URI)."""
    if storage.is_remote(path):
        local = tempfile.mkdtemp(prefix="ckpt-")
        fs, fs_path = storage.filesystem(path)
        fs.get(fs_path.rstrip("/") + "/", local, recursive=True)
        path = local
    weights_file = os.path.join(path, MODEL_FILE)
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(weights_file) or not os.path.exists(config_file):
        raise CheckpointError(f"not a checkpoint: needs {MODEL_FILE} and {CONFIG_FILE}", file=path)
    try:
        weights = load_file(weights_file)
    except Exception as exc:
        raise CheckpointError(f"unreadable weights ({exc})", file=weights_file) from None
    with open(config_file) as f:
        config = json.load(f)
    state_file = os.path.join(path, STATE_FILE)
    trainer_state = torch.load(state_file, weights_only=True) if os.path.exists(state_file) else None
    return weights, config, trainer_state


def load_weights_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, reporting every missing, unexpected and mis-shaped tensor at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    misshaped = sorted(f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{label} {len(items)}: " + ", ".join(items[:8]) + (" …" if len(items) > 8 else ""))
        raise CheckpointError("checkpoint does not match the model config; " + "; ".join(parts), file=source)
    model.load_state_dict(weights)


@dataclass
class Resume:
    """What a loop restores from `ray.train.get_checkpoint()`."""

    weights: dict[str, torch.Tensor]
    config: dict
    trainer_state: dict


def restore_from_ray() -> Resume | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        weights, config, trainer_state = load_checkpoint_dir(path)
    return Resume(weights, config, trainer_state or {})


def report_with_checkpoint(metrics: dict[str, Any], model: torch.nn.Module, config: dict,
                           trainer_state: dict) -> None:
    """Every rank reports; rank 0 attaches a checkpoint written to a temporary directory."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        save_checkpoint_dir(tmp, model, config, trainer_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def init_wandb(project: str | None, config: dict, name: str | None = None):
    """A wandb run on rank 0 when a project is configured, by the config's `wandb_project` or
    the WANDB_PROJECT variable (WANDB_MODE offline by default, so nothing leaves the machine
    unless the user asks; `wandb sync` uploads later)."""
    project = project or os.environ.get("WANDB_PROJECT")
    if not project or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(project=project, name=name, config=config, reinit=True)


# -- the driver side of a run: where Ray stores it, and what comes back ----------------------

def run_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for a Ray RunConfig; remote URIs go through
    the project's storage module, so custom S3 endpoints work."""
    if storage.is_remote(uri):
        filesystem, path = storage.pyarrow_filesystem(uri)
        return path, filesystem
    if uri.startswith("file://"):  # Ray resolves file:// URIs itself
        return uri, None
    return os.path.abspath(uri), None


def checkpoint_uri(checkpoint, storage_path: str) -> str:
    """A Ray checkpoint's location as a URI of our storage module (Ray drops the scheme)."""
    if storage.is_remote(storage_path):
        scheme = storage_path.split("://", 1)[0]
        return f"{scheme}://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def package_error(exc: BaseException) -> RayUpdownError | None:
    """The package error a worker raised, if that is why the run failed (searched through
    the workers' failures and their causes)."""
    pending = list(getattr(exc, "worker_failures", {}).values()) or [exc]
    seen = 0
    while pending and seen < 50:
        failure = pending.pop(0)
        seen += 1
        if isinstance(failure, RayUpdownError):
            base = next(c for c in type(failure).__mro__ if c.__module__ == "ray_updown.errors")
            return base(failure.problem, file=failure.file, record=failure.record)
        pending += [c for c in (getattr(failure, "cause", None), failure.__cause__)
                    if c is not None]
    return None


def fit(trainer):
    """`trainer.fit()`, raising a worker's package error as itself (one clear line in the CLI)
    rather than as Ray's wrapper around it."""
    try:
        return trainer.fit()
    except Exception as exc:
        error = package_error(exc)
        if error is not None:
            raise error from None
        raise
