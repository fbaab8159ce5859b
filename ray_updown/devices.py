"""Which torch device a piece of work runs on: the one place that decides."""

from __future__ import annotations

import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """The device named, or for "auto": inside a Ray Train worker given a GPU, that GPU
    (`ray.train.torch.get_device`); elsewhere CUDA when present, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # outside a Ray Train worker, or no Ray installed
        return torch.device("cuda")
