"""The bottom-up attention detector, composed like torchvision's GeneralizedRCNN.

transform (Caffe blob) -> ResNet C4 trunk (res4, stride 16) -> RPN -> RoI heads (res5, class,
box and attribute heads) -> region selection. In train mode, given targets, the forward returns
the four Faster R-CNN losses plus the attribute loss (paper section 3.1); in eval mode it
returns the per-proposal head outputs. `extract_regions` is what the feature pipeline calls.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import batched_nms

from ray_updown.detector.backbone import ResNetC4Trunk, fold_frozen_batchnorm
from ray_updown.detector.boxes import clip_boxes
from ray_updown.detector.config import DetectorConfig
from ray_updown.detector.roi_heads import DetectionTarget, RegionPredictions, RoIHeads, res5_chunk_for_memory
from ray_updown.detector.rpn import RegionProposalNetwork
from ray_updown.detector.select import GreedyScan
from ray_updown.detector.select_ports import ChosenRegions, choose_regions, regions_of_proposals
from ray_updown.detector.transform import ImageBatch, ImageTransform
from ray_updown.devices import pick_device
from ray_updown.errors import ConfigError


@dataclass
class ImagePredictions:
    """Eval-mode output for one image: head outputs plus the geometry to undo the resize."""

    regions: RegionPredictions  # boxes in resized-image pixels
    proposal_scores: Tensor  # (R,) RPN objectness of each proposal
    scale: float  # resized / original
    image_size: tuple[int, int]  # original (h, w)


StageTimer = Callable[[str], AbstractContextManager]


def untimed(stage: str) -> AbstractContextManager:
    return nullcontext()


def to_host(tensor: Tensor) -> Tensor:
    """One device-to-host copy, into pinned memory on CUDA (the copy then runs at full PCIe
    speed instead of through a pageable staging buffer)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def upload_images(images: list, device: torch.device) -> list:
    """HxWx3 uint8 arrays -> tensors on a CUDA `device`, copied from pinned memory without
    blocking the host (the caller orders them on its stream). Anything else, or any other
    device, is returned as given: the transform checks and moves it."""
    if device.type != "cuda":
        return list(images)
    return [torch.from_numpy(np.ascontiguousarray(image)).pin_memory().to(device, non_blocking=True)
            if isinstance(image, np.ndarray) and image.dtype == np.uint8 else image
            for image in images]


