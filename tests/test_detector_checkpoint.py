"""Our checkpoints, the three published layouts, and refusing pickles that run code.

Published files cannot be fetched here: the state dicts are built from the published key names
and shapes (detectron2's ResNet naming, read from py-bottom-up-attention, MILVLG
bottom-up-attention.pytorch and transformers' lxmert modeling_frcnn.py).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from ray_updown import storage
from ray_updown.detector import (
    BottomUpDetector,
    convert_state,
    export_state,
    load_detector,
    load_published,
    save_detector,
    state_dict_report,
    tiny_config,
)
from ray_updown.detector.converters import infer_config
from ray_updown.errors import CheckpointError

LAYOUTS = ["py-bottom-up-attention", "milvlg", "hf-frcnn"]
STAGES = {101: (3, 4, 23, 3), 50: (3, 4, 6, 3)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def published_spec(layout: str, depth: int = 101, width: int = 64, classes: int = 1601,
                   attrs: int = 401, rpn: int = 512, embed: int = 256, hidden: int = 512
                   ) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a published VG detector file (1601/401 for the real ones)."""
    bn = ["weight", "bias", "running_mean", "running_var"]
    if layout != "py-bottom-up-attention":  # torch BatchNorm2d also saves a step counter
        bn.append("num_batches_tracked")
    spec: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, shape: tuple[int, ...]) -> None:
        spec[prefix + ".weight"] = shape
        for leaf in bn:
            spec[f"{prefix}.norm.{leaf}"] = () if leaf == "num_batches_tracked" else (shape[0],)

    conv("backbone.stem.conv1", (width, 3, 7, 7))
    in_ch = width
    for stage, blocks in zip((2, 3, 4, 5), STAGES[depth]):
        bottleneck, out = width * 2 ** (stage - 2), 4 * width * 2 ** (stage - 2)
        prefix = f"backbone.res{stage}" if stage < 5 else "roi_heads.res5"
        for b in range(blocks):
            cin = in_ch if b == 0 else out
            if b == 0:
                conv(f"{prefix}.{b}.shortcut", (out, cin, 1, 1))
            conv(f"{prefix}.{b}.conv1", (bottleneck, cin, 1, 1))
            conv(f"{prefix}.{b}.conv2", (bottleneck, bottleneck, 3, 3))
            conv(f"{prefix}.{b}.conv3", (out, bottleneck, 1, 1))
        in_ch = out
    res4, dim, anchors = 16 * width, 32 * width, 12
    rpn_head = "proposal_generator.rpn_head."
    spec[rpn_head + "conv.weight"], spec[rpn_head + "conv.bias"] = (rpn, res4, 3, 3), (rpn,)
    objectness = 2 * anchors if layout == "milvlg" else anchors
    spec[rpn_head + "objectness_logits.weight"] = (objectness, rpn, 1, 1)
    spec[rpn_head + "objectness_logits.bias"] = (objectness,)
    spec[rpn_head + "anchor_deltas.weight"] = (4 * anchors, rpn, 1, 1)
    spec[rpn_head + "anchor_deltas.bias"] = (4 * anchors,)
    if layout != "py-bottom-up-attention":
        spec["proposal_generator.anchor_generator.cell_anchors.0"] = (anchors, 4)
    p = "roi_heads.box_predictor."
    spec[p + "cls_score.weight"], spec[p + "cls_score.bias"] = (classes, dim), (classes,)
    deltas = 4 * classes if layout == "milvlg" else 4 * (classes - 1)
    spec[p + "bbox_pred.weight"], spec[p + "bbox_pred.bias"] = (deltas, dim), (deltas,)
    emb, fc1, fc2 = (("cls_embed", "attr_linear1", "attr_linear2") if layout == "milvlg"
                     else ("cls_embedding", "fc_attr", "attr_score"))
    spec[f"{p}{emb}.weight"] = (classes, embed)
    spec[f"{p}{fc1}.weight"], spec[f"{p}{fc1}.bias"] = (hidden, dim + embed), (hidden,)
    spec[f"{p}{fc2}.weight"], spec[f"{p}{fc2}.bias"] = (attrs, hidden), (attrs,)
    return spec


