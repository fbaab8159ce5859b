"""Converters for the three published layouts of the Visual Genome bottom-up model.

| layout                 | file                                          | objectness | classes        | deltas, weights        | boxes |
|------------------------|-----------------------------------------------|------------|----------------|------------------------|-------|
| py-bottom-up-attention | faster_rcnn_from_caffe_attr.pkl (detectron2)  | 1 logit    | background last| 6400, (10, 10, 5, 5)   | x2-x1 |
| milvlg                 | bua-caffe-frcn-r101_with_attributes.pth, -k36, -k10-100 | 2-way softmax | background first | 6404, (1, 1, 1, 1) | x2-x1+1 |
| hf-frcnn               | unc-nlp/frcnn-vg-finetuned pytorch_model.bin  | 1 logit    | background last| 6400, (10, 10, 5, 5)   | x2-x1 |

All three name the trunk as detectron2 does (`backbone.stem.conv1.*`, `backbone.res2.0.conv1.norm.*`,
`roi_heads.res5.*`), which our modules follow, so the trunk maps one to one. The RPN head lives
at `proposal_generator.rpn_head.*`; cell anchors, when the file carries them
(`proposal_generator.anchor_generator.cell_anchors.0`), replace ours. Class rows are rotated so
that background comes first, the detectron2 box predictor gets zero rows for the background
slot, and "no attribute" is moved to index 0. The converted model keeps its source's
conventions in its config, so it computes what the source computed: the properties of the
weights (objectness form, anchors, delta weights, box arithmetic) and, by default, the port's
inference rules (`config.CONVENTIONS`: resize rounding, proposal size filter, attribute
confidence). `conventions="caffe"` picks Caffe's inference rules instead, to reproduce the
features released with the paper from the same weights. Files are read without running code
(safe_pickle).

| layout                 | reproduces                                    | inference conventions    |
|------------------------|-----------------------------------------------|--------------------------|
| py-bottom-up-attention | its demo / detectron2 inference               | "py-bottom-up-attention" |
| milvlg                 | extract_features.py, caffe mode               | "milvlg"                 |
| hf-frcnn               | transformers' lxmert demo (modeling_frcnn.py) | "detectron2"             |

Where users get the files (never fetched by this package or its tests):
- py-bottom-up-attention: http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl
  (linked from github.com/airsplay/py-bottom-up-attention's demo notebooks).
- MILVLG: the "Pre-trained models" table of github.com/MILVLG/bottom-up-attention.pytorch
  (R101-k36, R101-k10-100 and bua-caffe-frcn-r101_with_attributes.pth, "caffe" mode).
- Hugging Face: pytorch_model.bin of https://huggingface.co/unc-nlp/frcnn-vg-finetuned.
Then: `model = load_published("faster_rcnn_from_caffe_attr.pkl")` (layout detected from the
names and the suffix, or pass `layout=`), and `save_detector(model, uri)` to store it in our
format.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ray_updown import storage
from ray_updown.detector.checkpoint import weights_digest
from ray_updown.detector.config import RESNET_STAGES, DetectorConfig
from ray_updown.detector.config import conventions as named_conventions
from ray_updown.detector.rpn import caffe_cell_anchors, detectron2_cell_anchors
from ray_updown.errors import CheckpointError
from ray_updown.safe_pickle import safe_torch_load, safe_unpickle
from ray_updown.weights import load_state_strict, raise_for_report, state_dict_report

LAYOUTS = ("py-bottom-up-attention", "milvlg", "hf-frcnn")

_PREDICTOR = "roi_heads.box_predictor."
_ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"
# Published predictor/attribute names -> ours, per layout.
_HEAD_NAMES = {
    "milvlg": {"cls_score": "roi_heads.predictor.cls_score",
               "bbox_pred": "roi_heads.predictor.bbox_pred",
               "cls_embed": "roi_heads.attributes.class_embedding",
               "attr_linear1": "roi_heads.attributes.fc",
               "attr_linear2": "roi_heads.attributes.score"},
    "detectron2": {"cls_score": "roi_heads.predictor.cls_score",
                   "bbox_pred": "roi_heads.predictor.bbox_pred",
                   "cls_embedding": "roi_heads.attributes.class_embedding",
                   "fc_attr": "roi_heads.attributes.fc",
                   "attr_score": "roi_heads.attributes.score"},
}


def _family(layout: str) -> str:
    return "milvlg" if layout == "milvlg" else "detectron2"


# The inference conventions (config.CONVENTIONS) each layout's own port runs with.
PORT_CONVENTIONS = {"py-bottom-up-attention": "py-bottom-up-attention", "milvlg": "milvlg",
                    "hf-frcnn": "detectron2"}


def layout_conventions(layout: str, conventions: str | None = None) -> dict[str, Any]:
    """The config fields a layout fixes: the properties of its weights, and the inference
    conventions of its port unless `conventions` names others (e.g. "caffe")."""
    if layout == "milvlg":
        weights = dict(rpn_objectness="softmax2", anchor_style="caffe", box_plus_one=True,
                       box_weights=(1.0, 1.0, 1.0, 1.0), rpn_box_weights=(1.0, 1.0, 1.0, 1.0))
    elif layout in ("py-bottom-up-attention", "hf-frcnn"):
        weights = dict(rpn_objectness="sigmoid", anchor_style="detectron2", box_plus_one=False,
                       box_weights=(10.0, 10.0, 5.0, 5.0), rpn_box_weights=(1.0, 1.0, 1.0, 1.0))
    else:
        raise CheckpointError(f"unknown layout {layout!r}; known: {list(LAYOUTS)}")
    return {**weights, **named_conventions(conventions or PORT_CONVENTIONS[layout])}


def our_name(name: str, layout: str) -> str | None:
    """Published tensor name -> our name (None: not a tensor we use)."""
    if name.endswith("num_batches_tracked"):
        return None
    if name.startswith("backbone.") or name.startswith("roi_heads.res5."):
        return name
    if name.startswith("proposal_generator.rpn_head."):
        return "rpn.head." + name[len("proposal_generator.rpn_head."):]
    if name == _ANCHORS:
        return "rpn.cell_anchors"
    if name.startswith(_PREDICTOR):
        module, _, leaf = name[len(_PREDICTOR):].partition(".")
        mapped = _HEAD_NAMES[_family(layout)].get(module)
        return f"{mapped}.{leaf}" if mapped else None
    return None


def published_name(name: str, layout: str) -> str:
    """Our tensor name -> the published one (inverse of `our_name`)."""
    if name.startswith("backbone.") or name.startswith("roi_heads.res5."):
        return name
    if name.startswith("rpn.head."):
        return "proposal_generator.rpn_head." + name[len("rpn.head."):]
    if name == "rpn.cell_anchors":
        return _ANCHORS
    for theirs, ours in _HEAD_NAMES[_family(layout)].items():
        if name.startswith(ours + "."):
            return _PREDICTOR + theirs + name[len(ours):]
    return name


def _tensor(value: Any, name: str, source: str | None) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    raise CheckpointError(f"expected an array, got {type(value).__name__}", file=source, record=name)


def unwrap_state(obj: Any, source: str | None) -> dict[str, Any]:
    """The tensor mapping inside a published file (detectron2 files wrap it in {"model": ...})."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("expected a mapping of tensor names to arrays", file=source)
    return dict(obj)


