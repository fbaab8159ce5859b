"""The decode and model settings a saved extraction plan keeps (loose files and containers
alike), and the one refusal of a re-run whose settings differ from them.

A plan's Parquet metadata holds the settings as JSON under PLAN_SETTINGS_KEY. A re-run with
other settings would mix two kinds of features in one store, so it is refused in one line,
or with `redo_changed` every shard is redone with the new settings.
"""

from __future__ import annotations

import json

from ray_updown.config import changed_keys
from ray_updown.errors import ConfigError
from ray_updown.features.schema import PLAN_SETTINGS_KEY


def _changed_settings(metadata: dict | None, settings: dict | None) -> list[str]:
    """'key: old -> new' for each setting that differs from those a saved plan's metadata
    holds (none when either side has none: plans written before settings were kept)."""
    saved = (metadata or {}).get(PLAN_SETTINGS_KEY)
    if not saved or settings is None:
        return []
    old = json.loads(saved)
    return [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed_keys(old, settings)]


def check_settings(metadata: dict | None, settings: dict | None, redo_changed: bool,
                   file: str | None = None) -> list[str]:
    """`_changed_settings`, refused in one line unless `redo_changed` (then every shard is
    redone with the new settings)."""
    changes = _changed_settings(metadata, settings)
    if changes and not redo_changed:
        raise ConfigError(f"the decode or model settings differ from this store's plan "
                          f"({'; '.join(changes)}): write to a new --out, or re-run with "
                          "redo_changed=true to redo every shard with the new settings", file=file)
    return changes


def settings_metadata(settings: dict | None) -> dict[bytes, bytes]:
    """The Parquet metadata that keeps a plan's settings (none when there are none)."""
    return {PLAN_SETTINGS_KEY: json.dumps(settings, sort_keys=True).encode()} if settings else {}
