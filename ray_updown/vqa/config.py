"""The VQA training run's typed config (paper 3.3, supplementary 6.3): data, model preset,
optimiser, and how the run is spread over Ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Literal

from ray_updown.config import check_at_least, check_training_run, from_dict, to_dict, validate_fields
from ray_updown.errors import ConfigError
from ray_updown.vqa.data import VqaDataConfig, absolute_uri
from ray_updown.vqa.model import VqaConfig

METRIC = "val_accuracy"
OPTIMIZERS = {"adadelta": 1.0, "adamax": 2e-3}  # name -> default learning rate
PRESETS = {"paper": VqaConfig.paper, "reimplementation": VqaConfig.reimplementation,
           "projection": VqaConfig.projection}


@dataclass
class VqaModelOptions:
    """The model section: a preset plus the fields to change (None = the preset's value).

    `num_tokens`, `num_answers`, `feat_dim` and `spatial_dim` come from the data.
    """

    # paper: gated tanh, 512; reimplementation: ReLU + weight norm, 1024; projection: the
    # re-implementation's default model, its attention included (vqa/model.py)
    preset: Literal["paper", "reimplementation", "projection"] = "paper"
    hidden: int | None = None
    embed_dim: int | None = None
    question_len: int | None = None
    nonlinearity: Literal["gated_tanh", "relu"] | None = None
    weight_norm: bool | None = None
    classifier_hidden: int | None = None
    dropout: float | None = None
    classifier_dropout: float | None = None
    l2_normalize_features: bool | None = None
    attention: Literal["concat", "projection"] | None = None
    attention_dropout: float | None = None
    packed_questions: bool | None = None  # False: no host sync a step (GPUs; not measured yet)

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}

    def base(self) -> VqaConfig:
        """The preset with the overrides, before the data's sizes are known."""
        return PRESETS[self.preset](**self.overrides())

    def validate(self) -> None:
        # The model's own rules on the preset with the overrides: records are field names here
        validate_fields(self)
        self.base().validate()


@dataclass
class VqaTrainConfig:
    """Everything a VQA training run needs; loadable with `load_config(VqaTrainConfig, yaml)`."""

    data: VqaDataConfig = dc_field(default_factory=VqaDataConfig)
    model: VqaModelOptions = dc_field(default_factory=VqaModelOptions)
    # None: the preset's, as each was trained: adadelta (paper), adamax (the re-implementation's)
    optimizer: Literal["adadelta", "adamax"] | None = None
    lr: float | None = None              # None: 1.0 for adadelta, 2e-3 for adamax
    # The lr rises linearly from lr/steps to lr over the first warmup_epochs (train/worker.py
    # warmup_factor), then stays; 0 = the full lr from the first step
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.25              # max gradient norm; 0 = no clipping
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast in training (train/worker.py)
    epochs: int = 20
    batch_size: int = 512                # global: split across the Ray Train workers
    patience: int = 3                    # epochs without a better val accuracy; 0 = never stop
    seed: int = 0
    num_workers: int = 1                 # Ray Train workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 0              # DataLoader processes per worker
    max_failures: int = 0                # worker/trial restarts from the last checkpoint
    storage_path: str = "runs"           # URI: local path, s3://, gs://
    name: str = "vqa"
    wandb_project: str | None = None

    def validate(self) -> None:
        validate_fields(self)  # data, model, optimizer
        check_training_run(self)
        check_at_least(self, 0, "patience", "grad_clip", "warmup_epochs")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"must be positive (or null: the optimizer's default), got "
                              f"{self.lr}", record="lr")

    def optimizer_name(self) -> str:
        """The optimizer this run uses: the one named, else the preset's."""
        return self.optimizer or ("adadelta" if self.model.preset == "paper" else "adamax")

    def learning_rate(self) -> float:
        """The lr after warmup: the one given, else the optimizer's default."""
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer_name()]

    def absolute(self) -> "VqaTrainConfig":
        """A copy with local relative paths made absolute (Ray workers have their own cwd)."""
        return dataclasses.replace(self, data=self.data.absolute(),
                                   storage_path=absolute_uri(self.storage_path))

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | None = None) -> "VqaTrainConfig":
        return from_dict(cls, values, source)