def _blocks(keys: list[str], prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_config(state: Mapping[str, Tensor], layout: str, source: str | None = None,
                 conventions: str | None = None, **overrides: Any) -> DetectorConfig:
    """Depth, width, class/attribute counts and head sizes read off the published shapes;
    the layout's conventions (`layout_conventions`), then `overrides`, on top."""
    keys = list(state)
    need = ["backbone.stem.conv1.weight", "proposal_generator.rpn_head.conv.weight",
            _PREDICTOR + "cls_score.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"not a {layout} detector: missing {missing}", file=source)
    blocks = tuple(_blocks(keys, f"backbone.res{s}.") for s in (2, 3, 4)) + (
        _blocks(keys, "roi_heads.res5."),)
    kind = "bottleneck" if any(".conv3." in k for k in keys) else "basic"
    depth = next((d for d, (b, t) in RESNET_STAGES.items() if b == blocks and t == kind), None)
    if depth is None:
        raise CheckpointError(f"unsupported ResNet: {kind} blocks per stage {blocks}", file=source)
    names = {v: k for k, v in _HEAD_NAMES[_family(layout)].items()}
    embed = state.get(_PREDICTOR + names["roi_heads.attributes.class_embedding"] + ".weight")
    fc = state.get(_PREDICTOR + names["roi_heads.attributes.fc"] + ".weight")
    score = state.get(_PREDICTOR + names["roi_heads.attributes.score"] + ".weight")
    if embed is None or fc is None or score is None:
        raise CheckpointError("no attribute head (cls_embedding/fc_attr/attr_score or "
                              "cls_embed/attr_linear1/attr_linear2)", file=source)
    values: dict[str, Any] = dict(
        name=f"{layout}-r{depth}", depth=depth, width=int(state["backbone.stem.conv1.weight"].shape[0]),
        num_classes=int(state[_PREDICTOR + "cls_score.weight"].shape[0]),
        num_attributes=int(score.shape[0]), attr_embed_dim=int(embed.shape[1]),
        attr_hidden_dim=int(fc.shape[0]),
        rpn_channels=int(state["proposal_generator.rpn_head.conv.weight"].shape[0]),
        norm="frozen_bn", freeze_at=2, pooler="roipool", res5_dilation=2, stride_in_1x1=True,
        extra={"converted_from": layout, "source": source,
               "conventions": conventions or PORT_CONVENTIONS[layout]})
    values.update(layout_conventions(layout, conventions))
    values.update(overrides)
    return DetectorConfig(**values)


def _rotate_last_first(x: Tensor) -> Tensor:
    return torch.cat([x[-1:], x[:-1]])


def _rotate_first_last(x: Tensor) -> Tensor:
    return torch.cat([x[1:], x[:1]])


def convert_state(published: Mapping[str, Any], layout: str, config: DetectorConfig,
                  source: str | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Published tensors -> our state dict, plus the published names nothing maps to."""
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    d2 = _family(layout) == "detectron2"
    for name, value in published.items():
        ours = our_name(name, layout)
        if ours is None:
            if not name.endswith("num_batches_tracked"):
                unused.append(name)
            continue
        t = _tensor(value, name, source)
        if d2 and ours.startswith(("roi_heads.predictor.cls_score", "roi_heads.attributes.score",
                                   "roi_heads.attributes.class_embedding")):
            t = _rotate_last_first(t)  # background / "no attribute" last -> first
        elif d2 and ours.startswith("roi_heads.predictor.bbox_pred"):
            t = torch.cat([t.new_zeros((4,) + tuple(t.shape[1:])), t])  # empty background slot
        out[ours] = t
    if "rpn.cell_anchors" not in out:
        out["rpn.cell_anchors"] = (caffe_cell_anchors(config.anchor_sizes, config.anchor_ratios)
                                   if config.anchor_style == "caffe"
                                   else detectron2_cell_anchors(config.anchor_sizes,
                                                                config.anchor_ratios))
    return out, unused


def export_state(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Our state dict -> the published layout (inverse of `convert_state`; round-trip tests)."""
    layout_conventions(layout)
    d2 = _family(layout) == "detectron2"
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name == "rpn.cell_anchors" and layout == "py-bottom-up-attention":
            continue  # the detectron2 pickle carries no anchors; the config generates them
        if d2 and name.startswith(("roi_heads.predictor.cls_score", "roi_heads.attributes.score",
                                   "roi_heads.attributes.class_embedding")):
            t = _rotate_first_last(t)
        elif d2 and name.startswith("roi_heads.predictor.bbox_pred"):
            t = t[4:]
        out[published_name(name, layout)] = t
    return out


def detect_layout(keys: list[str], uri: str | None = None) -> str:
    if any(k.startswith(_PREDICTOR + "cls_embed.") for k in keys):
        return "milvlg"
    if uri and str(uri).endswith(".pkl"):
        return "py-bottom-up-attention"
    if any(k.endswith("num_batches_tracked") for k in keys) or _ANCHORS in keys:
        return "hf-frcnn"
    return "py-bottom-up-attention"


def parse_published(data: bytes, uri: str) -> dict[str, Any]:
    """The raw tensor mapping of a published file's bytes, read without running code."""
    obj = safe_unpickle(data, uri) if str(uri).endswith(".pkl") else safe_torch_load(data, uri)
    return unwrap_state(obj, uri)


def read_published(uri: str) -> dict[str, Any]:
    return parse_published(storage.read_bytes(uri), uri)


def model_from_published(published: Mapping[str, Any], layout: str = "auto",
                         source: str | None = None, conventions: str | None = None,
                         **overrides: Any):
    """A BottomUpDetector holding the published weights; strict: every problem is reported.
    `conventions`: None runs the layout's own port's inference rules, "caffe" the paper's."""
    from ray_updown.detector.model import BottomUpDetector

    if layout == "auto":
        layout = detect_layout(list(published), source)
    tensors = {k: _tensor(v, k, source) for k, v in published.items()}
    config = infer_config(tensors, layout, source, conventions, **overrides)
    state, unused = convert_state(tensors, layout, config, source)
    model = BottomUpDetector(config)
    report = state_dict_report(model, state)
    report.unexpected = sorted(set(report.unexpected) | set(unused))
    report.missing = [published_name(n, layout) for n in report.missing]
    report.mismatched = [(published_name(n, layout), g, w) for n, g, w in report.mismatched]
    raise_for_report(report, source)
    load_state_strict(model, state, source)
    return model.eval()


def load_published(uri: str, layout: str = "auto", conventions: str | None = None,
                   **overrides: Any):
    """Convert a downloaded published checkpoint (see the module table) into our model, with
    its port's inference conventions unless `conventions` names others ("caffe").

    MILVLG's `-k36` file selects a fixed 36 regions unless overridden; everything else keeps
    the paper's 10-100 adaptive rule.
    """
    data = storage.read_bytes(uri)
    published = parse_published(data, uri)
    if "k36" in str(uri).rsplit("/", 1)[-1] and "min_boxes" not in overrides:
        overrides = {**overrides, "min_boxes": 36, "max_boxes": 36}
    model = model_from_published(published, layout, uri, conventions, **overrides)
    model.checkpoint_hash = weights_digest(data)[:16]
    return model
