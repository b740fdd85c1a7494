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

    Raises
    ------
    ConfigError
        The file cannot be read, or it names keys bcellmap does not know (each listed with
        its dotted path and a "did you mean"); see :func:`unknown_keys`.
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
    check_config_keys(user, source=f"config file {path}")
    return merge(config, user)


#: Mappings whose keys the user names (markers, channels, panels): any key is accepted there.
#: ``*`` stands for any one key. Everything else must be a key of ``defaults.yaml``.
FREE_FORM = (
    "panels.*.channels",
    "ingest.transform.per_channel",
    "annotate.thresholds.fixed",
    "annotate.thresholds.fixed_hi",
    "annotate.gating.hi_method",
    "scrna.protein.thresholds",
    "scrna.annotate.markers",
    "scrna.annotate.subset_markers",
)


def _known_tree(defaults: dict[str, Any]) -> dict[str, Any]:
    """The known-key tree: defaults, with ``panels.*`` shaped as a panel may be.

    A panel carries ``channels`` and may override any ``ingest`` section for its samples
    (``compensation``, ``transform``, ``qc``, ``required_markers``; see ``bcellmap.flow.ingest``).
    """
    tree = copy.deepcopy(defaults)
    panel = {"channels": {}}
    panel.update(copy.deepcopy(defaults.get("ingest") or {}))
    tree["panels"] = {"*": panel}
    return tree


def _free(path: list[str]) -> bool:
    for pattern in FREE_FORM:
        parts = pattern.split(".")
        if len(parts) == len(path) and all(p in ("*", k) for p, k in zip(parts, path,
                                                                            strict=True)):
            return True
    return False


def unknown_keys(user: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """List the keys of ``user`` that bcellmap does not know, each with a "did you mean".

    Parameters
    ----------
    user
        A user config (before merging over the defaults).
    defaults
        The package defaults (default: :func:`default_config`).

    Returns
    -------
    One message per unknown key, naming its dotted path, e.g.
    ``devise: unknown key (did you mean 'device'?)``.
    """
    import difflib

    tree = _known_tree(default_config() if defaults is None else defaults)
    problems: list[str] = []

    def walk(given: Any, known: Any, path: list[str]) -> None:
        if not isinstance(given, dict) or not isinstance(known, dict) or _free(path):
            return
        wildcard = "*" in known
        for key, value in given.items():
            here = [*path, str(key)]
            if wildcard:
                walk(value, known["*"], here)
            elif key in known:
                walk(value, known[key], here)
            else:
                options = [str(k) for k in known if k != "*"]
                close = difflib.get_close_matches(str(key), options, n=1, cutoff=0.6)
                if not close:
                    lowered = {o.lower(): o for o in options}
                    close = [lowered[str(key).lower()]] if str(key).lower() in lowered else []
                hint = f" (did you mean {'.'.join([*path, close[0]])!r}?)" if close else (
                    f" (known keys{' under ' + '.'.join(path) if path else ''}: "
                    f"{', '.join(options)})")
                problems.append(f"{'.'.join(here)}: unknown key{hint}")

    walk(user, tree, [])
    return problems


def check_config_keys(user: dict[str, Any], *, source: object = "config") -> None:
    """Raise ConfigError listing every unknown key of ``user`` (with "did you mean")."""
    problems = unknown_keys(user)
    if problems:
        raise ConfigError(
            f"{source}: {len(problems)} unknown key(s), which would be ignored:\n  "
            + "\n  ".join(problems)
            + "\nEvery key is documented in config/README.md")