class BottomUpDetector(nn.Module):
    def __init__(self, config: DetectorConfig, object_vocab: list[str] | None = None,
                 attribute_vocab: list[str] | None = None):
        super().__init__()
        config.validate()  # built in code, by a converter or from a checkpoint's JSON
        self.config = config
        self.object_vocab = list(object_vocab) if object_vocab else None
        self.attribute_vocab = list(attribute_vocab) if attribute_vocab else None
        self.checkpoint_hash: str | None = None  # set by load_detector / converters
        self.greedy_scan: GreedyScan = "torch"  # region selection's scan (prepare_inference)
        self.transform = ImageTransform(config)
        self.backbone = ResNetC4Trunk(config)
        self.rpn = RegionProposalNetwork(config, self.backbone.out_channels)
        self.roi_heads = RoIHeads(config)

    # -- identity ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def config_hash(self) -> str:
        return self.config.hash()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prepare_inference(self, device: str | torch.device = "auto", half: bool = False, *,
                          fold_norms: bool = True, greedy_scan: GreedyScan = "torch",
                          compile_mode: str = "") -> "BottomUpDetector":
        """Ready the model for extraction; returns it, in eval mode.

        Moves it to `device` ("auto" = CUDA when present) and folds the frozen BatchNorms into
        the convolutions (`fold_norms`; irreversible: do not train or save the result). On
        CUDA also: channels_last (Tensor Core convolutions want NHWC), cuDNN autotuning (the
        input shapes repeat batch after batch), res5 chunks sized to the free device memory,
        and optionally float16 (`half`). `greedy_scan="triton"` selects regions with the fused
        kernel of select_kernel.py (the extraction pipeline's default on CUDA).
        `compile_mode` ("default", "reduce-overhead": CUDA graphs, "max-autotune"; "" off)
        torch.compiles the RoI head's res5 (roi_heads.compile_res5); off until measured on a
        GPU (benchmarks/gpu_check.py).
        """
        target = pick_device(device)
        if half and target.type != "cuda":
            raise ConfigError("half precision needs a CUDA device", record="half")
        if greedy_scan not in ("torch", "triton"):
            raise ConfigError(f"greedy_scan must be 'torch' or 'triton', not {greedy_scan!r}",
                              record="greedy_scan")
        if compile_mode not in ("", "default", "reduce-overhead", "max-autotune"):
            raise ConfigError("compile_mode must be '', 'default', 'reduce-overhead' or "
                              f"'max-autotune', not {compile_mode!r}", record="compile_mode")
        self.eval()
        if fold_norms:
            fold_frozen_batchnorm(self)
        self.to(target)
        if half:
            self.half()
        self.greedy_scan = greedy_scan
        if target.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.to(memory_format=torch.channels_last)
            self.roi_heads.inference_chunk = res5_chunk_for_memory(self.config, target, self.dtype)
        if compile_mode:
            self.roi_heads.compile_res5(compile_mode)
        return self

    # -- the forward ---------------------------------------------------------------------
    def forward(self, images: list, targets: list[DetectionTarget] | None = None
                ) -> dict[str, Tensor] | list[ImagePredictions]:
        """Train mode with targets: {loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_attr}.
        Otherwise: one ImagePredictions per image."""
        batch = self.transform(images, self.device, self.dtype)
        features, feature_sizes = self.backbone(batch.tensor,
                                                batch.sizes_tensor if batch.padded else None)
        if self.training and targets is not None:
            return self._losses(batch, features, feature_sizes, targets)
        proposals, scores, _ = self.rpn(features, feature_sizes, batch)
        regions = self.roi_heads.predict(features, proposals)
        return [ImagePredictions(r, s, batch.scales[i], batch.original_sizes[i])
                for i, (r, s) in enumerate(zip(regions, scores))]

    def _losses(self, batch: ImageBatch, features: Tensor, feature_sizes: Tensor | None,
                targets: list[DetectionTarget]) -> dict[str, Tensor]:
        if len(targets) != len(batch):
            raise ConfigError(f"{len(targets)} targets for {len(batch)} images", record="targets")
        scaled = [DetectionTarget(t.boxes.to(self.device, torch.float32) * batch.scales[i],
                                  t.labels.to(self.device).long(),
                                  t.attributes.to(self.device).long())
                  for i, t in enumerate(targets)]
        proposals, _, rpn_losses = self.rpn(features, feature_sizes, batch,
                                            [t.boxes for t in scaled])
        return {**rpn_losses, **self.roi_heads.losses(features, proposals, scaled)}

    @torch.no_grad()
    def predict(self, images: list) -> list[ImagePredictions]:
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)

    # -- what the feature pipeline calls -------------------------------------------------
    @torch.no_grad()
    def extract_regions(self, images: list, timer: StageTimer = untimed) -> list[dict[str, Any]]:
        """Bottom-up region features of HxWx3 uint8 RGB images (one padded forward).

        Per image: boxes (k, 4) float32 x1 y1 x2 y2 in original pixels (the proposals the
        features were pooled from), features (k, D) float32, object_ids (k,) int32 detector
        class indices (1.., background excluded), object_conf (k,) float32, attr_ids (k,) int32
        attribute indices (1.., "no attribute" excluded), attr_conf (k,) float32, image_w,
        image_h. Regions are chosen by the config's `region_selection` (select_ports.py; the
        top-k rules return regressed boxes) for the whole batch at once; the outputs reach
        the host in one copy. `timer(stage)` wraps each
        stage (benchmarks/detector.py times them).
        """
        was_training = self.training
        self.eval()
        try:
            batch, features, feature_sizes = self._trunk(images, timer)
            with timer("rpn"):
                proposals, _, _ = self.rpn(features, feature_sizes, batch)
            with timer("roi_heads"):
                region, class_logits, attr_logits = self.roi_heads.predict_flat(features, proposals)
            with timer("selection"):
                packed = self._select_and_pack(batch, proposals, region, class_logits, attr_logits)
            with timer("to_host"):
                host = to_host(packed)
        finally:
            self.train(was_training)
        return self._unpack(host, batch)

    def _trunk(self, images: list, timer: StageTimer) -> tuple[ImageBatch, Tensor, Tensor | None]:
        """Transform and trunk: the padded batch, its res4 map and the valid sizes on it."""
        with timer("transform"):
            batch = self.transform(images, self.device, self.dtype)
            if self.device.type == "cuda":
                batch.tensor = batch.tensor.contiguous(memory_format=torch.channels_last)
        with timer("trunk"):
            features, feature_sizes = self.backbone(
                batch.tensor, batch.sizes_tensor if batch.padded else None)
        return batch, features, feature_sizes

    def extract_batches(self, batches: Iterable[list]) -> Iterator[list[dict[str, Any]] | Exception]:
        """`extract_regions` over consecutive batches, yielding each one's results, or the
        exception it raised (the stream goes on; the caller decides, e.g. image by image).

        On CUDA the next batch's pixels are copied to the device on a side stream while the
        current batch computes, so the GPU does not wait for the host-to-device copy.
        """
        if self.device.type != "cuda":
            for images in batches:
                try:
                    yield self.extract_regions(images)
                except Exception as exc:  # handed to the caller, not swallowed
                    yield exc
            return
        copy_stream = torch.cuda.Stream(self.device)

        def stage(images: list) -> tuple[list, torch.cuda.Event]:
            with torch.cuda.stream(copy_stream):
                uploaded = upload_images(images, self.device)
            return uploaded, copy_stream.record_event()

        pending = iter(batches)
        following = next(pending, None)
        staged = stage(following) if following is not None else None
        while staged is not None:
            uploaded, copied = staged
            following = next(pending, None)
            staged = stage(following) if following is not None else None  # overlaps the compute
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for tensor in uploaded:
                if isinstance(tensor, Tensor):
                    tensor.record_stream(compute)  # made on the copy stream, used on this one
            try:
                yield self.extract_regions(uploaded)
            except Exception as exc:
                yield exc

    def _select_and_pack(self, batch: ImageBatch, proposals: list[Tensor], region: Tensor,
                         class_logits: Tensor, attr_logits: Tensor) -> Tensor:
        """Select each image's regions (the config's rule, select_ports.py) and pack them."""
        chosen = choose_regions(self.config, batch, proposals, class_logits.float().softmax(dim=1),
                                lambda: self.roi_heads.predictor.bbox_pred(region),
                                self.roi_heads.coder, self.greedy_scan)
        return self._pack(chosen, [len(p) for p in proposals], region, attr_logits)

    def _pack(self, chosen: ChosenRegions, counts: list[int], region: Tensor,
              attr_logits: Tensor) -> Tensor:
        """Every output of the batch in one flat float32 tensor, for one host copy: (N, M,
        4 + D + 4) rows of boxes, features, object id/conf, attribute id/conf (ids < 2^24
        are exact in float32), then the N kept counts. `counts`: proposals per image, whose
        flat rows `region` and `attr_logits` hold; the first `num_kept[i]` regions are real."""
        n, device, index = len(counts), region.device, chosen.proposal_index
        width = 4 + self.config.feature_dim + 4
        if sum(counts) == 0:
            return torch.cat([torch.zeros(n * index.shape[1] * width, device=device),
                              chosen.num_kept.float()])
        # Rows of the flat (sum R, ...) outputs; slots past an image's count repeat a real row
        # (any row: they are cut off on the host).
        offsets = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
        last = torch.tensor([max(c - 1, 0) for c in counts], device=device)
        rows = (offsets[:, None] + torch.minimum(index, last[:, None])).reshape(-1)
        rows = rows.clamp(max=len(region) - 1)
        attr_conf, attr_ids = attr_logits[rows].float().softmax(dim=1)[:, 1:].max(dim=1)
        packed = torch.cat([chosen.boxes.reshape(-1, 4).float(), region[rows].float(),
                            chosen.object_ids.reshape(-1, 1).float(),
                            chosen.object_conf.reshape(-1, 1).float(),
                            (attr_ids + 1).float()[:, None], attr_conf[:, None]], dim=1)
        return torch.cat([packed.reshape(-1), chosen.num_kept.float()])

    @torch.no_grad()
    def extract_given_boxes(self, images: list, boxes: list, timer: StageTimer = untimed
                            ) -> list[dict[str, Any]]:
        """Region features for boxes the caller already has (ground truth, RefCOCO, another
        detector): the same outputs as `extract_regions`, one row per given box, in order.

        boxes: per image a (k, 4) array of x1 y1 x2 y2 in the image's pixels. They replace
        the RPN's proposals: pooled on res4 at the image's scale, through res5 and the
        heads, with no selection. The caller checks them (finite, x1 < x2, inside the image).
        """
        if len(boxes) != len(images):
            raise ConfigError(f"{len(boxes)} box lists for {len(images)} images", record="boxes")
        was_training = self.training
        self.eval()
        try:
            batch, features, _ = self._trunk(images, timer)
            given = [torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4), device=self.device)
                     for b in boxes]
            with timer("roi_heads"):
                # Into the resized frame exactly as proposals come out of it (x scale).
                pooled = [b * batch.scales[i] for i, b in enumerate(given)]
                region, class_logits, attr_logits = self.roi_heads.predict_flat(features, pooled)
            counts = torch.tensor([len(b) for b in given], device=self.device)
            width = int(counts.max()) if len(given) else 0
            index = torch.arange(width, device=self.device).expand(len(given), width)
            probs = class_logits.float().softmax(dim=1).split([len(b) for b in given])
            chosen = regions_of_proposals(pad_sequence(given, batch_first=True),
                                          pad_sequence(list(probs), batch_first=True), index, counts)
            with timer("to_host"):
                host = to_host(self._pack(chosen, [len(b) for b in given], region, attr_logits))
        finally:
            self.train(was_training)
        return self._unpack(host, batch)

    def _unpack(self, host: Tensor, batch: ImageBatch) -> list[dict[str, Any]]:
        n, dim = len(batch), self.config.feature_dim
        flat = host.numpy()
        num_kept = flat[-n:].astype(np.int64)
        table = flat[:-n].reshape(n, -1, 4 + dim + 4)
        out = []
        for i in range(n):
            rows = table[i, : num_kept[i]]
            h, w = batch.original_sizes[i]
            out.append({
                "boxes": np.ascontiguousarray(rows[:, :4]),
                "features": np.ascontiguousarray(rows[:, 4:4 + dim]),
                "object_ids": rows[:, 4 + dim].astype(np.int32),
                "object_conf": np.ascontiguousarray(rows[:, 5 + dim]),
                "attr_ids": rows[:, 6 + dim].astype(np.int32),
                "attr_conf": np.ascontiguousarray(rows[:, 7 + dim]),
                "image_w": int(w),
                "image_h": int(h),
            })
        return out

    @torch.no_grad()
    def detect(self, images: list[np.ndarray], score_threshold: float = 0.05,
               nms_threshold: float = 0.3, max_per_image: int = 100) -> list[dict[str, np.ndarray]]:
        """Classic detections (regressed class-specific boxes, per-class NMS) for mAP.

        Per image: boxes (n, 4) original pixels, scores (n,), labels (n,) detector classes,
        attr_ids (n,) and attr_conf (n,) of the region each detection came from.
        """
        cfg = self.config
        results = []
        for pred in self.predict(images):
            r = pred.regions
            probs = r.class_logits.float().softmax(dim=1)
            n, c = probs.shape
            h, w = pred.image_size
            boxes = self.roi_heads.coder.decode(r.box_deltas.float(), r.boxes.float()) / pred.scale
            boxes = clip_boxes(boxes.reshape(-1, 4), h, w, cfg.box_plus_one).reshape(n, c, 4)
            scores = probs[:, 1:]
            region_idx, cls = (scores > score_threshold).nonzero(as_tuple=True)
            cand_scores = scores[region_idx, cls]
            cand_boxes = boxes[region_idx, cls + 1]
            nms_boxes = cand_boxes.clone()
            if cfg.box_plus_one:
                nms_boxes[:, 2:] += 1.0
            keep = batched_nms(nms_boxes, cand_scores, cls, nms_threshold)[:max_per_image]
            attr_probs = r.attr_logits.float().softmax(dim=1)[:, 1:]
            attr_conf, attr_ids = attr_probs.max(dim=1)
            ridx = region_idx[keep]
            results.append({
                "boxes": cand_boxes[keep].cpu().numpy().astype(np.float32),
                "scores": cand_scores[keep].cpu().numpy().astype(np.float32),
                "labels": (cls[keep] + 1).cpu().numpy().astype(np.int32),
                "attr_ids": (attr_ids[ridx] + 1).cpu().numpy().astype(np.int32),
                "attr_conf": attr_conf[ridx].cpu().numpy().astype(np.float32),
            })
        return results
