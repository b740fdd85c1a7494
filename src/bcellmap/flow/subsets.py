"""The B-cell subset rule table: the built-in one shipped with bcellmap, or the user's.

``annotate.subsets`` is ``null`` by default: the table shipped inside the package
(``bcellmap/subsets.yaml``; ``bcellmap subsets`` prints it). A user's own table is given as
a path, resolved against the working directory (where Snakemake runs); a path that does not
exist is a :class:`~bcellmap.errors.ConfigError` naming it. To change the rules, copy the
built-in table (``bcellmap subsets > my_subsets.yaml``), edit it, and set
``annotate.subsets: my_subsets.yaml``.

The table is an ordered list of ``{name, rule}`` entries; ``rule`` maps canonical markers to
levels (``contracts.LEVELS``). How the rules are applied: :mod:`bcellmap.flow.annotate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..contracts import LEVELS
from ..errors import ConfigError

#: The built-in table's file inside the package (shipped as package data).
BUILTIN_SUBSETS = "subsets.yaml"
#: How messages name the built-in table.
BUILTIN_LABEL = "built-in (bcellmap/subsets.yaml)"


@dataclass(frozen=True)
class SubsetRule:
    """One row of the subset rule table: a name and ``marker -> level``."""

    name: str
    levels: dict[str, str]


def builtin_subsets_text() -> str:
    """The text of the built-in subset rule table (``bcellmap/subsets.yaml``)."""
    return resources.files("bcellmap").joinpath(BUILTIN_SUBSETS).read_text()


def subsets_path(config: Mapping[str, Any]) -> Path | None:
    """The user's subset rule table named by ``annotate.subsets``; None: the built-in one.

    A relative path is resolved against the working directory.

    Raises
    ------
    ConfigError
        The named file does not exist (the message names the path as given and resolved).
    """
    value = (config.get("annotate") or {}).get("subsets")
    if value is None or not str(value).strip():
        return None
    given = Path(str(value)).expanduser()
    path = given if given.is_absolute() else Path.cwd() / given
    if not path.is_file():
        raise ConfigError(
            f"annotate.subsets: the subset rule table {given} does not exist (looked for "
            f"{path}); set annotate.subsets: null for the built-in table, or write a copy of "
            f"it there with `bcellmap subsets > {given}` and edit that")
    return path


def subsets_source(config: Mapping[str, Any]) -> tuple[str, str]:
    """``(label, text)`` of the subset rule table the config names (:func:`subsets_path`).

    ``label`` is the user's path, or :data:`BUILTIN_LABEL`.
    """
    path = subsets_path(config)
    if path is None:
        return BUILTIN_LABEL, builtin_subsets_text()
    try:
        return str(path), path.read_text()
    except OSError as exc:
        raise ConfigError(f"subset rule table {path}: cannot be read ({exc.strerror})") from None


def subset_rules_text(config: Mapping[str, Any]) -> str:
    """The text of the subset rule table in use (the workflow's rerun trigger)."""
    return subsets_source(config)[1]


def parse_subset_rules(text: str, *, source: str = BUILTIN_LABEL) -> list[SubsetRule]:
    """Parse and check a subset rule table's YAML ``text`` (``source`` names it in errors)."""
    import yaml

    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"subset rule table {source}: not valid YAML ({exc})") from None
    entries = content.get("subsets") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"subset rule table {source}: expected a non-empty 'subsets' list")
    rules = []
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(
                entry.get("rule"), dict):
            raise ConfigError(f"subset rule table {source}: each entry needs 'name' and 'rule'")
        levels = {str(k): str(v) for k, v in entry["rule"].items()}
        bad = {k: v for k, v in levels.items() if v not in LEVELS}
        if bad:
            raise ConfigError(f"subset rule table {source}: {entry['name']}: levels {bad} not "
                              f"in {', '.join(LEVELS)}")
        rules.append(SubsetRule(str(entry["name"]), levels))
    return rules


def load_subset_rules(config: Mapping[str, Any]) -> list[SubsetRule]:
    """Read and check the ordered B-cell subset rules the config names (``annotate.subsets``).

    Raises
    ------
    ConfigError
        The user's table is missing, unreadable or malformed.
    """
    source, text = subsets_source(config)
    return parse_subset_rules(text, source=source)
