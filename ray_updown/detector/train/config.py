"""The detector training run's typed config, and the demo's detector (paper 3.1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ray_updown import storage
from ray_updown.config import check_at_least, check_training_run, validate_fields
from ray_updown.detector.config import DetectorConfig, world_config
from ray_updown.detector.train.data import DetectorDataConfig
from ray_updown.detector.train.optim import DetectorOptimConfig


def demo_model_config(**overrides) -> DetectorConfig:
    """The demo's detector for the 128-px world (classes are set from the vocabularies).

    Chosen by measurement on a 2-core CPU (docs/detector.md): a narrow ResNet-10 C4 (base width 16),
    input upscaled 2x to 256 px, RoIAlign 5x5 into res5, anchors 32/64/128 (the world's
    14-60 px objects at 2x) and 256 (the annotated background, the whole picture), 64
    training proposals and 16 sampled RoIs per image, half of them positive. res5 on the
    sampled RoIs dominates a step, hence the small pool and sample (a third cheaper than 7x7
    and 32 RoIs, and better per step). The 2x input matters most: at
    128 px res4 (stride 16) is an 8x8 map, too coarse to place a 14-px object; at equal CPU
    time the 2x model had twice the mAP of the native-size one.
    """
    base = dict(name="bua-world-r10-w16", depth=10, width=16, min_size=256, max_size=427,
                anchor_sizes=(32.0, 64.0, 128.0, 256.0), pooler="roialign", pooler_resolution=5,
                pooler_sampling_ratio=2, roi_batch_per_image=16, roi_positive_fraction=0.5,
                rpn_post_nms_train=64, rpn_pre_nms_train=600, rpn_batch_per_image=128,
                res5_chunk=256)
    return world_config(2, 2, **{**base, **overrides})


@dataclass
class DetectorTrainConfig:
    name: str = "detector"  # run name: storage_path/name holds its checkpoints
    storage_path: str = "runs"  # local path or s3:// / gs:// URI
    data: DetectorDataConfig = field(default_factory=DetectorDataConfig)
    # The architecture; num_classes / num_attributes are always taken from the vocabularies.
    model: DetectorConfig = field(default_factory=demo_model_config)
    optim: DetectorOptimConfig = field(default_factory=DetectorOptimConfig)
    epochs: int = 12
    max_minutes: float = 0.0  # training-time budget (evaluation excluded); 0 = epochs only
    batch_size: int = 8  # images per step over all workers
    num_workers: int = 2
    cpus_per_worker: int = 1
    torch_threads: int = 0  # per worker; 0 = cpus_per_worker (1-thread workers scale best)
    use_gpu: bool = False
    max_failures: int = 0  # worker failures a run survives (restarting from its checkpoint)
    keep_checkpoints: int = 2  # 0 = keep every epoch's checkpoint
    init_from: str = ""  # a detector checkpoint (load_detector) to start from
    export_uri: str = ""  # the final detector; "" = storage_path/name/detector
    eval_batch_size: int = 16
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch always)
    log_every: int = 25  # steps between training-loss logs (wandb)
    seed: int = 0
    wandb_project: str | None = None  # None = no wandb

    def validate(self) -> None:
        validate_fields(self)  # data, model (its class counts are replaced by the data's), optim
        check_training_run(self)
        check_at_least(self, 1, "cpus_per_worker", "eval_batch_size", "eval_every", "log_every")
        check_at_least(self, 0, "max_minutes", "torch_threads")

    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    def detector_uri(self) -> str:
        return self.export_uri or storage.join(self.run_uri(), "detector")


def demo_detector_config(world_root: str, storage_path: str = "runs", name: str = "detector",
                         **overrides) -> DetectorTrainConfig:
    """What `make demo` trains on the default synthetic world (1000 images at 128 px):
    `demo_model_config`, AdamW 3e-3 with warmup and cosine decay over an 8-minute training
    budget, 8 images a step on two single-threaded DDP workers. On a shared 2-core machine
    two 1-thread workers ran 10x faster than one 2-thread worker (docs/detector.md)."""
    cfg = DetectorTrainConfig(name=name, storage_path=storage_path,
                              data=DetectorDataConfig(root=world_root), epochs=40,
                              max_minutes=8.0, batch_size=8, num_workers=2, cpus_per_worker=1,
                              torch_threads=1)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()  # a bad override fails here, as with the detector presets
    return cfg

