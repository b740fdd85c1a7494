"""Configuration: package defaults merged with the user's YAML, checked, then frozen.

:func:`load_config` is the one way a step gets its settings: the package defaults
(``bcellmap/defaults.yaml``, the single home of every default) with the user's file merged
over them, unknown keys rejected (with a "did you mean"), the result validated against the
package's JSON schema (``bcellmap/schemas/config.schema.yaml``, which the workflow uses too),
and frozen, so that no module can change a setting or re-apply a default of its own.
:func:`section` hands a step the read-only part it reads.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with libyaml's C loader where PyYAML has it (ten times faster)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def _package_yaml(*parts: str) -> Any:
    """A YAML file shipped in the package, parsed once per process (callers copy it)."""
    return _load_yaml(resources.files("bcellmap").joinpath(*parts).read_text())


def default_config() -> dict[str, Any]:
    """Return a fresh copy of the package defaults (``bcellmap/defaults.yaml``)."""
    return copy.deepcopy(_package_yaml("defaults.yaml"))


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a plain copy of ``base``, recursing into mappings."""
    merged = thaw(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = thaw(value)
    return merged


def load_config(path: str | os.PathLike | None = None, *,
                overrides: Mapping[str, Any] | None = None, frozen: bool = False
                ) -> dict[str, Any]:
    """Load a YAML config and merge it over the package defaults, checked and validated.

    Parameters
    ----------
    path
        A YAML file, or None for the defaults alone.
    overrides
        Settings merged last (as a notebook user would pass them), checked like the file.
    frozen
        Return a read-only mapping (:func:`freeze`) instead of a plain dict.

    Returns
    -------
    dict
        Every key of ``defaults.yaml``, with the user's values.

    Raises
    ------
    ConfigError
        The file cannot be read; it names keys bcellmap does not know (each listed with its
        dotted path and a "did you mean"; see :func:`unknown_keys`); or a value has the wrong
        type or is out of range (every violation listed with its dotted path).
    """
    config = default_config()
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        import yaml

        path = Path(path)
        try:
            user = _load_yaml(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
        if not isinstance(user, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping of keys, got {type(user).__name__}"
            )
        layers.append((f"config file {path}", user))
    if overrides:
        layers.append(("config overrides", thaw(overrides)))
    for source, user in layers:
        check_config_keys(user, source=source)
        config = merge(config, user)
    validate_config(config, source=layers[-1][0] if layers else "package defaults")
    return freeze(config) if frozen else config


def _schema() -> dict[str, Any]:
    return _package_yaml("schemas", "config.schema.yaml")


def validate_config(config: Mapping[str, Any], *, source: object = "config") -> None:
    """Check a merged config against the package's JSON schema.

    Raises
    ------
    ConfigError
        Listing every violation with its dotted key path, e.g.
        ``cluster.som.xdim: 'ten' is not of type 'integer'``.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(thaw(config)), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
                 for e in errors]
        raise ConfigError(f"{source}: {len(errors)} invalid setting(s):\n  "
                          + "\n  ".join(lines) + "\nEvery key is documented in "
                          "config/README.md")


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become ``MappingProxyType``, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of a (possibly frozen) config."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return copy.deepcopy(value)


def section(config: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    """The read-only settings of one section, e.g. ``section(config, "annotate.gating")``.

    Raises
    ------
    ConfigError
        The config has no such section (it was not built by :func:`load_config`).
    """
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"config has no section {dotted!r} (load it with "
                              "bcellmap.config.load_config)")
        node = node[key]
    return freeze(node)


#: Mappings whose keys the user names (markers, channels, panels): any key is accepted there.
#: ``*`` stands for any one key. Everything else must be a key of ``defaults.yaml``.
FREE_FORM = (
    "panels.*.channels",
    "ingest.transform.per_channel",
    "annotate.thresholds.fixed",
    "annotate.thresholds.fixed_hi",
    "annotate.user_gates",
    "compare.mapping",
    "annotate.gating.hi_method",
    "annotate.gating.references",
    "scrna.protein.thresholds",
    "scrna.annotate.markers",
    "scrna.annotate.subset_markers",
)


def _known_tree(defaults: dict[str, Any]) -> dict[str, Any]:
    """The known-key tree: defaults, with ``panels.*`` shaped as a panel may be.

    A panel carries ``channels`` and may override any ``ingest`` section for its samples
    (``compensation``, ``transform``, ``qc``, ``required_markers``; see ``bcellmap.flow._ingest``).
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
