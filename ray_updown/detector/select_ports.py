"""Which regions an image keeps, per port (`DetectorConfig.region_selection`), and what is
handed back for them: boxes in original pixels, object class and confidence, and the proposal
whose pooled feature and attributes go with each region.

- "generate_tsv" (Caffe's tools/generate_tsv.py; MILVLG's `save_roi_features`, the same rule
  with maskrcnn-benchmark's "+1" NMS): select.py. The regions are proposals: their boxes are
  the proposals divided by the image scale; object = the proposal's best foreground class.
- "per_class_top_k" (py-bottom-up-attention, demo/demo_feature_extraction_attr.ipynb, with
  detectron2's `fast_rcnn_inference_single_image` and `detector_postprocess`): a detection is
  a (proposal, class) pair whose softmax score (background included) is `> select_conf`; its
  box is that class's regressed box clipped to the resized image. Class-wise NMS (torchvision,
  IoU without "+1") keeps detections best first and the first `max_boxes` are taken, NMS
  thresholds `select_nms_steps` tried in order until `min_boxes` are kept (the demo: 0.5 ...
  0.9 until 36). One proposal can give several regions (different classes); each region carries
  its proposal's feature and attributes. Boxes are scaled to original pixels per axis
  (original / resized side), clipped to the original image, and empty ones are dropped
  (the demo drops their boxes but not their features; here the region goes as a whole).
- "best_class_top_k" (the Hugging Face FRCNN, modeling_frcnn.py `do_nms` and
  `ROIOutputs.inference`; py-bottom-up-attention's detectron2_mscoco_proposal_maxnms.py is the
  same): every proposal is one candidate, its best foreground class and that class's regressed
  box clipped to the resized image; no score threshold; one class-agnostic NMS, best first, the
  first `max_boxes` taken, thresholds stepped until `min_boxes` are kept. Boxes are scaled per
  axis (`scales_yx`), neither clipped nor filtered after.
When no threshold reaches `min_boxes`, the last threshold's result is kept (py-bottom-up-
attention's loop ends there; HF's has no result for that image and fails or reuses the
previous image's, which is not reproduced). Equal scores rank by proposal, then class.

The top-k rules run batched and without host synchronisation, like generate_tsv: candidates
are put in score order, so the greedy NMS is `select.greedy_scan_*` over one class per
(image, threshold), with the per-class rule's "different class never suppresses" in the
overlap matrix (as batched_nms's coordinate offsets do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ray_updown.detector.boxes import box_iou, clip_boxes_per_image
from ray_updown.detector.config import DetectorConfig
from ray_updown.detector.select import GreedyScan, greedy_scan_torch, select_regions_batched
from ray_updown.detector.transform import ImageBatch, resized_size


@dataclass
class ChosenRegions:
    """The regions of a batch, padded to M per image; the first `num_kept[i]` of row i real.

    proposal_index (N, M): each region's proposal among its image's own (feature, attributes);
    boxes (N, M, 4) x1 y1 x2 y2 original pixels; object_ids (N, M) detector class (1..);
    object_conf (N, M); num_kept (N,).
    """

    proposal_index: Tensor
    boxes: Tensor
    object_ids: Tensor
    object_conf: Tensor
    num_kept: Tensor


def regions_of_proposals(boxes: Tensor, class_probs: Tensor, index: Tensor, num_kept: Tensor
                         ) -> ChosenRegions:
    """Regions that are proposals (generate_tsv, given boxes): padded (N, R, 4) boxes and
    (N, R, C) class probabilities, `index` (N, M) the chosen ones; object = best foreground."""
    safe = index.clamp(max=max(boxes.shape[1] - 1, 0))
    picked = boxes.gather(1, safe[:, :, None].expand(-1, -1, 4))
    probs = class_probs.gather(1, safe[:, :, None].expand(-1, -1, class_probs.shape[2]))
    object_conf, object_ids = probs[:, :, 1:].max(dim=2)
    return ChosenRegions(index, picked, object_ids + 1, object_conf, num_kept)


def threshold_stepped_nms(boxes: Tensor, scores: Tensor, valid: Tensor, classes: Tensor | None,
                          nms_steps: tuple[float, ...], min_boxes: int, max_boxes: int,
                          greedy_scan: GreedyScan = "torch") -> tuple[Tensor, Tensor]:
    """Greedy NMS best first, the first `max_boxes` kept, NMS thresholds tried in order until
    at least `min_boxes` are kept (else the last threshold's result).

    boxes (N, C, 4), scores (N, C), valid (N, C) candidates; classes (N, C): suppress only
    within a class (None: class-agnostic). IoU without "+1", suppression when IoU > threshold
    (torchvision's nms). -> index (N, M) candidates in rank order, num_kept (N,).
    """
    n, c = scores.shape
    steps = len(nms_steps)
    order = torch.sort(scores.float().masked_fill(~valid, -1.0), dim=1, descending=True,
                       stable=True).indices
    # In rank order the real candidates come first, so the scan's order is the identity.
    ranked = boxes.float().gather(1, order[:, :, None].expand(-1, -1, 4))
    real = valid.gather(1, order)
    counts = real.sum(dim=1)
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(c, dtype=torch.bool, device=real.device)
    if classes is not None:
        ranked_classes = classes.gather(1, order)
        pairs &= ranked_classes[:, :, None] == ranked_classes[:, None, :]
    iou = box_iou(ranked, ranked, plus_one=False)
    over = torch.stack([(iou > t) & pairs for t in nms_steps], dim=1).reshape(n * steps, c, c)
    identity = torch.arange(c, device=scores.device).expand(n * steps, 1, c)
    if greedy_scan == "triton":
        from ray_updown.detector.select_kernel import greedy_scan_triton

        kept = greedy_scan_triton(over, identity.contiguous(), counts.repeat_interleave(steps))
    else:
        kept = greedy_scan_torch(over, identity)
    kept = kept.reshape(n, steps, c) & real[:, None, :]
    reached = kept.sum(dim=2).clamp(max=max_boxes) >= min_boxes  # (N, steps)
    step = torch.where(reached.any(dim=1), reached.int().argmax(dim=1),
                       torch.full_like(counts, steps - 1))
    chosen = kept[torch.arange(n, device=scores.device), step]  # (N, C) in rank order
    rank = chosen.cumsum(dim=1) - 1
    take = chosen & (rank < max_boxes)
    width = min(c, max_boxes)
    slot = torch.sort(torch.where(take, rank, c), dim=1, stable=True).indices[:, :width]
    return order.gather(1, slot), take.sum(dim=1)


def _resized_sizes(config: DetectorConfig, batch: ImageBatch) -> list[tuple[int, int]]:
    """The resized (h, w) of each image without the canvas padding (transform.py): the
    ports clip to, and scale back from, the resized image itself."""
    return [resized_size(h, w, config.min_size, config.max_size, config.resize_rule)[1:]
            for h, w in batch.original_sizes]


def top_k_regions(config: DetectorConfig, batch: ImageBatch, proposals: list[Tensor],
                  class_probs: Tensor, box_deltas: Tensor, coder,
                  greedy_scan: GreedyScan = "torch") -> ChosenRegions:
    """"per_class_top_k" / "best_class_top_k" (module docstring) for a batch: flat (sum R, C)
    class probabilities (background at 0) and box deltas, proposals in resized pixels."""
    n, k = len(proposals), config.num_classes - 1
    device = class_probs.device
    sizes = [len(p) for p in proposals]
    counts = torch.tensor(sizes, device=device)
    foreground = pad_sequence(list(class_probs[:, 1:].split(sizes)), batch_first=True)
    r = foreground.shape[1]
    if config.region_selection == "per_class_top_k":
        # A proposal has fewer than 1 / threshold classes above the threshold (they sum to <= 1).
        width = min(k, max(1, math.floor(1.0 / config.select_conf)))
        top = foreground.topk(width, dim=2)
        classes, within = top.indices.sort(dim=2)  # equal scores: the lower class first
        scores = top.values.gather(2, within)
        above = scores > config.select_conf
    else:
        width = 1
        scores, classes = foreground.max(dim=2, keepdim=True)
        above = torch.ones_like(scores, dtype=torch.bool)
    real = torch.arange(r, device=device)[None, :, None] < counts[:, None, None]
    valid = (above & real).reshape(n, r * width)
    # Each candidate's regressed box for its class (+1: background is slot 0 of the deltas).
    deltas = pad_sequence(list(box_deltas.float().split(sizes)), batch_first=True)
    columns = (4 * (classes + 1))[..., None] + torch.arange(4, device=device)  # (N, R, W, 4)
    picked = deltas.gather(2, columns.reshape(n, r, width * 4)).reshape(-1, 4)
    reference = pad_sequence([p.float() for p in proposals], batch_first=True)
    reference = reference[:, :, None, :].expand(-1, -1, width, -1).reshape(-1, 4)
    boxes = coder.decode(picked, reference).reshape(n, r * width, 4)
    resized = torch.tensor(_resized_sizes(config, batch), device=device)
    boxes = clip_boxes_per_image(boxes, resized, plus_one=False)
    per_class = config.region_selection == "per_class_top_k"
    index, num_kept = threshold_stepped_nms(
        boxes, scores.reshape(n, -1), valid, classes.reshape(n, -1) if per_class else None,
        config.select_nms_steps, config.min_boxes, config.max_boxes, greedy_scan)
    boxes = boxes.gather(1, index[:, :, None].expand(-1, -1, 4))
    # Original pixels per axis: original / resized side, in float32 (HF's scales_yx).
    originals = torch.tensor(batch.original_sizes, device=device, dtype=torch.float32)
    factor = (originals / resized.float()).flip(1).repeat(1, 2)[:, None, :]  # (N, 1, 4) w h w h
    boxes = boxes * factor
    object_conf = scores.reshape(n, -1).gather(1, index)
    object_ids = classes.reshape(n, -1).gather(1, index) + 1
    chosen = ChosenRegions(index // width, boxes, object_ids, object_conf, num_kept)
    return _clip_and_drop_empty(chosen, originals) if per_class else chosen


def _clip_and_drop_empty(chosen: ChosenRegions, originals: Tensor) -> ChosenRegions:
    """detector_postprocess: clip to the original image, drop boxes with a side <= 0."""
    boxes = clip_boxes_per_image(chosen.boxes, originals, plus_one=False)
    m = boxes.shape[1]
    real = torch.arange(m, device=boxes.device)[None, :] < chosen.num_kept[:, None]
    keep = real & (boxes[:, :, 2] > boxes[:, :, 0]) & (boxes[:, :, 3] > boxes[:, :, 1])
    slot = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept first, in order

    def take(x: Tensor) -> Tensor:
        return x.gather(1, slot if x.dim() == 2 else slot[:, :, None].expand(-1, -1, x.shape[2]))

    return ChosenRegions(take(chosen.proposal_index), take(boxes), take(chosen.object_ids),
                         take(chosen.object_conf), keep.sum(dim=1))


def choose_regions(config: DetectorConfig, batch: ImageBatch, proposals: list[Tensor],
                   class_probs: Tensor, box_deltas, coder, greedy_scan: GreedyScan = "torch"
                   ) -> ChosenRegions:
    """The regions of a batch under the config's `region_selection`: flat (sum R, C) class
    probabilities, proposals in resized pixels; `box_deltas()` gives the flat deltas (only the
    top-k rules need them, so generate_tsv does not compute them)."""
    if config.region_selection != "generate_tsv":
        return top_k_regions(config, batch, proposals, class_probs, box_deltas(), coder,
                             greedy_scan)
    counts = [len(p) for p in proposals]
    # Per image, as the unbatched rule did: a scalar divisor is computed differently
    # (a reciprocal product on CUDA) from an elementwise one.
    boxes = pad_sequence([p.float() / batch.scales[i] for i, p in enumerate(proposals)],
                         batch_first=True)
    probs = pad_sequence(list(class_probs.split(counts)), batch_first=True)
    chosen = select_regions_batched(
        boxes, probs, torch.tensor(counts, device=class_probs.device),
        nms_threshold=config.select_nms, conf_threshold=config.select_conf,
        min_boxes=config.min_boxes, max_boxes=config.max_boxes, plus_one=config.box_plus_one,
        greedy_scan=greedy_scan)
    return regions_of_proposals(boxes, probs, chosen.index, chosen.num_kept)
