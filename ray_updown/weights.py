"""Strict weight loading, shared by every task: converters, checkpoints and resumed runs.

A state dict that does not fit the model is refused with every difference listed at once
(missing, unexpected and mis-shaped tensors), never half-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ray_updown.errors import CheckpointError

_SHOWN = 12  # names listed per kind before "…"; the counts are always complete


def _ignored(name: str) -> bool:
    # BatchNorm's step counter carries no weights, and frozen-BN ports never save it.
    return name.endswith("num_batches_tracked")


@dataclass
class StateDictReport:
    """How a state dict differs from a model's: names, and (name, given, expected) shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        def listed(items: list[str]) -> str:
            return ", ".join(items[:_SHOWN]) + (" …" if len(items) > _SHOWN else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {listed(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {listed(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} mis-shaped: " + listed(
                [f"{n} {list(got)} (model expects {list(want)})" for n, got, want in self.mismatched]))
        return "; ".join(parts) or "state dict matches"


def state_dict_report(model: nn.Module, state: Mapping[str, Tensor]) -> StateDictReport:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _ignored(k)}
    given = {k: tuple(v.shape) for k, v in state.items() if not _ignored(k)}
    return StateDictReport(
        missing=sorted(set(expected) - set(given)),
        unexpected=sorted(set(given) - set(expected)),
        mismatched=sorted((k, given[k], expected[k]) for k in set(given) & set(expected)
                          if given[k] != expected[k]),
    )


def raise_for_report(report: StateDictReport, source: str | None) -> None:
    """CheckpointError naming `source` and every difference, unless the report is clean."""
    if report.ok:
        return
    error = CheckpointError("state dict does not match the model: " + report.describe(),
                            file=source)
    error.report = report  # type: ignore[attr-defined]  # converters show it in full
    raise error


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], source: str | None) -> None:
    """Copy `state` into `model` after checking names and shapes; CheckpointError otherwise.

    Values are cast to the model's dtypes (published weights are often float16 or float64).
    """
    raise_for_report(state_dict_report(model, state), source)
    own = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name in own:
                own[name].copy_(value.to(own[name].dtype))
