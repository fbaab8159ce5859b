"""Typed configs: defaults, YAML, overrides, and clear errors for bad values."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ray_updown.config import dump_config, load_config
from ray_updown.errors import ConfigError


@dataclass
class Optim:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float | None = 0.9


@dataclass
class TrainConfig:
    epochs: int = 2
    resume: bool = True
    optim: Optim = field(default_factory=Optim)
    splits: list[str] = field(default_factory=lambda: ["train"])


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\noptim:\n  lr: 0.5\n")
    cfg = load_config(TrainConfig, str(path), ["optim.name=adam", "splits=train,restval",
                                               "resume=false", "optim.momentum=null"])
    assert cfg == TrainConfig(epochs=5, resume=False, splits=["train", "restval"],
                              optim=Optim(name="adam", lr=0.5, momentum=None))
    assert load_config(TrainConfig, None, []) == TrainConfig()
    assert "epochs: 2" in dump_config(TrainConfig())


def test_an_empty_or_null_string_is_empty_never_the_text_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name:\n")
    assert load_config(TrainConfig, str(path)).optim.name == ""
    assert load_config(TrainConfig, None, ["optim.name=null"]).optim.name == ""


@pytest.mark.parametrize("override,needle", [
    ("epochs=three", "epochs"), ("optim.lr=fast", "optim.lr"), ("bogus=1", "bogus"),
    ("optim.nope=1", "nope"), ("no-equals-sign", "key=value"), ("resume=maybe", "resume"),
])
def test_bad_overrides_are_config_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert needle in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, str(path))
    assert "bad.yaml" in str(err.value)


# -- the package's configs: one hook, validate(), run by load_config / from_dict -------------

import ast  # noqa: E402
import dataclasses  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from ray_updown.captioning.config import CaptionTrainConfig  # noqa: E402
from ray_updown.captioning.data import CaptionDataConfig  # noqa: E402
from ray_updown.config import from_dict  # noqa: E402
from ray_updown.data.world import WorldConfig  # noqa: E402
from ray_updown.demo.run import DemoConfig  # noqa: E402
from ray_updown.detector.train.config import DetectorTrainConfig  # noqa: E402
from ray_updown.extraction.pipeline import ExtractConfig  # noqa: E402
from ray_updown.vqa.config import VqaTrainConfig  # noqa: E402

CONFIGS = [CaptionTrainConfig, VqaTrainConfig, DetectorTrainConfig, ExtractConfig, WorldConfig,
           DemoConfig]
BAD = "__bogus__"


def _has_literal(tp) -> bool:
    return typing.get_origin(tp) is typing.Literal or any(
        _has_literal(a) for a in typing.get_args(tp) if not isinstance(a, (str, int)))


def literal_keys(cls, prefix: str = "") -> list[str]:
    """Dotted keys of every Literal-typed field of `cls` and of its nested configs."""
    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += literal_keys(tp, f"{prefix}{f.name}.")
        elif _has_literal(tp):
            keys.append(prefix + f.name)
    return keys


def nested(overrides: list[str]) -> dict:
    """["a.b=1"] -> {"a": {"b": 1}}, values parsed as YAML like load_config does."""
    out: dict = {}
    for item in overrides:
        key, raw = item.split("=", 1)
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(raw) if raw != "" else ""
    return out


LITERAL_CASES = [(cls, key) for cls in CONFIGS for key in literal_keys(cls)]


@pytest.mark.parametrize("cls", CONFIGS, ids=[c.__name__ for c in CONFIGS])
def test_defaults_are_valid(cls):
    # Inputs left empty (data files, output URIs) are reported by the code that reads them,
    # so every config loads, shows (--show-config) and reads back from a checkpoint as is.
    load_config(cls).validate()


def test_literal_fields_are_found():
    found = {f"{cls.__name__}.{key}" for cls, key in LITERAL_CASES}
    assert {"CaptionTrainConfig.objective", "CaptionTrainConfig.optim.optimizer",
            "CaptionTrainConfig.scst.baseline", "CaptionTrainConfig.data.train_splits",
            "VqaTrainConfig.optimizer", "VqaTrainConfig.model.preset",
            "VqaTrainConfig.model.nonlinearity", "VqaTrainConfig.data.train_on",
            "DetectorTrainConfig.optim.schedule", "DetectorTrainConfig.data.test_split",
            "DetectorTrainConfig.model.pooler", "ExtractConfig.model",
            "DemoConfig.vqa_optimizer"} <= found


@pytest.mark.parametrize("cls,key", LITERAL_CASES,
                         ids=[f"{c.__name__}.{k}" for c, k in LITERAL_CASES])
def test_a_bad_choice_is_refused_naming_its_key(cls, key):
    with pytest.raises(ConfigError, match="expected one of") as err:
        load_config(cls, None, [f"{key}={BAD}"])
    assert err.value.record == key
    # Built in code the value skips load_config's type check; validate() still names it.
    cfg = cls()
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = getattr(node, p)
    setattr(node, last, [BAD] if isinstance(getattr(node, last), list) else BAD)
    with pytest.raises(ConfigError, match="expected one of") as err:
        cfg.validate()
    assert err.value.record == key


NESTED_CASES = [
    (CaptionTrainConfig, "data.max_len=0", "data.max_len"),
    (CaptionTrainConfig, "model.hidden_dim=0", "model.hidden_dim"),
    (CaptionTrainConfig, "scst.num_candidates=1", "scst.num_candidates"),
    (CaptionTrainConfig, "batch_size=0", "batch_size"),
    (VqaTrainConfig, "data.max_boxes=0", "data.max_boxes"),
    (VqaTrainConfig, "model.dropout=1.5", "model.dropout"),
    (VqaTrainConfig, "data.train_on=val", "data.train_on"),
    (VqaTrainConfig, "warmup_epochs=-1", "warmup_epochs"),
    (DetectorTrainConfig, "optim.lr=0", "optim.lr"),
    (DetectorTrainConfig, "model.min_boxes=0", "model.min_boxes"),
    (DetectorTrainConfig, "data.load_threads=0", "data.load_threads"),
    (ExtractConfig, "grid_size=0", "grid_size"),
    (ExtractConfig, "half=true", "half"),
    (WorldConfig, "jpeg_quality=0", "jpeg_quality"),
    (DemoConfig, "scale=0", "scale"),
    (DemoConfig, "vqa_l2_normalize=maybe", "vqa_l2_normalize"),
    (DemoConfig, "vqa_warmup_epochs=-1", "vqa_warmup_epochs"),
    (DemoConfig, "vqa_classifier_dropout=1", "vqa_classifier_dropout"),
    (DemoConfig, "vqa_seeds=0", "vqa_seeds"),
    (DemoConfig, "vqa_seeds=4", "vqa_seeds"),  # more than the ensemble's 3 members
]


@pytest.mark.parametrize("cls,override,key", NESTED_CASES,
                         ids=[f"{c.__name__}.{k}" for c, _, k in NESTED_CASES])
def test_configs_validate_on_load_with_dotted_records(tmp_path, cls, override, key):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(nested([override])))
    with pytest.raises(ConfigError) as err:
        load_config(cls, str(path))
    assert (err.value.file, err.value.record) == (str(path), key)
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [override])
    assert err.value.record == key
    with pytest.raises(ConfigError) as err:  # Tune trials, checkpoints' config.json
        from_dict(cls, nested([override]), "config.json")
    assert (err.value.file, err.value.record) == ("config.json", key)


def test_nested_configs_built_in_code_are_validated_by_their_parent():
    with pytest.raises(ConfigError) as err:
        CaptionTrainConfig(data=CaptionDataConfig(max_len=0)).validate()
    assert err.value.record == "data.max_len"
    cfg = load_config(DetectorTrainConfig)
    cfg.model.depth = 19
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.record == "model.depth"


def test_model_sections_keep_their_keys():
    vqa = load_config(VqaTrainConfig, None, ["model.preset=reimplementation",
                                             "model.hidden=256"]).model.base()
    assert (vqa.hidden, vqa.nonlinearity, vqa.weight_norm) == (256, "relu", True)
    assert vqa.packed_questions  # the GRU's packed input stays the default until a GPU judges it
    assert not load_config(VqaTrainConfig, None,
                           ["model.packed_questions=false"]).model.base().packed_questions
    caption = load_config(CaptionTrainConfig, None, ["model.hidden_dim=64"])
    assert caption.model.hidden_dim == 64
    detector = load_config(DetectorTrainConfig, None, ["model.depth=18", "model.pooler=roipool"])
    assert (detector.model.depth, detector.model.pooler) == (18, "roipool")


# Dataclasses whose __post_init__ normalises parsed data (DataError), not configs.
DATA_RECORDS = {"Vocab", "AnswerVocab", "FeatureRecord"}


def _is_dataclass_def(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def test_no_config_validates_in_post_init_or_check():
    root = Path(__file__).resolve().parents[1] / "ray_updown"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ClassDef) and _is_dataclass_def(node)):
                continue
            methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
            where = f"{path.relative_to(root.parent)}:{node.name}"
            if "check" in methods:
                offenders.append(f"{where} defines check()")
            post = methods.get("__post_init__")
            if post is not None and (node.name not in DATA_RECORDS
                                     or "ConfigError" in ast.unparse(post)):
                offenders.append(f"{where} defines __post_init__")
            if node.name.endswith(("Config", "Options")) and "validate" not in methods:
                offenders.append(f"{where} has no validate()")
    assert not offenders, "configs validate in validate() only:\n" + "\n".join(offenders)


def test_config_and_search_space_files_must_hold_a_mapping(tmp_path):
    from ray_updown.errors import ConfigError
    from ray_updown.vqa.config import VqaTrainConfig
    from ray_updown.vqa.sweep import load_search_space

    bad_list, bad_yaml = tmp_path / "list.yaml", tmp_path / "broken.yaml"
    bad_list.write_text("- 1\n")
    bad_yaml.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="list.yaml: a search space is a mapping"):
        load_search_space(str(bad_list))
    with pytest.raises(ConfigError, match="broken.yaml: malformed YAML"):
        load_search_space(str(bad_yaml))
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping at the top level"):
        load_config(VqaTrainConfig, str(bad_list))
    good = tmp_path / "space.yaml"
    good.write_text("lr: {loguniform: [0.001, 0.1]}\n")
    assert load_search_space(str(good)) == {"lr": {"loguniform": [0.001, 0.1]}}