def small_published(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A narrow ResNet-50 detector in the published layout, with random values."""
    gen = torch.Generator().manual_seed(seed)
    spec = published_spec(layout, depth=50, width=8, classes=7, attrs=5, rpn=16, embed=8,
                          hidden=16)
    out = {}
    for name, shape in spec.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(100)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=gen) + 0.5
        elif name.endswith("cell_anchors.0"):
            out[name] = torch.tensor([[-s * r, -s / r, s * r, s / r] for s in (16., 32., 64., 128.)
                                      for r in (0.7, 1.0, 1.4)])
        else:
            out[name] = torch.randn(shape, generator=gen) * 0.1
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_resnet101_key_set_and_shapes(layout):
    spec = published_spec(layout)
    published = {k: torch.empty(s, device="meta") for k, s in spec.items()}
    config = infer_config(published, layout)
    assert (config.depth, config.width, config.num_classes, config.num_attributes) == (101, 64,
                                                                                       1601, 401)
    assert config.feature_dim == 2048 and config.rpn_channels == 512
    assert config.rpn_objectness == ("softmax2" if layout == "milvlg" else "sigmoid")
    assert config.box_plus_one == (layout == "milvlg")
    state, unused = convert_state(published, layout, config)
    assert unused == []
    with torch.device("meta"):
        model = BottomUpDetector(config)
    report = state_dict_report(model, state)
    assert report.ok, report.describe()
    assert len(state) == len(model.state_dict())
    back = export_state(state, layout)
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: s for k, s in spec.items() if not k.endswith("num_batches_tracked")}


def _write_published(tmp_path, layout: str, published: dict) -> str:
    if layout == "py-bottom-up-attention":
        path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
        payload = {"model": {k: v.numpy() for k, v in published.items()},
                   "__author__": "tests"}
        path.write_bytes(pickle.dumps(payload, protocol=2))
    elif layout == "milvlg":
        path = tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"
        torch.save({"model": published}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(published, path)
    return str(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converter_round_trip(tmp_path, layout):
    published = small_published(layout)
    model = load_published(_write_published(tmp_path, layout, published))
    assert model.config.extra["converted_from"] == layout
    assert model.checkpoint_hash and model.config.depth == 50
    ours = model.state_dict()
    head = "roi_heads.predictor."
    p = "roi_heads.box_predictor."
    if layout == "milvlg":
        torch.testing.assert_close(ours[head + "cls_score.weight"], published[p + "cls_score.weight"])
        torch.testing.assert_close(ours["rpn.head.objectness_logits.weight"],
                                   published["proposal_generator.rpn_head.objectness_logits.weight"])
    else:  # detectron2 keeps background (and "no attribute") last; we keep them first
        torch.testing.assert_close(ours[head + "cls_score.weight"][0], published[p + "cls_score.weight"][-1])
        torch.testing.assert_close(ours[head + "cls_score.weight"][1:], published[p + "cls_score.weight"][:-1])
        assert float(ours[head + "bbox_pred.weight"][:4].abs().sum()) == 0.0
        torch.testing.assert_close(ours["roi_heads.attributes.score.bias"][0],
                                   published[p + "attr_score.bias"][-1])
        assert model.config.box_weights == (10.0, 10.0, 5.0, 5.0)
    if layout != "py-bottom-up-attention":
        torch.testing.assert_close(ours["rpn.cell_anchors"],
                                   published["proposal_generator.anchor_generator.cell_anchors.0"])
    back = export_state(ours, layout)
    expected = {k: v for k, v in published.items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(back[name], value.float(), msg=name)
    # The converted model runs end to end.
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    record = model.extract_regions([image])[0]
    assert record["features"].shape[1] == 256


def test_milvlg_k36_with_numpy_arrays_selects_fixed_36(tmp_path):
    published = small_published("milvlg")
    path = tmp_path / "bua-caffe-frcn-r101-k36.pth"
    torch.save({k: v.numpy() for k, v in published.items()}, path)  # arrays inside a torch file
    model = load_published(str(path))
    assert (model.config.min_boxes, model.config.max_boxes) == (36, 36)
    torch.testing.assert_close(model.state_dict()["backbone.stem.conv1.weight"],
                               published["backbone.stem.conv1.weight"])


def test_strict_load_reports_every_problem(tmp_path):
    published = small_published("hf-frcnn")
    del published["backbone.res3.1.conv2.weight"]
    published["backbone.res9.0.conv1.weight"] = torch.zeros(3)
    published["roi_heads.res5.1.conv1.weight"] = torch.zeros(2, 2, 1, 1)
    with pytest.raises(CheckpointError) as info:
        load_published(_write_published(tmp_path, "hf-frcnn", published))
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "1 missing: backbone.res3.1.conv2.weight" in message
    assert "backbone.res9.0.conv1.weight" in message and "unexpected" in message
    assert "roi_heads.res5.1.conv1.weight [2, 2, 1, 1]" in message and "mis-shaped" in message


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"model": {"backbone.stem.conv1.weight": np.zeros((2, 3, 7, 7), np.float32),
                         "evil": _RunsCode(str(marker))}}
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refusing to unpickle global .*system"):
        load_published(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name,kwargs", [
    ("pytorch_model.bin", {}),
    ("bua-caffe-frcn-r101_with_attributes.pth", {"_use_new_zipfile_serialization": False}),
    ("protocol4.pth", {"pickle_protocol": 4}),  # STACK_GLOBAL instead of GLOBAL
])
def test_malicious_torch_file_is_refused_naming_the_global(tmp_path, name, kwargs):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"model": _RunsCode(str(marker))}, path, **kwargs)
    with pytest.raises(CheckpointError) as err:
        load_published(str(path))
    message = str(err.value)
    assert str(path) in message and "refusing to load global" in message
    assert "posix.system" in message or "os.system" in message
    assert "weights_only" not in message.replace(" ", "_").lower()  # never advise running it
    assert not marker.exists()


def test_refused_global_is_found_in_the_opcodes_when_torch_does_not_name_it(tmp_path):
    from ray_updown.safe_pickle import _refused_global

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "model": _RunsCode("x")}, path, pickle_protocol=4)
    assert _refused_global("some future torch message", path.read_bytes()) == "posix.system"


def test_truncated_torch_file_is_a_checkpoint_error_without_torch_advice(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CheckpointError) as err:
        load_published(str(path))
    assert "unreadable torch file" in str(err.value) and "weights_only" not in str(err.value)


def test_truncated_pickle_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "broken.pkl"
    path.write_bytes(pickle.dumps({"model": {"a": np.zeros(3)}})[:20])
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        load_published(str(path))


def _tiny() -> BottomUpDetector:
    torch.manual_seed(0)
    return BottomUpDetector(tiny_config(num_classes=6, num_attributes=5),
                            object_vocab=["a", "b", "c", "d", "e"],
                            attribute_vocab=["red", "big", "old", "new"]).eval()


def test_save_and_load_round_trip(tmp_path):
    model = _tiny()
    digest = save_detector(model, str(tmp_path / "ckpt"))
    loaded = load_detector(str(tmp_path / "ckpt"))
    assert loaded.config == model.config and loaded.checkpoint_hash == digest[:16]
    assert loaded.object_vocab == model.object_vocab and loaded.attribute_vocab[0] == "red"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
    image = np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    a, b = model.extract_regions([image])[0], loaded.extract_regions([image])[0]
    np.testing.assert_array_equal(a["features"], b["features"])


def test_save_and_load_on_s3(s3_bucket):
    model = _tiny()
    uri = f"{s3_bucket}/detectors/tiny"
    save_detector(model, uri)
    assert storage.exists(f"{uri}/detector.safetensors")
    loaded = load_detector(uri)
    torch.testing.assert_close(loaded.state_dict()["rpn.head.conv.weight"],
                               model.state_dict()["rpn.head.conv.weight"])


def test_config_mismatch_lists_tensors(tmp_path):
    model = _tiny()
    uri = str(tmp_path / "ckpt")
    save_detector(model, uri)
    meta = json.loads((tmp_path / "ckpt" / "detector.json").read_text())
    meta["config"]["num_classes"] = 9
    (tmp_path / "ckpt" / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_detector(uri)
    message = str(info.value)
    assert "detector.safetensors" in message and "mis-shaped" in message
    assert "roi_heads.predictor.cls_score.weight [6, 64] (model expects [9, 64])" in message


def test_replaced_weights_fail_the_digest(tmp_path):
    uri = str(tmp_path / "ckpt")
    save_detector(_tiny(), uri)
    from safetensors.torch import save
    (tmp_path / "ckpt" / "detector.safetensors").write_bytes(save({"x": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="digest"):
        load_detector(uri)


def test_cli_converts_a_published_pickle(tmp_path, capsys):
    from ray_updown.cli import main

    source = _write_published(tmp_path, "py-bottom-up-attention", small_published("py-bottom-up-attention"))
    out = str(tmp_path / "converted")
    assert main(["convert-detector", "--published", source, "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == out and len(summary["sha256"]) == 64
    model = load_detector(out)
    assert model.config.extra["converted_from"] == "py-bottom-up-attention"


@pytest.mark.parametrize("conventions, selection", [(None, "per_class_top_k"),
                                                    ("caffe", "generate_tsv")])
def test_cli_converts_with_the_ports_or_the_named_conventions(tmp_path, capsys, conventions,
                                                             selection):
    from ray_updown.cli import main

    source = _write_published(tmp_path, "py-bottom-up-attention", small_published("py-bottom-up-attention"))
    out = str(tmp_path / "converted")
    flags = ["--conventions", conventions] if conventions else []
    assert main(["convert-detector", "--published", source, "--out", out, *flags]) == 0
    config = load_detector(out).config
    assert config.region_selection == selection
    assert config.extra["conventions"] == (conventions or "py-bottom-up-attention")


def test_cli_refuses_unknown_conventions_in_one_line(tmp_path, capsys):
    from ray_updown.cli import main

    source = _write_published(tmp_path, "py-bottom-up-attention", small_published("py-bottom-up-attention"))
    assert main(["convert-detector", "--published", source, "--out", str(tmp_path / "c"),
                 "--conventions", "cafe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown conventions 'cafe'" in err, err
    assert not (tmp_path / "c").exists()
