"""Helpers shared by the public API (``bcellmap.flow``, ``bcellmap.tl``, ``bcellmap.cohort``,
``bcellmap.pl``): config resolution, sample metadata, the ``uns["bcellmap"]`` ledger.

This module sits in the bottom layer: it imports only ``bcellmap.config`` and
``bcellmap.errors`` (and ``__version__``), and nothing heavy at import time.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError

#: The ``uns`` key under which every API function records its settings and the version.
LEDGER = "bcellmap"

ConfigLike = Mapping[str, Any] | str | os.PathLike | None


def resolve_config(config: ConfigLike = None,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config an API call works with: the package defaults, ``config``, ``overrides``.

    Parameters
    ----------
    config
        None (the package defaults, ``bcellmap/defaults.yaml``), a YAML file (as
        ``bcellmap --config``), or a mapping of keys merged over the defaults (a full
        config from ``bcellmap.config.load_config`` works as well).
    overrides
        ``{dotted key: value}`` from an API call's keyword arguments (``None`` values are
        left out), merged last, e.g. ``{"cluster.som.rlen": 5}``.

    Returns
    -------
    dict
        A plain (mutable) config, checked for unknown keys and validated against the
        package's schema as ``load_config`` does.
    """
    from .config import load_config, merge, thaw

    nested: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = nested
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _plain(value)
    if config is None and not nested:
        return _defaults()
    if isinstance(config, (str, os.PathLike)):
        return thaw(load_config(config, overrides=nested or None))
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping or a YAML file, got {type(config).__name__}")
    user = merge(thaw(config) if config is not None else {}, nested)
    return thaw(load_config(None, overrides=user or None))


def _plain(value: Any) -> Any:
    """Tuples as lists and paths as strings, recursively (what YAML would have given)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


_DEFAULTS: dict[str, Any] | None = None


def _defaults() -> dict[str, Any]:
    """A fresh copy of the package defaults (loaded once per process: API calls are many)."""
    global _DEFAULTS
    from .config import load_config, thaw

    if _DEFAULTS is None:
        _DEFAULTS = thaw(load_config())
    return copy.deepcopy(_DEFAULTS)


def h5ad_safe(value: Any) -> Any:
    """``value`` as something ``AnnData.write_h5ad`` can store in ``uns``.

    Tuples become lists, paths strings, NumPy scalars Python scalars, mappings dicts with
    string keys; lists of mappings become mappings of lists (columns).
    """
    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and all(isinstance(item, Mapping) for item in items):
            keys = list(dict.fromkeys(k for item in items for k in item))
            return {str(k): h5ad_safe([item.get(k) for item in items]) for k in keys}
        return [h5ad_safe(item) for item in items]
    return value


def record(adata: Any, step: str, params: Mapping[str, Any]) -> None:
    """Record an API call in ``adata.uns["bcellmap"][step]``: the settings and the version."""
    ledger = adata.uns.get(LEDGER)
    ledger = dict(ledger) if isinstance(ledger, Mapping) else {}
    ledger[step] = {"version": __version__, "params": h5ad_safe(dict(params))}
    adata.uns[LEDGER] = ledger


def sample_info(adata: Any) -> dict[str, Any]:
    """``adata.uns["sample"]`` as a plain dict (empty when absent)."""
    sample = adata.uns.get("sample") if hasattr(adata, "uns") else None
    return dict(sample) if isinstance(sample, Mapping) else {}


def sample_id_of(adata: Any, default: str | None = None) -> str:
    """The sample id recorded in ``uns["sample"]``, else ``default``."""
    sample_id = sample_info(adata).get("sample_id")
    if sample_id:
        return str(sample_id)
    if default is None:
        raise ConfigError("the AnnData records no uns['sample']['sample_id']; pass the "
                          "samples as a mapping {sample_id: AnnData} or set sample_id")
    return str(default)


def as_mapping(adatas: Any, *, what: str = "adatas") -> dict[str, Any]:
    """``{sample_id: AnnData}`` from one AnnData, a sequence or a mapping of them.

    A mapping keeps its keys; AnnData objects in a sequence are named by
    ``uns["sample"]["sample_id"]``. Order is kept.
    """
    if isinstance(adatas, Mapping):
        items = {str(k): v for k, v in adatas.items()}
    elif hasattr(adatas, "obs") and hasattr(adatas, "uns"):
        items = {sample_id_of(adatas): adatas}
    elif isinstance(adatas, Iterable) and not isinstance(adatas, (str, bytes)):
        items = {}
        for adata in adatas:
            sample_id = sample_id_of(adata)
            if sample_id in items:
                raise ConfigError(f"{what}: two AnnData objects carry sample_id {sample_id!r}")
            items[sample_id] = adata
    else:
        raise ConfigError(f"{what}: expected an AnnData, a sequence or a mapping of them, got "
                          f"{type(adatas).__name__}")
    if not items:
        raise ConfigError(f"{what}: no samples given")
    return items


def qc_mask(adata: Any) -> Any:
    """Boolean mask of the events that passed QC (all events when ``obs`` has no ``qc_pass``)."""
    import numpy as np

    if "qc_pass" in adata.obs.columns:
        return adata.obs["qc_pass"].to_numpy().astype(bool)
    return np.ones(adata.n_obs, dtype=bool)
