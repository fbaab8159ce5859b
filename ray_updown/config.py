"""Typed dataclass configs: defaults in code, a YAML file on top, `key=value` overrides last.

    cfg = load_config(CaptionerTrainConfig, "train.yaml", ["optim.lr=0.02", "epochs=3"])

Nested dataclasses are addressed with dots. Values are parsed as YAML scalars and checked
against the field's type, so `epochs=three` is a ConfigError naming the key, not a crash later.

Every config class has one hook, `validate(self) -> None`, raising ConfigError with `record`
naming the field relative to the config itself; it starts with `validate_fields(self)`, which
checks the Literal-typed fields and validates the nested configs (their records put under the
field's name, so an error reads `model.hidden`). `load_config` and `from_dict` validate what
they build; code that builds a config itself calls `cfg.validate()` before using it. Defaults
are valid: an input left empty (a data file, an output URI) is reported, naming its key, by
the code that reads it, so any config can be loaded, shown and read back from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from ray_updown.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """`value` (from YAML or a `key=value` override) as the field type `tp`; ConfigError,
    naming `key` and `source`, when it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key, source)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", file=source, record=key)
        return _build(tp, value, source, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", file=source, record=key)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, source) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", file=source, record=key)
        return dict(value)
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, key, source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"expected one of {list(args)}, got {value!r}", file=source, record=key)
        return value
    return value


def _coerce_union(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """`value` as the first member of the union `tp` it fits (None when the union allows it)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key, source)
        except ConfigError as exc:
            errors.append(exc.problem)
    # X | None: X's own message ("expected one of [...]") says more than the union's
    problem = errors[0] if len(errors) == 1 else f"{value!r} does not fit {tp}"
    raise ConfigError(problem, file=source, record=key)


def _coerce_scalar(value: Any, tp: type, key: str, source: str | None) -> Any:
    """`value` as a bool, int, float or str; YAML's true/false words and numeric strings are
    accepted, a bool is never taken for a number."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"expected true or false, got {value!r}", file=source, record=key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"expected an integer, got {value!r}", file=source, record=key)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"expected an integer, got {value!r}", file=source, record=key) from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", file=source, record=key)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {value!r}", file=source, record=key) from None
    if value is None:  # `key:` or `key: null` in YAML: left empty, never the text "None"
        return ""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"expected a string, got {value!r}", file=source, record=key)
    return str(value)


def _replace_deprecated(cls: type, data: dict, source: str | None, prefix: str) -> None:
    """Keys a config no longer has but older configs hold (`cls.DEPRECATED`: key -> a function
    of its value giving the keys to write instead, {} when it does nothing): each one found is
    replaced, with one warning line saying what to write instead. A replacement that
    contradicts a value given beside it is a ConfigError."""
    deprecated = getattr(cls, "DEPRECATED", {})
    defaults = cls()
    for key in [k for k in data if k in deprecated]:
        value = data.pop(key)
        instead = deprecated[key](value)
        for name, new in instead.items():
            given = data.get(name, getattr(defaults, name))
            if given not in (new, getattr(defaults, name)):
                raise ConfigError(f"{key} = {json.dumps(value)} contradicts {name} = {given}",
                                  file=source, record=prefix + name)
            data[name] = new
        write = ", ".join(f"{prefix}{n}: {v}" for n, v in instead.items()) or "nothing (remove it)"
        log.warning(f"{prefix}{key}: {json.dumps(value)} is deprecated; write {write} instead")


def _build(cls: type[T], data: dict, source: str | None, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _replace_deprecated(cls, data, source, prefix)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; known: {sorted(names)}", file=source,
                          record=prefix.rstrip(".") or None)
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        validate_config(cfg, prefix.rstrip("."), source)
    return cfg


def validate_config(cfg: Any, prefix: str = "", source: str | None = None) -> None:
    """`cfg.validate()`, its error's record put under `prefix` (where `cfg` sits in the config
    it belongs to, e.g. "model") and naming `source` (the file it came from)."""
    try:
        cfg.validate()
    except ConfigError as exc:
        if not prefix and (exc.file or not source):
            raise
        record = ".".join(str(p) for p in (prefix, exc.record) if p is not None and p != "")
        raise ConfigError(exc.problem, file=exc.file or source, record=record or None) from None


def _has_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Literal or any(
        _has_literal(arg) for arg in typing.get_args(tp) if not isinstance(arg, (str, int)))


def validate_fields(cfg: Any) -> None:
    """What every config's validate() starts with: Literal-typed fields hold one of their
    values (configs built in code skip `_coerce`, so the annotation is checked here too), and
    each nested config validates, its records under the field's name."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
            validate_config(value, f.name)
        elif _has_literal(hints[f.name]):
            _coerce(value, hints[f.name], f.name, None)


def check_at_least(cfg: Any, minimum: float, *names: str) -> None:
    """ConfigError naming the first of the fields `names` that is below `minimum`."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ConfigError(f"must be >= {minimum}, got {getattr(cfg, name)}", record=name)


def check_training_run(cfg: Any) -> None:
    """What every training config needs of `name`, `epochs`, `batch_size` and `num_workers`:
    a run name that is one path segment, and at least one item per worker and step."""
    check_at_least(cfg, 1, "epochs", "batch_size", "num_workers")
    if cfg.batch_size < cfg.num_workers:
        raise ConfigError(f"batch_size {cfg.batch_size} is smaller than num_workers "
                          f"{cfg.num_workers}: every worker needs an item per step",
                          record="batch_size")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"run name must be a non-empty word without '/', got {cfg.name!r}",
                          record="name")


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{k} is not a section", record=dotted)
    node[keys[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def read_yaml_mapping(uri: str, not_a_mapping: str) -> dict:
    """The mapping a YAML (or JSON) file holds; ConfigError naming the file otherwise."""
    from ray_updown import storage

    try:
        loaded = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", file=uri) from None
    if not isinstance(loaded, dict):
        raise ConfigError(not_a_mapping, file=uri)
    return loaded


def load_config(cls: type[T], path: str | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `key=value` overrides; validated."""
    data: dict = to_dict(cls())
    if path:
        _merge(data, read_yaml_mapping(path, "expected a mapping at the top level"))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set(data, key.strip(), value)
    return _build(cls, data, path)


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type[T], data: dict, source: str | None = None) -> T:
    """Defaults of `cls` with `data` merged on top (nested), type-checked like `load_config`.

    For configs that travel as plain dicts (Ray Tune trial configs, checkpoint config.json).
    """
    merged: dict = to_dict(cls())
    _merge(merged, dict(data))
    return _build(cls, merged, source)


def changed_keys(before: Mapping[str, Any], now: Mapping[str, Any],
                 ignore: Iterable[str] = ()) -> list[str]:
    """The keys, sorted, whose values differ between two flat settings mappings (a key on one
    side only counts as changed); `ignore` names keys left out of the comparison."""
    skip = set(ignore)
    return sorted(k for k in set(before) | set(now)
                  if k not in skip and before.get(k) != now.get(k))
