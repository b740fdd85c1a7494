"""The AnnData-first flow API: ``read_fcs``, ``compensate``, ``transform``, ``qc``, ``ingest``.

Each function calls the algorithm the workflow's ``ingest-flow`` step runs
(``bcellmap.io.fcs``, ``bcellmap.flow.compensation``, ``bcellmap.flow._transform``,
``bcellmap.flow._qc``, ``bcellmap.flow._ingest``), so ``read_fcs`` -> ``compensate`` ->
``transform`` -> ``qc`` gives the events, values and QC flags that ``ingest`` (and
``bcellmap ingest-flow``) gives. Settings default to the package defaults
(``bcellmap/defaults.yaml``); a ``config`` (mapping or YAML file) replaces them, and keyword
arguments override both. Every call records its settings and the bcellmap version in
``adata.uns["bcellmap"][function name]``.

Layers along the way (one row per event of the file, in file order):

- after ``read_fcs``: ``X`` holds the linearised events as read (float64, NaN kept);
- ``compensate``: ``layers["raw"]`` keeps them, ``X`` holds the compensated values (float64;
  NaN/inf values zeroed first, as ``ingest`` does), ``layers["compensated"]`` a float32 copy;
- ``transform``: ``X`` holds the transformed values (float32), as in the workflow's h5ad;
- ``qc``: ``obs`` QC flags, ``qc_pass`` and ``qc_reason``, the ledger in ``uns["qc"]["table"]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._apiutils import ConfigLike, h5ad_safe, record, resolve_config, sample_info
from ..errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

__all__ = ["read_fcs", "compensate", "transform", "qc", "ingest"]


# --------------------------------------------------------------------------- helpers


def _panel_settings(config: Mapping[str, Any], panel: str | None) -> tuple[dict, dict]:
    """The panel's config and its ``ingest`` settings (panel overrides merged in)."""
    from ._ingest import _ingest_settings

    return _ingest_settings(config, panel or "default")


def _where(adata: AnnData) -> dict[str, Any]:
    """``path`` and ``sample_id`` of an AnnData, for error messages."""
    source = adata.uns.get("source") or {}
    return {"path": source.get("path") if isinstance(source, Mapping) else None,
            "sample_id": sample_info(adata).get("sample_id")}


def _keywords(adata: AnnData) -> dict[str, str]:
    """The FCS TEXT keywords recorded by :func:`read_fcs` (empty when absent)."""
    fcs = adata.uns.get("fcs") or {}
    if not isinstance(fcs, Mapping) or "keyword" not in fcs:
        return {}
    return {str(k): str(v) for k, v in zip(fcs["keyword"], fcs["value"], strict=True)}


def _check_flow(adata: AnnData, step: str) -> None:
    missing = [c for c in ("channel", "canonical", "kind", "range") if c not in adata.var]
    if missing:
        raise InputError(f"{step}: var lacks {', '.join(missing)}; read the file with "
                         "bcellmap.flow.read_fcs", **_where(adata))
    if "transform" in adata.uns:
        raise InputError(f"{step}: X is already transformed (uns['transform']); start again "
                         "from bcellmap.flow.read_fcs", **_where(adata))


def _raw(adata: AnnData):
    """The linear events as read (``layers["raw"]``, set from ``X`` on first use)."""
    import numpy as np

    if "raw" not in adata.layers:
        adata.layers["raw"] = np.array(adata.X, dtype=np.float64, copy=True)
    return np.asarray(adata.layers["raw"], dtype=np.float64)


def _finite(values):
    import numpy as np

    finite = np.isfinite(values)
    return values if finite.all() else np.where(finite, values, 0.0)


# --------------------------------------------------------------------------- read_fcs


