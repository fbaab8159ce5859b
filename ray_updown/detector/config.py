"""The detector's typed configuration.

`DetectorConfig()` is the released Caffe model of the paper (section 3.1, supp. 6.1): ResNet-101
C4, 1601 classes (background first), 401 attributes ("no attribute" first), 12 Caffe anchors,
RoIPool 14x14, res5 with stride 1 / dilation 2, legacy "+1" box arithmetic and delta weights
(1, 1, 1, 1). `world_config()` and `tiny_config()` are narrow, shallow variants for the
synthetic world (128-px images, 14-60 px objects) and the tests.

Inference conventions. The public ports of the model compute the same network with different
small rules, and a converted model must reproduce its own port (`converters.layout_conventions`).
`CONVENTIONS` names each port's set; a set is plain config fields, so it round-trips like the
rest, and any field can still be overridden alone:
- "caffe" (peteanderson80/bottom-up-attention, the paper's released features; our default):
  resized sides rounded half to even (cv2.resize's cvRound, as Python's `round`), the long-side
  cap tested on the rounded side (`prep_im_for_blob`); proposals with a side under
  `16 x im_scale` dropped before the pre-NMS top-k (`_filter_boxes`, `>=` keeps); attribute
  confidence from the softmax over all 401 outputs, "no attribute" dropped after (generate_tsv).
- "milvlg" (bottom-up-attention.pytorch, caffe mode): Caffe's resize (`get_image_blob`) and
  attribute softmax (`BUACaffeFastRCNNOutputLayers`), but its own proposal filter
  (`find_top_bua_rpn_proposals`): after clipping keep x2 > x1 and y2 > y1, then sides (+1)
  strictly `> 16 x im_scale`, before the top-k.
- "detectron2" (the Hugging Face FRCNN; "py-bottom-up-attention" is the same with PIL's
  resize, see transform.py): detectron2's ResizeShortestEdge (cap tested on the unrounded
  long side, sides `int(x + 0.5)`); proposals
  ranked first, the pre-NMS top-k clipped, then sides `> PROPOSAL_GENERATOR.MIN_SIZE` = 0
  network-input pixels kept (`find_top_rpn_proposals`, `Boxes.nonempty`); attribute confidence
  from the softmax over the 400 attributes, "no attribute" dropped before (`_predict_attrs`,
  the demo's `pred_attr_logits[..., :-1].softmax(-1)`).
Shared by all, so not a choice: dw/dh clamped at log(1000/16), bilinear resampling.

Final region selection (`region_selection`, select_ports.py), also per port:
- "caffe", "milvlg": "generate_tsv": per-class NMS 0.3 over the proposals, best surviving score
  >= 0.2, 10..100 regions by rank (generate_tsv.py; MILVLG `save_roi_features`); the boxes
  are the proposals. MILVLG's -k36 file sets min = max = 36 (converters.load_published).
- "py-bottom-up-attention": "per_class_top_k": (proposal, class) detections scoring > 0.2,
  class-wise NMS over the regressed class boxes, the best 36, NMS thresholds 0.5, 0.6, 0.7,
  0.8, 0.9 tried until 36 are kept (demo_feature_extraction_attr.ipynb; the notebook's
  np.arange(0.5, 1.0, 0.1) differs from these only below float32 resolution).
- "detectron2" (HF): "best_class_top_k": each proposal's best class and its regressed box, one
  class-agnostic NMS, no score threshold, the best 36 (`do_nms`, `ROIOutputs.inference`; the
  NMS threshold NMS_THRESH_TEST = 0.6 and MAX_DETECTIONS = 36 of the hub's config.yaml).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ray_updown.config import check_at_least, from_dict, validate_fields
from ray_updown.errors import ConfigError

# Blocks per stage (res2, res3, res4, res5) and the block type of each supported depth.
RESNET_STAGES: dict[int, tuple[tuple[int, int, int, int], str]] = {
    10: ((1, 1, 1, 1), "basic"),
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
}

# Caffe's BGR means of the released model (cfg.PIXEL_MEANS of peteanderson80/bottom-up-attention).
CAFFE_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)

# The inference conventions of each port (module docstring), as config field values.
_GENERATE_TSV = dict(region_selection="generate_tsv", select_nms=0.3, select_conf=0.2,
                     select_nms_steps=(), min_boxes=10, max_boxes=100)
CONVENTIONS: dict[str, dict[str, Any]] = {
    "caffe": dict(resize_rule="caffe", resize_interpolation="bilinear", rpn_size_filter="caffe",
                  rpn_min_size=16.0, attr_confidence="with_none", **_GENERATE_TSV),
    "milvlg": dict(resize_rule="caffe", resize_interpolation="bilinear", rpn_size_filter="milvlg",
                   rpn_min_size=16.0, attr_confidence="with_none", **_GENERATE_TSV),
    # py-bottom-up-attention: detectron2's rules with PIL's resize.
    "py-bottom-up-attention": dict(resize_rule="detectron2", resize_interpolation="pil",
                                   rpn_size_filter="detectron2", rpn_min_size=0.0,
                                   attr_confidence="without_none",
                                   region_selection="per_class_top_k", select_nms=0.3,
                                   select_conf=0.2, select_nms_steps=(0.5, 0.6, 0.7, 0.8, 0.9),
                                   min_boxes=36, max_boxes=36),
    # The Hugging Face FRCNN: the same with F.interpolate on float pixels.
    "detectron2": dict(resize_rule="detectron2", resize_interpolation="bilinear",
                       rpn_size_filter="detectron2", rpn_min_size=0.0,
                       attr_confidence="without_none", region_selection="best_class_top_k",
                       select_nms=0.3, select_conf=0.2, select_nms_steps=(0.6,), min_boxes=36,
                       max_boxes=36),
}
# Fields that existed before the conventions did: always part of the digest (`hash`).
_DIGESTED_BEFORE_CONVENTIONS = {"rpn_min_size", "select_nms", "select_conf", "min_boxes",
                                "max_boxes"}


@dataclass
class DetectorConfig:
    """Everything that fixes the detector's architecture and its test/train behaviour."""

    name: str = "bua-caffe-r101"
    # Class index 0 = background, vocabulary line i -> i + 1 (1600 VG objects -> 1601).
    num_classes: int = 1601
    # Attribute index 0 = "no attribute", vocabulary line i -> i + 1 (400 VG attributes -> 401).
    num_attributes: int = 401
    depth: int = 101
    # Stem channels = res2 bottleneck width; res5 output (the region feature D) is 32x this
    # for bottleneck blocks (2048 at 64) and 8x for basic blocks.
    width: int = 64
    stride_in_1x1: bool = True  # MSRA/Caffe ResNets put the stride in the first 1x1 conv
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    freeze_at: int = 2  # 0 nothing, 1 stem, 2 stem+res2, ... (frozen parameters)
    res5_dilation: Literal[1, 2] = 2

    # Input: RGB uint8 -> BGR float minus the Caffe means, no std; resized like Caffe.
    pixel_mean: tuple[float, float, float] = CAFFE_PIXEL_MEAN_BGR
    input_format: Literal["BGR", "RGB"] = "BGR"
    min_size: int = 600
    max_size: int = 1000
    # How the resized size is computed (module docstring, "Inference conventions"): "caffe"
    # rounds half to even and caps on the rounded long side; "detectron2" caps on the unrounded
    # long side and rounds with int(x + 0.5).
    resize_rule: Literal["caffe", "detectron2"] = "caffe"
    # "bilinear" on the float image (cv2, F.interpolate) or "pil": PIL's antialiased bilinear
    # on the 8-bit image, 8-bit output (py-bottom-up-attention's ResizeTransform).
    resize_interpolation: Literal["bilinear", "pil"] = "bilinear"

    # RPN: 3x3 conv, objectness (Caffe 2-way softmax or detectron2 single logit), deltas.
    rpn_channels: int = 512
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # "caffe": generate_anchors (16-px base box, ratio-major, rounded sides);
    # "detectron2": exact sizes centred on the cell origin, size-major.
    anchor_style: Literal["caffe", "detectron2"] = "caffe"
    rpn_objectness: Literal["softmax2", "sigmoid"] = "softmax2"
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_test: int = 300
    rpn_pre_nms_train: int = 12000
    rpn_post_nms_train: int = 2000
    rpn_nms: float = 0.7
    # Which proposals survive the size test (rpn.py, `size_filter_keep`): "caffe" sides >= the
    # threshold before the pre-NMS top-k; "milvlg" x2 > x1, y2 > y1 and sides > the threshold,
    # before the top-k; "detectron2" sides > the threshold among the clipped top-k.
    rpn_size_filter: Literal["caffe", "milvlg", "detectron2"] = "caffe"
    # The threshold: original-image pixels for "caffe"/"milvlg" (scaled by im_scale, as they
    # do), network-input pixels for "detectron2" (its MIN_SIZE is not scaled).
    rpn_min_size: float = 16.0
    rpn_box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    # RoI heads.
    pooler: Literal["roipool", "roialign"] = "roipool"
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0  # RoIAlign only
    box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # Caffe/MILVLG measure a box as x2 - x1 + 1; detectron2 and HF as x2 - x1.
    box_plus_one: bool = True
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512
    # Attribute confidence: "with_none" softmax over all attribute outputs, "no attribute"
    # dropped after (Caffe, MILVLG); "without_none" dropped before the softmax (detectron2, HF).
    attr_confidence: Literal["with_none", "without_none"] = "with_none"
    res5_chunk: int = 100  # RoIs per res5 call at inference (bounds memory; 0 = all at once)

    # Final region selection (module docstring; select_ports.py): "generate_tsv" per-class NMS
    # over the proposals, best score >= select_conf, min..max by rank, proposal boxes;
    # "per_class_top_k" (proposal, class) detections > select_conf, class-wise NMS, the best
    # max_boxes; "best_class_top_k" each proposal's best class, class-agnostic NMS, the best
    # max_boxes. The top-k rules return regressed class boxes and try `select_nms_steps` in
    # order until min_boxes regions are kept.
    region_selection: Literal["generate_tsv", "per_class_top_k", "best_class_top_k"] = "generate_tsv"
    select_nms: float = 0.3  # generate_tsv's NMS threshold
    select_conf: float = 0.2  # unused by best_class_top_k (no score threshold)
    select_nms_steps: tuple[float, ...] = ()  # the top-k rules' NMS thresholds, in order
    min_boxes: int = 10
    max_boxes: int = 100

    # Training (section 3.1): four Faster R-CNN losses + attribute loss.
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_iou_thresholds: tuple[float, float] = (0.3, 0.7)
    rpn_boundary_thresh: float = 0.0  # anchors crossing the border by more are ignored; <0 keeps all
    rpn_smooth_l1_beta: float = 1.0 / 9.0  # Caffe sigma 3
    roi_batch_per_image: int = 64
    roi_positive_fraction: float = 0.5
    roi_iou_threshold: float = 0.5
    roi_smooth_l1_beta: float = 1.0  # Caffe sigma 1
    attr_loss_weight: float = 0.5

    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (converter, source)

    # -- derived quantities --------------------------------------------------------------
    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return RESNET_STAGES[self.depth][0]

    @property
    def block_type(self) -> str:
        return RESNET_STAGES[self.depth][1]

    @property
    def feature_dim(self) -> int:
        """D, the region feature size: res5's output channels (2048 for ResNet-101)."""
        return self.width * (32 if self.block_type == "bottleneck" else 8)

    @property
    def res4_channels(self) -> int:
        return self.feature_dim // 2

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    @property
    def feature_stride(self) -> int:
        return 16

    def validate(self) -> None:
        validate_fields(self)  # norm, input_format, anchor_style, rpn_objectness, pooler, ...
        if self.depth not in RESNET_STAGES:
            raise ConfigError(f"depth must be one of {sorted(RESNET_STAGES)}, got {self.depth}",
                              record="depth")
        check_at_least(self, 1, "num_classes", "num_attributes", "width", "rpn_channels",
                       "min_size", "max_size", "pooler_resolution", "attr_embed_dim",
                       "attr_hidden_dim")
        if self.num_classes < 2:
            raise ConfigError("needs background plus at least one class", record="num_classes")
        if not 0 < self.min_boxes <= self.max_boxes:
            raise ConfigError(f"need 0 < min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}",
                              record="min_boxes")
        if not self.anchor_sizes or not self.anchor_ratios:
            raise ConfigError("anchor sizes and ratios must not be empty", record="anchor_sizes")
        if not self.rpn_min_size >= 0:  # also refuses NaN
            raise ConfigError(f"must be >= 0, got {self.rpn_min_size}", record="rpn_min_size")
        if self.region_selection != "generate_tsv" and not (
                self.select_nms_steps and all(0 <= t <= 1 for t in self.select_nms_steps)):
            raise ConfigError(f"{self.region_selection} needs NMS thresholds in [0, 1], got "
                              f"{self.select_nms_steps}", record="select_nms_steps")
        if self.region_selection == "per_class_top_k" and not 0 < self.select_conf < 1:
            # Above a threshold t a proposal has fewer than 1/t classes: that bounds the work.
            raise ConfigError(f"per_class_top_k needs 0 < select_conf < 1, got {self.select_conf}",
                              record="select_conf")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "DetectorConfig":
        """Build from a JSON/YAML mapping (config.from_dict: lists become tuples, unknown keys
        are a ConfigError, the result is validated)."""
        return from_dict(cls, data, source)

    def hash(self) -> str:
        """A short digest of the architecture-and-behaviour config (provenance in feature files)."""
        # Conventions at Caffe's values are left out: a config without those fields and one
        # holding Caffe's values share a digest, so older stores and checkpoints still match.
        caffe = CONVENTIONS["caffe"]
        payload = {k: v for k, v in self.to_dict().items()
                   if k != "extra" and not (k in caffe and k not in _DIGESTED_BEFORE_CONVENTIONS
                                            and v == caffe[k])}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def conventions(name: str) -> dict[str, Any]:
    """The config fields of a port's inference conventions ("caffe", "milvlg", "detectron2")."""
    if name not in CONVENTIONS:
        raise ConfigError(f"unknown conventions {name!r}; known: {sorted(CONVENTIONS)}",
                          record="conventions")
    return dict(CONVENTIONS[name])


