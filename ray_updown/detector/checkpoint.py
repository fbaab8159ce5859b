"""Our detector checkpoints: safetensors weights + a JSON config (+ vocabularies).

A checkpoint is a directory (any storage URI) holding

    detector.safetensors   the state dict (float tensors, no pickle)
    detector.json          {"format", "version", "config", "weights_sha256",
                            "object_vocab", "attribute_vocab"}

Loading is strict: a state dict that does not match the config raises a CheckpointError
listing every missing, unexpected and mis-shaped tensor.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ray_updown import storage
from ray_updown.detector.config import DetectorConfig
from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.weights import load_state_strict

WEIGHTS_FILE = "detector.safetensors"
CONFIG_FILE = "detector.json"
FORMAT = "ray-updown-detector"
VERSION = 1


def weights_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_detector(model: nn.Module, uri: str) -> str:
    """Write `model` (a BottomUpDetector) to the checkpoint directory `uri`; returns the digest."""
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors(state)
    digest = weights_digest(blob)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "weights_sha256": digest,
        "object_vocab": getattr(model, "object_vocab", None),
        "attribute_vocab": getattr(model, "attribute_vocab", None),
    }
    # Weights first: a reader that finds the JSON can rely on the weights being complete.
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), blob)
    storage.write_json(storage.join(uri, CONFIG_FILE), meta, indent=1)
    model.checkpoint_hash = digest[:16]
    return digest


def load_detector(uri: str, device: str | torch.device = "cpu"):
    """Read a checkpoint directory written by `save_detector` -> BottomUpDetector (eval mode)."""
    from ray_updown.detector.model import BottomUpDetector

    config_uri = storage.join(uri, CONFIG_FILE)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    meta = storage.read_json(config_uri)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} config", file=config_uri)
    if int(meta.get("version", -1)) > VERSION:
        raise CheckpointError(f"written by a newer version ({meta.get('version')})", file=config_uri)
    try:
        config = DetectorConfig.from_dict(meta.get("config") or {}, source=config_uri)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"bad detector config: {exc}", file=config_uri) from None
    blob = storage.read_bytes(weights_uri)
    digest = weights_digest(blob)
    if meta.get("weights_sha256") and meta["weights_sha256"] != digest:
        raise CheckpointError("weights do not match the digest recorded in the config "
                              "(truncated or replaced file)", file=weights_uri)
    try:
        state = load_safetensors(blob)
    except Exception as exc:
        raise CheckpointError(f"not a safetensors file ({type(exc).__name__})",
                              file=weights_uri) from None
    model = BottomUpDetector(config, meta.get("object_vocab"), meta.get("attribute_vocab"))
    load_state_strict(model, state, weights_uri)
    model.checkpoint_hash = digest[:16]
    return model.to(device).eval()
