"""Optimisation of the detector: AdamW or SGD with momentum, warmup then cosine/step decay.

The schedule is nanoGPT's: linear warmup over the first steps, then a decay driven by the
run's progress in [0, 1], where progress is the larger of steps/total steps and training
time/time budget, so a time-budgeted run ends annealed however fast the machine is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ray_updown.config import validate_fields
from ray_updown.errors import ConfigError
from ray_updown.train.worker import warmup_factor


@dataclass
class DetectorOptimConfig:
    """Optimiser and learning-rate schedule (warmup, then cosine or step decay)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: with momentum, as the Caffe original
    lr: float = 3e-3
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    weight_decay: float = 1e-4  # not applied to norms and biases
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_fraction: float = 0.02  # cosine floor, as a fraction of lr
    step_milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of the run (step schedule)
    step_gamma: float = 0.1
    grad_clip: float = 10.0  # max gradient norm; 0 = no clipping

    def validate(self) -> None:
        validate_fields(self)  # optimizer, schedule
        if self.lr <= 0:
            raise ConfigError(f"must be positive, got {self.lr}", record="lr")
        if self.warmup_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.warmup_steps}", record="warmup_steps")


def build_optimizer(model: torch.nn.Module, o: DetectorOptimConfig) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (norms, biases and embeddings are exempt)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embedding" not in name else exempt).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": exempt, "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def learning_rate(o: DetectorOptimConfig, step: int, progress: float) -> float:
    """Warmup over the first steps, then decay by the run's progress in [0, 1]."""
    warm = warmup_factor(step, o.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if o.schedule == "cosine":
        floor = o.min_lr_fraction
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif o.schedule == "step":
        factor = o.step_gamma ** sum(progress >= m for m in o.step_milestones)
    else:
        factor = 1.0
    return o.lr * warm * factor
