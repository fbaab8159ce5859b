"""The configuration of one extraction run (`ExtractConfig`), and what it resolves for the
actors: their constructor arguments, decode limits and model spec."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ray_updown.config import check_at_least, validate_fields
from ray_updown.data.images import DecodeLimits
from ray_updown.errors import ConfigError
from ray_updown.extraction.inputs import IMAGE_SUFFIXES
from ray_updown.extraction.model import ModelSpec

SUMMARY_FILE = "extract_summary.json"  # beside the store: the last run's summary


@dataclass
class ExtractConfig:
    """One extraction run. `images` (a prefix or glob of image files or of WebDataset `.tar`
    shards), `manifest` or `table`, plus `out`, are required.

    model: "detector" (bottom-up regions) or "grid" (ResNet grid baseline, paper 4.2, with
    grid_size x grid_size cells); both read the detector checkpoint at `checkpoint`.
    """

    # Workers decode their own shards, in chunks of the forward's batch (config.py drops it).
    DEPRECATED = {"decode_batch_size": lambda size: {}}

    images: str = ""
    manifest: str = ""  # Parquet / CSV / JSON lines with image_id, uri (relative to `images`)
    # Parquet tables (a file, prefix or glob) holding the image bytes in a column: img2dataset's
    # `jpg`, Hugging Face's `image` struct ({bytes, path}).
    table: str = ""
    image_column: str = ""  # a table's column of image bytes ("jpg", "image.bytes"); "": the only one
    # Where a sample's id is: a table's column ("": the only one of image_id, id, key), or the
    # field of a tar sample's .json ("": its key).
    id_field: str = ""
    out: str = ""
    checkpoint: str = ""
    model: Literal["detector", "grid"] = "detector"
    grid_size: int = 7
    rows_per_shard: int = 256
    batch_size: int = 0  # images per forward; 0: 32 on a GPU (fewer if its memory is small), else 4
    # Forwards per chunk handed to the model; on a GPU the next forward's images are copied
    # to the device while the current one computes (0: 2 with GPUs, 1 without).
    forwards_per_call: int = 0
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.0  # 0: 4 with GPUs (decoding feeds the GPU), else 1
    torch_threads: int = 0  # 0: one per CPU of the actor
    decode_threads: int = 0  # 0: one per CPU of the actor
    shards_in_flight: int = 3  # per actor: one decoding, one in the model, one writing
    half: bool = False  # float16 forward (CUDA only)
    # Region selection's greedy scan: "auto" is the fused Triton kernel on CUDA (when Triton
    # is installed), the torch loop elsewhere.
    greedy_scan: Literal["auto", "torch", "triton"] = "auto"
    # torch.compile of the RoI head's res5 and its mean, off by default until measured on a
    # GPU: "default", "reduce-overhead" (CUDA graphs) or "max-autotune".
    compile_mode: Literal["", "default", "reduce-overhead", "max-autotune"] = ""
    min_boxes: int = 0  # 0: the checkpoint's clamp (10-100 in the paper)
    max_boxes: int = 0
    min_side: int = 600  # the detector's test scale; larger images are downscaled to it
    max_side: int = 1000
    max_image_pixels: int = 100_000_000
    min_image_side: int = 2
    max_aspect_ratio: float = 1000.0  # longer side / shorter side; beyond it an error row
    read_threads: int = 16
    max_restarts: int = 3  # per extraction actor
    max_task_retries: int = 3
    # Custom resources each actor needs, e.g. {"gpu_node": 1} to place them on chosen nodes.
    actor_resources: dict[str, float] = field(default_factory=dict)
    suffixes: list[str] = field(default_factory=lambda: list(IMAGE_SUFFIXES))
    # A feature store whose boxes (per image_id) the detector pools instead of choosing its own.
    boxes_from: str = ""
    # An image boxes_from has no boxes for is an error row; true: the detector chooses its
    # regions there instead (the summary counts them).
    boxes_fallback: bool = False
    # A re-run whose inputs changed for images already done (another id, other boxes, the
    # file replaced) or whose decode and model settings changed is refused; true redoes
    # exactly the shards that hold them (all of them for changed settings).
    redo_changed: bool = False
    plan_only: bool = False  # plan, save the plan and check what is complete; run nothing

    def validate(self) -> None:
        validate_fields(self)  # model
        check_at_least(self, 1, "rows_per_shard", "num_actors", "read_threads",
                       "grid_size", "shards_in_flight")
        check_at_least(self, 0, "batch_size", "forwards_per_call", "cpus_per_actor",
                       "decode_threads", "torch_threads")
        if self.half and self.num_gpus_per_actor <= 0:
            raise ConfigError("half precision needs GPUs (num_gpus_per_actor > 0)", record="half")
        if self.max_boxes and self.min_boxes > self.max_boxes:
            raise ConfigError(f"min_boxes {self.min_boxes} > max_boxes {self.max_boxes}",
                              record="min_boxes")

    def actor_forwards(self) -> int:
        return self.forwards_per_call or (2 if self.num_gpus_per_actor > 0 else 1)

    def actor_cpus(self) -> float:
        return self.cpus_per_actor or (4.0 if self.num_gpus_per_actor > 0 else 1.0)

    def shard_writer_kwargs(self) -> dict[str, Any]:
        """What each ShardWriter is built with, besides out, spec and meta (the defaults of
        batch, forwards, threads resolved here, so the pipeline and gpu_check agree)."""
        cpus = max(1, int(self.actor_cpus()))
        return {"limits": self.limits(), "read_threads": self.read_threads,
                "forward_batch_size": self.batch_size, "forwards_per_call": self.actor_forwards(),
                "use_gpu": self.num_gpus_per_actor > 0,
                "torch_threads": self.torch_threads or cpus,
                "decode_threads": self.decode_threads or cpus,
                "shards_in_flight": self.shards_in_flight}

    def plan_settings(self) -> dict[str, Any]:
        """What a store's features depend on besides the images and the checkpoint (the
        store's metadata holds that): kept in the plan, checked on every re-run."""
        return {**dataclasses.asdict(self.limits()), "model": self.model,
                "grid_size": self.grid_size if self.model == "grid" else 0,
                "min_boxes": self.min_boxes, "max_boxes": self.max_boxes, "half": self.half}

    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.min_side, self.max_side, self.max_image_pixels,
                            self.min_image_side, self.max_aspect_ratio)

    def model_spec(self, factory: Callable[[], Any] | None = None) -> ModelSpec:
        return ModelSpec(self.model, self.checkpoint, self.grid_size, self.min_boxes,
                         self.max_boxes, self.half, factory, self.greedy_scan, self.compile_mode)
