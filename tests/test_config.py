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
