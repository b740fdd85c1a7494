"""The ingest step: one FCS sample -> compensated, transformed, QC-flagged AnnData.

:func:`ingest_flow` is called by ``bcellmap ingest-flow`` and :func:`bcellmap.flow.ingest`.

The AnnData and the QC table follow docs/architecture.md ("The flow AnnData" and "The
per-sample QC table"). A panel in ``config["panels"]`` may carry its own ``compensation``,
``transform``, ``qc`` or ``required_markers`` sections, merged over ``config["ingest"]`` for
the samples that use it, e.g. for files that are already compensated and transformed::

    panels:
      preprocessed:
        channels: {}
        compensation: {source: none}
        transform: {method: none}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

_PANEL_OVERRIDES = ("compensation", "transform", "qc", "required_markers")


def _ingest_settings(config: Mapping[str, Any], panel: str) -> tuple[dict, dict]:
    """The panel's config and ``ingest`` settings with the panel's overrides merged in."""
    from ..config import merge

    panels = config.get("panels") or {}
    if panel not in panels:
        if panel != "default":
            raise ConfigError(f"panel {panel!r} is not defined in the config "
                              f"(defined: {', '.join(panels) or 'none'})")
        panel_config: dict[str, Any] = {}
    else:
        panel_config = dict(panels[panel] or {})
    overrides = {k: panel_config[k] for k in _PANEL_OVERRIDES if k in panel_config}
    return panel_config, merge(dict(config.get("ingest") or {}), overrides)


def source_record(fcs: Any, path: str | os.PathLike, *, mass_cytometry: bool) -> dict[str, Any]:
    """``uns["source"]`` of a flow sample: the file, its FCS header facts and read notes."""
    return {
        "path": str(Path(path).resolve()),
        "fcs_version": fcs.version,
        "$CYT": fcs.cytometer,
        "$DATE": fcs.date,
        "n_events": fcs.n_events,
        "timestep": fcs.timestep,
        "mass_cytometry": mass_cytometry,
        "offset_error_ignored": fcs.offset_error_ignored,
        "data_set": fcs.data_set,
        "n_data_sets": fcs.n_data_sets,
        "read_notes": list(fcs.notes),
    }


def ingest_flow(
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    sample_id: str,
    panel: str | None = None,
    sample_meta: Mapping[str, Any] | None = None,
):
    """Read, compensate, transform and QC one FCS file.

    Parameters
    ----------
    path
        The FCS file.
    config
        The merged bcellmap config (``bcellmap.config.load_config``).
    sample_id
        The sample's id, recorded in ``uns["sample"]`` and named in errors.
    panel
        Panel name in ``config["panels"]``; None or "" for ``default``.
    sample_meta
        Optional ``patient_id``, ``day`` (and other sheet columns) for ``uns["sample"]``.

    Returns
    -------
    anndata.AnnData
        One row per event, as docs/architecture.md specifies.

    Raises
    ------
    InputError
        Unreadable file, missing required marker, invalid spillover matrix, ...
    """
    import anndata as ad
    import pandas as pd

    from ..io.fcs import read_fcs, spillover_keyword_problem
    from ..io.panel import channel_kind, check_required, resolve_panel
    from ._qc import FLAG_COLUMNS, STEPS, qc_reason, run_qc
    from ._transform import is_mass_cytometry, transform_events
    from .compensation import compensate_events

    panel = panel or "default"
    panel_config, settings = _ingest_settings(config, panel)
    where = {"path": path, "sample_id": sample_id}

    fcs = read_fcs(path, sample_id=sample_id)
    canonicals = resolve_panel(fcs.channels, fcs.markers, explicit=panel_config.get("channels"),
                               **where)
    kinds = [channel_kind(c, ch) for c, ch in zip(canonicals, fcs.channels, strict=True)]
    check_required(canonicals, settings.get("required_markers") or [], channels=fcs.channels,
                   markers=fcs.markers, **where)
    mass_cytometry = is_mass_cytometry(fcs.cytometer, fcs.channels)

    compensation_settings = settings.get("compensation") or {}
    if str(compensation_settings.get("source", "auto")).lower() == "auto":
        problem = spillover_keyword_problem(fcs.text)
        if problem:
            raise InputError(f"{problem}; set ingest.compensation.source: none if the data are "
                             "already compensated, or give the instrument's matrix as "
                             "ingest.compensation.matrix_file (source: file)", **where)
    # NaN/inf events: flagged by QC step non_finite, and zeroed so that compensation and
    # the transforms see finite numbers and the AnnData holds no NaN/inf.
    non_finite = ~np.isfinite(fcs.events).all(axis=1)
    linear = fcs.events
    if non_finite.any():
        log.warning("%s: %d event(s) hold NaN or infinite values; flagged qc_non_finite and "
                    "removed by QC", path, int(non_finite.sum()))
        linear = np.where(np.isfinite(fcs.events), fcs.events, 0.0)

    compensated, compensation_info = compensate_events(
        linear, fcs.channels, kinds, settings=settings.get("compensation") or {},
        text=fcs.text, **where)
    X, methods, transform_parameters = transform_events(
        compensated, channels=fcs.channels, canonicals=canonicals, kinds=kinds,
        ranges=fcs.ranges, settings=settings.get("transform") or {},
        mass_cytometry=mass_cytometry, **where)
    transformed_bad = ~np.isfinite(X).all(axis=1)
    if transformed_bad.any():
        non_finite = non_finite | transformed_bad
        X = np.where(np.isfinite(X), X, 0).astype(X.dtype)
    flags, steps, learned = run_qc(
        X, linear, canonicals=canonicals, kinds=kinds, ranges=fcs.ranges,
        settings=settings.get("qc") or {}, seed=int(config.get("seed", 0)),
        mass_cytometry=mass_cytometry, saturation=fcs.saturation, non_finite=non_finite,
        compensated=[c in set(compensation_info["channels"]) for c in fcs.channels])

    obs = pd.DataFrame({"event_index": np.arange(fcs.n_events, dtype=np.int64)},
                       index=pd.Index([str(i) for i in range(fcs.n_events)]))
    for step in STEPS:
        obs[FLAG_COLUMNS[step]] = flags[FLAG_COLUMNS[step]]
    obs["qc_pass"] = ~np.logical_or.reduce([flags[FLAG_COLUMNS[s]] for s in STEPS])
    obs["qc_reason"] = qc_reason(flags)

    var = pd.DataFrame({
        "channel": fcs.channels,
        "marker": fcs.markers,
        "canonical": canonicals,
        "kind": kinds,
        "transform": methods,
        "range": fcs.ranges.astype(np.float64),
    }, index=pd.Index(fcs.channels))
    adata = ad.AnnData(X=X, obs=obs, var=var,
                       layers={"compensated": compensated.astype(np.float32)})
    if not adata.var_names.is_unique:
        log.warning("%s: duplicate channel names ($PnN); made unique", path)
        adata.var_names_make_unique()

    meta = dict(sample_meta or {})
    day = meta.get("day")
    adata.uns["sample"] = {
        "sample_id": sample_id,
        "patient_id": str(meta.get("patient_id", "") or ""),
        "day": None if day is None or day == "" else int(day),
        "modality": "flow",
        "panel": panel,
    }
    adata.uns["source"] = source_record(fcs, path, mass_cytometry=mass_cytometry)
    adata.uns["compensation"] = compensation_info
    # Column lists, not {channel: ...}: a $PnN may hold "/", which HDF5 keys cannot.
    adata.uns["transform"] = {
        "channel": list(fcs.channels),
        "method": methods,
        "parameters": [json.dumps(transform_parameters[c]) for c in fcs.channels],
    }
    adata.uns["qc"] = {"table": {column: [s[column] for s in steps] for column in steps[0]},
                       **learned}
    passed = int(adata.obs["qc_pass"].sum())
    log.info("%s: %d events, %d passed QC (%s)", sample_id, fcs.n_events, passed,
             ", ".join(f"{s['step']} -{s['events_removed']}" for s in steps))
    return adata


def qc_steps_table(adata: Any, *, sample_id: str) -> Any:
    """The per-sample QC table (``results/qc/{sample_id}.tsv``) of an ingested sample."""
    from ._qc import qc_table

    return qc_table(adata.uns["qc"]["table"], sample_id=sample_id)