def paper_config(**overrides: Any) -> DetectorConfig:
    """The released Caffe model: ResNet-101 at 600/1000, 1601 classes, 401 attributes."""
    return _validated(dataclasses.replace(DetectorConfig(), **overrides))


def world_config(num_classes: int, num_attributes: int, **overrides: Any) -> DetectorConfig:
    """A narrow ResNet C4 for the synthetic world's 128-px images: 14-60 px objects, and the
    annotated background over the whole picture (the 128-px anchor)."""
    base = DetectorConfig(
        name="bua-world-r18-w16", num_classes=num_classes, num_attributes=num_attributes,
        depth=18, width=16, norm="bn", freeze_at=0, min_size=128, max_size=213,
        rpn_channels=64, anchor_sizes=(16.0, 32.0, 64.0, 128.0), anchor_style="detectron2",
        rpn_objectness="sigmoid", rpn_pre_nms_test=600, rpn_post_nms_test=50,
        rpn_pre_nms_train=1000, rpn_post_nms_train=200, rpn_min_size=4.0,
        rpn_boundary_thresh=-1.0, box_plus_one=False, box_weights=(10.0, 10.0, 5.0, 5.0),
        attr_embed_dim=32, attr_hidden_dim=64, min_boxes=2, max_boxes=20,
        roi_batch_per_image=64, roi_positive_fraction=0.25)
    return _validated(dataclasses.replace(base, **overrides))


def tiny_config(num_classes: int = 5, num_attributes: int = 4, **overrides: Any) -> DetectorConfig:
    """The smallest sensible detector (tests): ResNet-10 basic blocks, width 8, 64-px input."""
    base = world_config(num_classes, num_attributes, name="bua-tiny-r10-w8", depth=10, width=8,
                        rpn_channels=16, min_size=64, max_size=107,
                        anchor_sizes=(16.0, 32.0, 64.0), rpn_pre_nms_test=200,
                        rpn_post_nms_test=30, rpn_pre_nms_train=300, rpn_post_nms_train=60,
                        attr_embed_dim=8, attr_hidden_dim=16, min_boxes=2, max_boxes=10,
                        pooler_resolution=7, res5_chunk=16)
    return _validated(dataclasses.replace(base, **overrides))


def _validated(config: DetectorConfig) -> DetectorConfig:
    """The presets fail where a bad override is given, not later in the model."""
    config.validate()
    return config
