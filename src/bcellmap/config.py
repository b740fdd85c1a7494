"""Configuration: package defaults merged with the user's YAML."""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError


def default_config() -> dict[str, Any]:
    """Return a fresh copy of the package defaults (``bcellmap/defaults.yaml``)."""
    import yaml

    text = resources.files("bcellmap").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``, recursing into mappings."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load a YAML config and merge it over the package defaults.

    Parameters
    ----------
    path
        A YAML file, or None for the defaults alone.
    """
    config = default_config()
    if path is None:
        return config
    import yaml

    path = Path(path)
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
    if not isinstance(user, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of keys, got {type(user).__name__}"
        )
    return merge(config, user)
