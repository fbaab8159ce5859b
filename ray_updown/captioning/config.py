"""The captioner training run's typed config (paper 3.2, supplementary 6.2).

    cfg = load_config(CaptionTrainConfig, "captioner.yaml", ["epochs=3", "num_workers=2"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ray_updown.captioning.data import CaptionDataConfig
from ray_updown.captioning.model import CaptionerConfig
from ray_updown.captioning.objectives import SCSTConfig
from ray_updown.config import check_training_run, validate_fields


@dataclass
class CaptionModelConfig:
    """The free sizes of the model (M, H, E of supplementary 6.2); vocabulary size, feature
    width and caption length come from the data."""

    embed_dim: int = 1000
    hidden_dim: int = 512
    att_dim: int = 1000
    dropout: float = 0.5

    def validate(self) -> None:
        # The model's own rules, on these sizes (the data's sizes are filled in at training)
        validate_fields(self)
        CaptionerConfig(embed_dim=self.embed_dim, hidden_dim=self.hidden_dim,
                        att_dim=self.att_dim, dropout=self.dropout).validate()


@dataclass
class OptimConfig:
    """Cross-entropy optimisation (supplementary 6.2; Adam as an option)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: Literal["linear", "constant"] = "linear"  # linear: to 0 at the end of the run
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping

    def validate(self) -> None:
        validate_fields(self)


@dataclass
class CaptionTrainConfig:
    name: str = "captioner"  # run name: storage_path/name holds its checkpoints
    storage_path: str = "runs"  # local path or s3:// / gs:// URI
    objective: Literal["xe", "scst"] = "xe"  # xe: eq. 9; scst: eq. 10-11
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    model: CaptionModelConfig = field(default_factory=CaptionModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scst: SCSTConfig = field(default_factory=SCSTConfig)
    epochs: int = 11
    batch_size: int = 20  # images per step over all workers (each brings its ~5 captions)
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 0  # worker failures a run survives (restarting from its checkpoint)
    keep_checkpoints: int = 0  # 0 = keep every epoch's checkpoint
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast in training (train/worker.py)
    wandb_project: str | None = None  # None = no wandb

    def validate(self) -> None:
        validate_fields(self)  # objective; data, model, optim and scst
        check_training_run(self)