def read_fcs(
    path: str | os.PathLike,
    *,
    sample_id: str | None = None,
    panel: str | None = None,
    channels: Mapping[str, str] | None = None,
    config: ConfigLike = None,
) -> AnnData:
    """Read one FCS file (2.0, 3.0, 3.1) into an AnnData of linear events.

    Parameters
    ----------
    path
        The FCS file.
    sample_id
        The sample's id (default: the file name without ``.fcs``), named in errors and
        recorded in ``uns["sample"]``.
    panel
        A panel of ``config["panels"]`` whose ``channels`` map canonical markers to
        channels; None: ``default``.
    channels
        ``{canonical marker: $PnN}`` mapping, added to the panel's. Other channels are named
        from their ``$PnS``/``$PnN`` (``bcellmap.io.panel.resolve_panel``).
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    anndata.AnnData
        Events x channels. ``X``: float64 linearised values as the FCS standard says (not
        compensated; NaN kept). ``obs["event_index"]``: row in the file. ``var``: ``channel``
        ($PnN), ``marker`` ($PnS), ``canonical``, ``kind`` (scatter, time, fluorescence,
        viability), ``range`` ($PnR), ``saturation`` (linear value of raw ``$PnR - 1``).
        ``uns["source"]``: path, FCS version, ``$CYT``, ``$DATE``, events, ... (as the
        workflow records it); ``uns["fcs"]``: every TEXT keyword (``keyword``/``value``
        lists) and ``datatype``; ``uns["spillover"]``: the file's spillover matrix
        (``channels``, ``matrix``) or None; ``uns["sample"]``: sample_id, panel.

    Raises
    ------
    bcellmap.errors.InputError
        An unreadable file, or a panel naming a channel the file lacks.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from ..io.fcs import read_fcs as read_fcs_file
    from ..io.panel import channel_kind, resolve_panel
    from ._transform import is_mass_cytometry
    from .compensation import spillover_from_text

    cfg = resolve_config(config)
    panel_name = panel or "default"
    panel_config, _ = _panel_settings(cfg, panel_name)
    explicit = dict(panel_config.get("channels") or {})
    explicit.update(dict(channels or {}))
    sample_id = sample_id or Path(path).name.removesuffix(".fcs").removesuffix(".FCS")
    fcs = read_fcs_file(path, sample_id=sample_id)
    canonicals = resolve_panel(fcs.channels, fcs.markers, explicit=explicit, path=path,
                               sample_id=sample_id)
    kinds = [channel_kind(c, ch) for c, ch in zip(canonicals, fcs.channels, strict=True)]
    mass_cytometry = is_mass_cytometry(fcs.cytometer, fcs.channels)
    saturation = (fcs.ranges - 1.0) if fcs.saturation is None else fcs.saturation

    obs = pd.DataFrame({"event_index": np.arange(fcs.n_events, dtype=np.int64)},
                       index=pd.Index([str(i) for i in range(fcs.n_events)]))
    var = pd.DataFrame({
        "channel": fcs.channels,
        "marker": fcs.markers,
        "canonical": canonicals,
        "kind": kinds,
        "range": fcs.ranges.astype(np.float64),
        "saturation": np.asarray(saturation, dtype=np.float64),
    }, index=pd.Index(fcs.channels))
    adata = ad.AnnData(X=np.asarray(fcs.events, dtype=np.float64), obs=obs, var=var)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.uns["sample"] = {"sample_id": sample_id, "patient_id": "", "day": None,
                           "modality": "flow", "panel": panel_name}
    from ._ingest import source_record

    adata.uns["source"] = source_record(fcs, path, mass_cytometry=mass_cytometry)
    # Parallel lists, not {keyword: value}: keywords may hold "/", which HDF5 keys cannot.
    adata.uns["fcs"] = {"keyword": list(fcs.text), "value": [str(v) for v in fcs.text.values()],
                        "datatype": fcs.datatype}
    try:
        parsed = spillover_from_text(fcs.text, path=path, sample_id=sample_id)
    except InputError as exc:
        parsed, adata.uns["fcs"]["spillover_problem"] = None, exc.problem
    adata.uns["spillover"] = None if parsed is None else {
        "channels": list(parsed[1]), "matrix": np.asarray(parsed[0], dtype=np.float64)}
    record(adata, "read_fcs", {"path": str(path), "sample_id": sample_id, "panel": panel_name,
                               "channels": explicit})
    return adata


# --------------------------------------------------------------------------- compensate


def _spillover_text(spillover: pd.DataFrame) -> dict[str, str]:
    """A given spillover matrix as the ``$SPILLOVER`` keyword the compensation step reads."""
    import numpy as np

    names = [str(c).strip() for c in spillover.columns]
    matrix = np.asarray(spillover.to_numpy(), dtype=np.float64)
    if matrix.shape != (len(names), len(names)):
        raise InputError(f"spillover matrix is {matrix.shape[0]} x {matrix.shape[1]}: it must be "
                         "square, one column per detector ($PnN)")
    if any("," in name for name in names):
        raise InputError("spillover matrix: detector names must not contain commas")
    values = [repr(float(v)) for v in matrix.ravel()]
    return {"spillover": ",".join([str(len(names)), *names, *values])}


def compensate(
    adata: AnnData,
    *,
    spillover: pd.DataFrame | str | os.PathLike | None = None,
    source: Literal["auto", "file", "none"] | None = None,
    allow_invalid: bool | None = None,
    config: ConfigLike = None,
    copy: bool = False,
) -> AnnData | None:
    """Compensate the linear events for spillover (scatter and time are left alone).

    Parameters
    ----------
    adata
        An AnnData from :func:`read_fcs` (not yet transformed).
    spillover
        The spillover matrix to use instead of the file's: a DataFrame (rows: emitting
        dye, columns: detector ``$PnN``, diagonal 1), or a CSV/TSV file of one
        (``ingest.compensation.matrix_file``). None: as ``source`` says.
    source
        ``auto`` (the file's ``$SPILLOVER``/``SPILL`` keyword), ``file``
        (``ingest.compensation.matrix_file`` of the config) or ``none``. Default:
        ``ingest.compensation.source`` (``auto``), or the sample's panel's.
    allow_invalid
        Use a matrix that fails the sanity checks (not advised). Default: config.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    copy
        Return a compensated copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``X`` holds the compensated values
        (float64), ``layers["compensated"]`` a float32 copy (the workflow's layer),
        ``layers["raw"]`` the values as read; ``uns["compensation"]``: source, channels,
        matrix (as the workflow records it).

    Raises
    ------
    bcellmap.errors.InputError
        A spillover matrix that cannot be right (see ``bcellmap.flow.compensation``), or a
        keyword that is no matrix.
    """
    import numpy as np
    import pandas as pd

    from ..io.fcs import spillover_keyword_problem
    from .compensation import compensate_events

    adata = adata.copy() if copy else adata
    _check_flow(adata, "compensate")
    cfg = resolve_config(config)
    _, settings = _panel_settings(cfg, sample_info(adata).get("panel"))
    settings = dict(settings.get("compensation") or {})
    if source is not None:
        settings["source"] = source
    if allow_invalid is not None:
        settings["allow_invalid"] = bool(allow_invalid)
    text = _keywords(adata)
    given = isinstance(spillover, pd.DataFrame)
    if given:
        text = _spillover_text(spillover)
        settings["source"] = "auto"
    elif spillover is not None:
        settings.update(source="file", matrix_file=str(spillover))
    elif str(settings.get("source", "auto")).lower() == "auto":
        problem = spillover_keyword_problem(text)
        if problem:
            raise InputError(f"{problem}; set ingest.compensation.source: none if the data are "
                             "already compensated, or give the instrument's matrix as "
                             "ingest.compensation.matrix_file (source: file)", **_where(adata))
    linear = _finite(_raw(adata))
    compensated, info = compensate_events(
        linear, list(adata.var["channel"].astype(str)), list(adata.var["kind"].astype(str)),
        settings=settings, text=text, **_where(adata))
    if given and info.get("matrix") is not None:
        info["source"] = "given"
    adata.X = np.asarray(compensated, dtype=np.float64)
    adata.layers["compensated"] = adata.X.astype(np.float32)
    adata.uns["compensation"] = info
    record(adata, "compensate", {"source": settings.get("source"),
                                 "matrix_file": settings.get("matrix_file"),
                                 "allow_invalid": settings.get("allow_invalid", False),
                                 "spillover_given": given})
    return adata if copy else None


# --------------------------------------------------------------------------- transform


def transform(
    adata: AnnData,
    *,
    method: Literal["arcsinh", "logicle", "none"] | None = None,
    cofactor: float | None = None,
    logicle: Mapping[str, float] | None = None,
    per_channel: Mapping[str, Mapping[str, Any]] | None = None,
    config: ConfigLike = None,
    copy: bool = False,
) -> AnnData | None:
    """Transform the compensated values channel by channel, as the workflow does.

    Fluorescence and viability: ``arcsinh(x / cofactor)`` (cofactor 150 for fluorescence
    flow, 5 for mass cytometry), ``logicle`` or ``none``; scatter: linear, ``$PnR`` mapped to
    0-10; time: kept (``bcellmap.flow._transform``).

    Parameters
    ----------
    adata
        An AnnData from :func:`read_fcs` or :func:`compensate` (without :func:`compensate`,
        the values are taken as already compensated, as ``source: none`` does).
    method
        Fluorescence transform. Default: ``ingest.transform.method`` (``arcsinh``).
    cofactor
        Arcsinh cofactor. Default: config (None: 150 fluorescence, 5 mass cytometry).
    logicle
        Logicle parameters ``{T, W, M, A}`` (T None: ``$PnR``), merged over the config's.
    per_channel
        ``{channel or canonical marker: {method, cofactor, ...}}`` overrides, merged over
        the config's.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    copy
        Return a transformed copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``X``: float32 transformed values (a
        value the transform cannot represent is set to 0 and removed by :func:`qc`);
        ``var["transform"]``: method per channel; ``uns["transform"]``: channel, method and
        parameters per channel (as the workflow records them).

    Raises
    ------
    bcellmap.errors.InputError
        Invalid transform parameters, or values already transformed.
    """
    import json

    import numpy as np

    from ._transform import transform_events

    adata = adata.copy() if copy else adata
    _check_flow(adata, "transform")
    cfg = resolve_config(config)
    _, settings = _panel_settings(cfg, sample_info(adata).get("panel"))
    settings = dict(settings.get("transform") or {})
    if method is not None:
        settings["method"] = method
    if cofactor is not None:
        settings["cofactor"] = float(cofactor)
    if logicle is not None:
        settings["logicle"] = {**dict(settings.get("logicle") or {}), **dict(logicle)}
    if per_channel is not None:
        settings["per_channel"] = {**dict(settings.get("per_channel") or {}),
                                   **{k: dict(v) for k, v in per_channel.items()}}
    if "compensated" not in adata.layers:
        linear = _finite(_raw(adata))
        adata.X = linear
        adata.layers["compensated"] = linear.astype(np.float32)
        adata.uns["compensation"] = {"source": "none", "channels": [], "matrix": None}
    channels = list(adata.var["channel"].astype(str))
    source = adata.uns.get("source") or {}
    X, methods, parameters = transform_events(
        np.asarray(adata.X, dtype=np.float64), channels=channels,
        canonicals=list(adata.var["canonical"].astype(str)),
        kinds=list(adata.var["kind"].astype(str)),
        ranges=adata.var["range"].to_numpy(dtype=np.float64), settings=settings,
        mass_cytometry=bool(source.get("mass_cytometry", False)), **_where(adata))
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        X = np.where(np.isfinite(X), X, 0).astype(X.dtype)
    adata.X = X
    adata.var["transform"] = methods
    adata.uns["transform"] = {
        "channel": channels,
        "method": methods,
        "parameters": [json.dumps(parameters[c]) for c in channels],
        "non_finite_events": np.flatnonzero(bad).astype(np.int64),
    }
    record(adata, "transform", {"settings": h5ad_safe(settings)})
    return adata if copy else None


# --------------------------------------------------------------------------- qc


def qc(
    adata: AnnData,
    *,
    settings: Mapping[str, Any] | None = None,
    seed: int | None = None,
    config: ConfigLike = None,
    copy: bool = False,
) -> AnnData | None:
    """Flag events that fail quality control, as the workflow's ingest step does.

    Steps, in order (``bcellmap.flow._qc``): ``non_finite``, ``margin`` (saturation,
    impossible scatter), ``doublets`` (FSC-A/FSC-H), ``dead`` (viability), ``debris``
    (learned lymphocyte scatter gate), ``time_anomaly``. Each step learns on the events that
    passed the steps before it and flags every event.

    Parameters
    ----------
    adata
        An AnnData from :func:`transform` (it needs ``layers["raw"]`` and transformed ``X``).
    settings
        Overrides of ``ingest.qc`` (e.g. ``{"dead": {"threshold": 2.0}}`` or
        ``{"time_anomaly": {"enabled": False}}``), merged over the config's and the panel's.
    seed
        Seed of the scatter-gate mixture fit. Default: the config's ``seed``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obs``: one bool column per step
        (``qc_non_finite``, ``qc_margin``, ``qc_doublet``, ``qc_dead``, ``qc_debris``,
        ``qc_time_anomaly``), ``qc_pass`` and ``qc_reason`` (first failing step, or
        ``pass``); ``uns["qc"]``: the ledger ``table`` (step, events_in, events_removed,
        events_out, detail) and, per step, its settings and learned gates.

    Raises
    ------
    bcellmap.errors.InputError
        ``X`` is not transformed yet, or ``layers["raw"]`` is missing.
    """
    import numpy as np

    from ..config import merge
    from ._qc import FLAG_COLUMNS, STEPS, qc_reason, run_qc

    adata = adata.copy() if copy else adata
    if "transform" not in adata.uns or "raw" not in adata.layers:
        raise InputError("qc needs transformed values and layers['raw']: run "
                         "bcellmap.flow.read_fcs, compensate and transform first",
                         **_where(adata))
    cfg = resolve_config(config)
    _, ingest_settings = _panel_settings(cfg, sample_info(adata).get("panel"))
    qc_settings = merge(dict(ingest_settings.get("qc") or {}), dict(settings or {}))
    seed = int(cfg.get("seed", 0)) if seed is None else int(seed)
    raw = np.asarray(adata.layers["raw"], dtype=np.float64)
    non_finite = ~np.isfinite(raw).all(axis=1)
    bad = np.asarray((adata.uns["transform"] or {}).get("non_finite_events", []), dtype=np.int64)
    non_finite[bad] = True
    compensation = adata.uns.get("compensation") or {}
    compensated_channels = set(compensation.get("channels") or [])
    channels = list(adata.var["channel"].astype(str))
    source = adata.uns.get("source") or {}
    saturation = (adata.var["saturation"].to_numpy(dtype=np.float64)
                  if "saturation" in adata.var else None)
    flags, steps, learned = run_qc(
        np.asarray(adata.X), _finite(raw), canonicals=list(adata.var["canonical"].astype(str)),
        kinds=list(adata.var["kind"].astype(str)),
        ranges=adata.var["range"].to_numpy(dtype=np.float64), settings=qc_settings, seed=seed,
        mass_cytometry=bool(source.get("mass_cytometry", False)), saturation=saturation,
        non_finite=non_finite, compensated=[c in compensated_channels for c in channels])
    for step in STEPS:
        adata.obs[FLAG_COLUMNS[step]] = flags[FLAG_COLUMNS[step]]
    adata.obs["qc_pass"] = ~np.logical_or.reduce([flags[FLAG_COLUMNS[s]] for s in STEPS])
    adata.obs["qc_reason"] = qc_reason(flags)
    adata.uns["qc"] = {"table": {column: [s[column] for s in steps] for column in steps[0]},
                       **learned}
    record(adata, "qc", {"settings": qc_settings, "seed": seed})
    return adata if copy else None


# --------------------------------------------------------------------------- ingest


def ingest(
    path: str | os.PathLike,
    *,
    sample_id: str | None = None,
    patient_id: str | None = None,
    day: int | None = None,
    panel: str | None = None,
    batch: str | None = None,
    lymphocytes_per_ul: float | None = None,
    config: ConfigLike = None,
) -> AnnData:
    """Read, compensate, transform and QC one FCS file: the workflow's ``ingest-flow`` step.

    Parameters
    ----------
    path
        The FCS file.
    sample_id
        The sample's id (default: the file name without ``.fcs``).
    patient_id, day
        Recorded in ``uns["sample"]`` (used by :func:`bcellmap.tl.gate` for the baseline
        method and by :func:`bcellmap.cohort.quantify` without a sample sheet).
    panel
        A panel of ``config["panels"]`` (channels and any ``compensation``, ``transform``,
        ``qc``, ``required_markers`` overrides); None: ``default``.
    batch, lymphocytes_per_ul
        Optional sample-sheet values, recorded in ``uns["sample"]``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    anndata.AnnData
        One row per event, exactly as ``bcellmap ingest-flow`` writes
        ``results/flow/{sample_id}.h5ad`` (see docs/architecture.md): transformed ``X``,
        ``layers["compensated"]``, QC flags in ``obs``, ``uns`` sample, source,
        compensation, transform and qc.

    Raises
    ------
    bcellmap.errors.InputError
        Unreadable file, missing required marker, invalid spillover matrix, ...
    """
    from ._ingest import ingest_flow

    cfg = resolve_config(config)
    sample_id = sample_id or Path(path).name.removesuffix(".fcs").removesuffix(".FCS")
    meta: dict[str, Any] = {}
    if patient_id is not None:
        meta["patient_id"] = str(patient_id)
    if day is not None:
        meta["day"] = int(day)
    adata = ingest_flow(path, config=cfg, sample_id=sample_id, panel=panel or None,
                        sample_meta=meta)
    sample = dict(adata.uns["sample"])
    if batch is not None:
        sample["batch"] = str(batch)
    if lymphocytes_per_ul is not None:
        sample["lymphocytes_per_ul"] = float(lymphocytes_per_ul)
    adata.uns["sample"] = sample
    record(adata, "ingest", {"path": str(path), "sample_id": sample_id, "panel": panel,
                             "patient_id": patient_id, "day": day})
    return adata
