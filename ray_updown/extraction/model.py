"""The model each extraction actor holds: how it is specified, built and described.

`ModelSpec` is the picklable recipe the driver sends; `build_model` loads the checkpoint (or
calls a factory) and prepares it for inference on the actor's device, with the GPU defaults
(Triton region selection on CUDA, `default_batch_size`); `describe_model` gives the store's
metadata (name, D, config, checkpoint hash, vocabularies).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ray_updown.errors import CheckpointError, ConfigError, RayUpdownError, one_line
from ray_updown.features.schema import aligned_vocab


@dataclass
class ModelSpec:
    """A picklable recipe for the model each actor builds.

    kind "detector": `load_detector(checkpoint)`; kind "grid": the ResNet grid baseline
    (paper 4.2) over that detector's trunk with `grid_size` x `grid_size` cells. `factory`
    (a picklable callable returning any object with `extract_regions`, `name` and
    `feature_dim`) replaces both, e.g. for other models or tests. min/max_boxes of 0 keep the
    checkpoint's region-count clamp.
    """

    kind: str = "detector"
    checkpoint: str = ""
    grid_size: int = 7
    min_boxes: int = 0
    max_boxes: int = 0
    half: bool = False
    factory: Callable[[], Any] | None = None
    greedy_scan: str = "auto"  # "auto": Triton on CUDA where installed, else torch
    compile_mode: str = ""  # torch.compile of the RoI head; "" off


def build_model(spec: ModelSpec, device: str = "cpu") -> Any:
    """Build the model of `spec` on `device`; CheckpointError/ConfigError for bad checkpoints."""
    if spec.factory is not None:
        model = spec.factory()
        if hasattr(model, "prepare_inference"):
            model.prepare_inference(device, spec.half)
        return model
    if spec.kind not in ("detector", "grid"):
        raise ConfigError(f"model must be 'detector' or 'grid', got {spec.kind!r}", record="model")
    if not spec.checkpoint:
        raise ConfigError("a detector checkpoint URI is needed (checkpoint=...)", record="checkpoint")
    from ray_updown.detector import GridFeatureExtractor, load_detector

    try:
        detector = load_detector(spec.checkpoint, device="cpu")
    except RayUpdownError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(exc.problem, file=exc.file or spec.checkpoint, record=exc.record) from None
    except Exception as exc:
        raise CheckpointError(f"cannot load ({one_line(exc)})", file=spec.checkpoint) from None
    if spec.min_boxes or spec.max_boxes:
        cfg = detector.config
        lo, hi = spec.min_boxes or cfg.min_boxes, spec.max_boxes or cfg.max_boxes
        detector.config = dataclasses.replace(cfg, min_boxes=min(lo, hi), max_boxes=hi)
    detector.prepare_inference(device, spec.half, greedy_scan=_greedy_scan(spec.greedy_scan, device),
                               compile_mode=spec.compile_mode)
    if spec.kind == "grid":
        return GridFeatureExtractor(detector, spec.grid_size)
    return detector


def _greedy_scan(choice: str, device: str) -> str:
    """"auto": the fused Triton kernel on CUDA (checked equal to the torch loop there, and
    faster: 100.5 against 91.4 images/s, H200, 2026-12-04), where Triton is installed."""
    if choice != "auto":
        return choice
    if not str(device).startswith("cuda"):
        return "torch"
    from ray_updown.detector.select_kernel import triton

    return "triton" if triton is not None else "torch"


GPU_BATCH = 32  # images per forward on a GPU: measured on an H200 (91.4 images/s float16)
GPU_BYTES_PER_IMAGE = {True: 1_400_000_000, False: 2_800_000_000}  # half: 44.8 GB peak at batch 32 (H200)


def default_batch_size(model: Any) -> int:
    """Images per forward when the config leaves it 0: 32 on a GPU, fewer where 70% of the
    device's memory holds fewer (at the H200's measured peak per image); 4 on the CPU."""
    detector = getattr(model, "detector", model)  # the grid baseline wraps a detector
    device = getattr(detector, "device", None)
    if getattr(device, "type", "cpu") != "cuda":
        return 4
    import torch

    half = getattr(detector, "dtype", None) == torch.float16
    total = torch.cuda.get_device_properties(device).total_memory
    return max(1, min(GPU_BATCH, int(total * 7 // (10 * GPU_BYTES_PER_IMAGE[half]))))


def describe_model(model: Any, source: str | None = None) -> dict[str, Any]:
    """name, feature_dim, config (dict), checkpoint_hash and the object / attribute
    vocabularies (entry i names id i, see schema.aligned_vocab) of any model behind the
    interface. `source` (the checkpoint) names the file in the error about a vocabulary whose
    length does not fit the detector's class count."""
    inner = getattr(model, "detector", None)  # the grid baseline wraps a detector
    config = getattr(model, "config", None) or getattr(inner, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    vocabs: dict[str, list[str]] = {"object_vocab": [], "attribute_vocab": []}
    if inner is not None and hasattr(model, "grid_size"):
        # Grid cells are not detections: their object/attribute ids name nothing.
        config = {"grid_size": int(model.grid_size), "detector": config}
    else:
        for key, size_key, zero in (("object_vocab", "num_classes", "__background__"),
                                    ("attribute_vocab", "num_attributes", "__no_attribute__")):
            size = config.get(size_key)
            try:
                vocabs[key] = aligned_vocab(getattr(model, key, None),
                                            int(size) if size is not None else None, zero)
            except ValueError as exc:
                raise CheckpointError(f"{key}: {exc}", file=source or None) from None
    return {"name": str(model.name), "feature_dim": int(model.feature_dim), "config": config,
            "checkpoint_hash": str(getattr(model, "checkpoint_hash", None)
                                   or getattr(inner, "checkpoint_hash", None) or ""),
            **vocabs}
