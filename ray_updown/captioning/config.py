"""The captioner training run's typed config (paper 3.2, supplementary 6.2).

    cfg = load_config(CaptionTrainConfig, "captioner.yaml", ["epochs=3", "num_workers=2"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray_updown.captioning.data import CaptionDataConfig
from ray_updown.captioning.objectives import SCSTConfig
from ray_updown.errors import ConfigError


@dataclass
class CaptionModelConfig:
    """The free sizes of the model (M, H, E of supplementary 6.2); vocabulary size, feature
    width and caption length come from the data."""

    embed_dim: int = 1000
    hidden_dim: int = 512
    att_dim: int = 1000
    dropout: float = 0.5


@dataclass
class OptimConfig:
    """Cross-entropy optimisation (supplementary 6.2; Adam as an option)."""

    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: str = "linear"  # "linear" (to 0 at the end of the run) | "constant"
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping


@dataclass
class CaptionTrainConfig:
    name: str = "captioner"  # run name: storage_path/name holds its checkpoints
    storage_path: str = "runs"  # local path or s3:// / gs:// URI
    objective: str = "xe"  # "xe" (eq. 9) | "scst" (eq. 10-11)
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
    wandb_project: str | None = None  # None = no wandb

    def __post_init__(self) -> None:
        if self.objective not in ("xe", "scst"):
            raise ConfigError(f"expected 'xe' or 'scst', got {self.objective!r}",
                              record="objective")
        if {self.optim.optimizer, self.scst.optimizer} - {"sgd", "adam"}:
            raise ConfigError("optimizer must be 'sgd' or 'adam'", record="optim.optimizer")
        if self.optim.schedule not in ("linear", "constant"):
            raise ConfigError(f"expected 'linear' or 'constant', got {self.optim.schedule!r}",
                              record="optim.schedule")
        for name in ("epochs", "batch_size", "num_workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, got {getattr(self, name)}", record=name)
        if self.batch_size < self.num_workers:
            raise ConfigError(f"batch_size {self.batch_size} is smaller than num_workers "
                              f"{self.num_workers}: every worker needs an image per step",
                              record="batch_size")
        if not self.name or "/" in self.name:
            raise ConfigError(f"run name must be a non-empty word without '/', got "
                              f"{self.name!r}", record="name")

