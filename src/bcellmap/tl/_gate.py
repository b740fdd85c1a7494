"""``gate`` and ``annotate``: the workflow's ``thresholds`` and ``annotate`` steps on AnnData
objects in memory (``bcellmap.flow.thresholds.learn_cohort_gates``,
``bcellmap.flow.annotate.annotate_with_gates``: the functions the commands call)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._apiutils import (
    ConfigLike,
    as_mapping,
    h5ad_safe,
    qc_mask,
    record,
    resolve_config,
    sample_info,
)
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

#: obs columns ``annotate`` writes (events that failed QC get "" or False).
ANNOTATION_COLUMNS = ("cell_type", "lymphocyte", "b_subset", "cd19_pos", "cd20_pos",
                      "metacluster_cell_type")
_TEXT_COLUMNS = ("sample_id", "group", "marker", "level", "parent", "method", "flag",
                 "reference", "reliability", "reliability_detail")


def _text_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Text columns as strings (missing: ""), as the annotated h5ad stores them."""
    table = table.reset_index(drop=True).copy()
    for column in _TEXT_COLUMNS:
        if column in table.columns:
            table[column] = table[column].fillna("").astype(str)
    return table


def _sample_rows(samples: Mapping[str, Any], sample_sheet: Any) -> dict[str, dict[str, Any]]:
    """Per sample: panel, batch and day, from the sample sheet or ``uns["sample"]``."""
    rows: dict[str, dict[str, Any]] = {}
    sheet = None
    if sample_sheet is not None:
        from ..cohort._api import _read_sheet

        sheet = _read_sheet(sample_sheet)
    for sample_id, adata in samples.items():
        if sheet is not None:
            if sample_id not in sheet.index:
                raise InputError("sample is not in the sample sheet", sample_id=sample_id)
            rows[sample_id] = dict(sheet.loc[sample_id])
        else:
            rows[sample_id] = sample_info(adata)
    return rows


def gate(
    adatas: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    *,
    method: Literal["pooled", "baseline", "batch"] | None = None,
    fixed: Mapping[str, float] | None = None,
    fixed_hi: Mapping[str, float] | None = None,
    events_per_sample: int | None = None,
    subsets: str | os.PathLike | None = None,
    sample_sheet: pd.DataFrame | str | os.PathLike | None = None,
    user_gates: Mapping[str, str | os.PathLike] | None = None,
    seed: int | None = None,
    config: ConfigLike = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Learn the cohort's hierarchical gates (the workflow's ``thresholds`` step).

    Each gate is learned inside its parent population (lymphocytes -> CD3- -> B cells ->
    naive B cells) on a seeded equal-per-sample pool of the QC-passed events, after every
    visit is registered onto the cohort's landmarks, and mapped back onto every sample's own
    scale: the workflow's own gate learning (``bcellmap.flow.thresholds.learn_cohort_gates``).

    Parameters
    ----------
    adatas
        Mapped flow samples (:func:`map_som`), or ingested ones: a sequence (named by
        ``uns["sample"]["sample_id"]``) or a mapping ``{sample_id: AnnData}``.
    method
        Where gates are learned: ``pooled`` (every sample), ``baseline`` (samples with day
        <= 0 only) or ``batch`` (each panel and batch apart). Default:
        ``annotate.thresholds.method`` (``pooled``).
    fixed, fixed_hi
        ``{marker: transformed value}`` of positive / hi gates that override learning.
    events_per_sample
        Events per sample in the pool. Default: ``annotate.thresholds.events_per_sample``.
    subsets
        Your B-cell subset rule table (YAML; a relative path is resolved against the
        working directory). Default: ``annotate.subsets`` (null: the built-in table,
        ``bcellmap.flow.subsets``).
    sample_sheet
        Sample sheet (path or DataFrame) giving every sample's panel, batch and day; None:
        ``uns["sample"]`` of each AnnData.
    user_gates
        ``{sample_id: GatingML file}`` of corrected gates (e.g. an edited
        :func:`bcellmap.flow.gatingml.write_gatingml` export): each ``{marker}_{level}`` gate
        in it replaces the learned one (method ``user``), and the gates below it are learned
        in the parent it defines. Default: the sheet's ``gatingml`` column, else
        ``annotate.user_gates`` by panel.
    seed
        Seed of the pooling subsample. Default: the config's ``seed``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    tuple of pandas.DataFrame
        ``(thresholds, gates)``: the cohort's reference gates per group (the workflow's
        ``results/models/thresholds.tsv``) and every sample's own gates
        (``results/models/gates.tsv``). Each sample also gets its gate rows in
        ``uns["gates"]`` and its group's reference gates in ``uns["thresholds"]``, so that
        :func:`annotate` needs no argument.

    Raises
    ------
    bcellmap.errors.InputError
        No sample to learn on (``baseline`` without day <= 0 samples), missing markers.
    """
    from ..flow.thresholds import (
        _settings,
        learn_cohort_gates,
        read_user_gate_files,
        user_gate_file,
    )

    samples = as_mapping(adatas)
    cfg = resolve_config(config, {
        "annotate.thresholds.method": method,
        "annotate.thresholds.fixed": None if fixed is None else dict(fixed),
        "annotate.thresholds.fixed_hi": None if fixed_hi is None else dict(fixed_hi),
        "annotate.thresholds.events_per_sample": events_per_sample,
        "annotate.subsets": None if subsets is None else str(subsets),
        "seed": seed,
    })
    settings = _settings(cfg)
    rows = _sample_rows(samples, sample_sheet)
    if settings["method"] == "batch" and not any(str(r.get("batch") or "") for r in
                                                  rows.values()):
        raise ConfigError("method 'batch' needs each sample's batch: give sample_sheet= or "
                          "ingest with batch=")
    kinds = {s: "mass_cytometry" if bool((a.uns.get("source") or {}).get("mass_cytometry"))
             else "fluorescence" for s, a in samples.items()}

    def _passed(adata: Any) -> Any:
        def _view() -> Any:
            mask = qc_mask(adata)
            return adata if bool(mask.all()) else adata[mask]
        return _view

    files = {str(s): Path(p) for s, p in (user_gates or {}).items()}
    unknown = sorted(set(files) - set(samples))
    if unknown:
        raise InputError(f"user_gates names samples not given: {', '.join(unknown)}")
    for sample_id in samples:
        if sample_id not in files and (found := user_gate_file(rows[sample_id], cfg)):
            files[sample_id] = found
    cohort, gates, groups = learn_cohort_gates(
        {s: _passed(a) for s, a in samples.items()}, rows=rows, kinds=kinds, config=cfg,
        user_gates=read_user_gate_files(files, lambda s: samples[s]))
    params = {"method": settings["method"], "fixed": dict(settings["fixed"]),
              "fixed_hi": dict(settings["fixed_hi"]),
              "events_per_sample": int(settings["events_per_sample"]),
              "subsets": _subsets_label(cfg), "seed": int(cfg.get("seed", 0)),
              "gating": h5ad_safe(cfg["annotate"].get("gating") or {}),
              "sample_sheet": None if sample_sheet is None else
              str(sample_sheet) if isinstance(sample_sheet, (str, os.PathLike)) else "given"}
    for sample_id, adata in samples.items():
        own = gates[gates["sample_id"].astype(str) == sample_id]
        adata.uns["gates"] = _text_columns(own)
        adata.uns["thresholds"] = _text_columns(
            cohort[cohort["group"].astype(str) == groups[sample_id]])
        record(adata, "gate", params)
    return cohort, gates


def _gates_of(adata: AnnData, sample_id: str, gates: Any
              ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The gates table (every sample's, or this sample's) and the reference gates, if any."""
    import pandas as pd

    table = None
    if gates is None:
        if "gates" not in adata.uns:
            raise InputError("no gates given and no uns['gates']: run bcellmap.tl.gate first, "
                             "or pass gates=", sample_id=sample_id)
        all_gates = pd.DataFrame(adata.uns["gates"])
        stored = adata.uns.get("thresholds")
        table = None if stored is None else pd.DataFrame(stored)
        if "sample_id" not in all_gates.columns:
            all_gates["sample_id"] = sample_id
    elif isinstance(gates, pd.DataFrame):
        all_gates = gates
    elif isinstance(gates, (tuple, list)) and len(gates) == 2:
        table, all_gates = gates
    else:
        raise ConfigError("gates must be what bcellmap.tl.gate returns ((thresholds, gates)), "
                          "a gates table, or None")
    return all_gates, table


def _subsets_label(config: Mapping[str, Any]) -> str:
    """``annotate.subsets`` as recorded: the user's table, or ``built-in``."""
    return str(config["annotate"].get("subsets") or "built-in")


def annotate(
    adata: AnnData,
    *,
    gates: tuple[pd.DataFrame, pd.DataFrame] | pd.DataFrame | None = None,
    subsets: str | os.PathLike | None = None,
    max_mahalanobis: float | None = None,
    sample_id: str | None = None,
    day: int | None = None,
    config: ConfigLike = None,
    copy: bool = False,
) -> AnnData | None:
    """Call every QC-passed event's cell type and B-cell subset (the ``annotate`` step).

    B cells are CD3- lymphocytes that are CD19+ or CD20+; subsets follow the ordered rule
    table (transitional, naive, unswitched and switched memory, double negative,
    plasmablast); NK cells are lineage-negative events inside the T and B cells' scatter
    core: the workflow's own annotation (``bcellmap.flow.annotate.annotate_with_gates``).

    Parameters
    ----------
    adata
        A mapped flow sample (:func:`map_som`; without ``obs["metacluster"]`` no cluster
        phenotypes are reported).
    gates
        What :func:`gate` returned, or its per-sample gates table (e.g. the workflow's
        ``gates.tsv``). None: ``uns["gates"]`` (and ``uns["thresholds"]``) written by
        :func:`gate`.
    subsets
        Your B-cell subset rule table (YAML; a relative path is resolved against the
        working directory). Default: ``annotate.subsets`` (null: the built-in table,
        ``bcellmap.flow.subsets``).
    max_mahalanobis
        Radius of the lymphocyte scatter core. Default:
        ``annotate.gating.lymphocyte_max_mahalanobis`` (3.5).
    sample_id
        The sample's row in the gates table. Default: ``uns["sample"]["sample_id"]``.
    day
        The visit's day (plausibility flags at baseline). Default: ``uns["sample"]["day"]``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obs``: ``cell_type`` (B, T, NK, other),
        ``lymphocyte``, ``b_subset`` ("" for non-B), ``cd19_pos``, ``cd20_pos``,
        ``metacluster_cell_type`` ("" and False for events that failed QC, which the
        workflow's annotated h5ad leaves out); ``uns``: ``thresholds``, ``gates``,
        ``metacluster_phenotypes``, ``annotate`` (as the workflow writes them), ``counts``
        (the sample's row of ``results/counts/{sample_id}.tsv``, for
        :func:`bcellmap.cohort.quantify`) and ``lineage_qc`` (its ``lineage_gate`` QC row).

    Raises
    ------
    bcellmap.errors.InputError
        No gates for the sample, or a panel without CD19 and CD20.
    """
    import numpy as np

    from ..flow.annotate import annotate_with_gates, lineage_qc_row

    adata = adata.copy() if copy else adata
    cfg = resolve_config(config, {
        "annotate.subsets": None if subsets is None else str(subsets),
        "annotate.gating.lymphocyte_max_mahalanobis": max_mahalanobis,
    })
    sample = sample_info(adata)
    sample_id = str(sample_id or sample.get("sample_id") or "")
    if not sample_id:
        raise ConfigError("annotate: the AnnData records no sample_id; pass sample_id=")
    if day is None and sample.get("day") is not None:
        day = int(sample["day"])
    all_gates, table = _gates_of(adata, sample_id, gates)
    mask = qc_mask(adata)
    passed = adata if bool(mask.all()) else adata[mask]
    annotated, counts = annotate_with_gates(
        passed, config=cfg, gates=all_gates, thresholds=table,
        row={"sample_id": sample_id, "modality": str(sample.get("modality") or "flow"),
             "day": day})
    for column in (c for c in ANNOTATION_COLUMNS if c in annotated.obs.columns):
        values = annotated.obs[column].to_numpy()
        if bool(mask.all()):
            adata.obs[column] = values
            continue
        full = np.zeros(adata.n_obs, dtype=bool) if values.dtype == bool else \
            np.full(adata.n_obs, "", dtype=object)
        full[mask] = values
        adata.obs[column] = full
    for key in ("thresholds", "gates", "metacluster_phenotypes", "annotate"):
        adata.uns[key] = annotated.uns[key]
    adata.uns["counts"] = h5ad_safe(counts.iloc[0].to_dict())
    adata.uns["lineage_qc"] = h5ad_safe(lineage_qc_row(counts).iloc[0].to_dict())
    radius = float(cfg["annotate"].get("gating", {}).get("lymphocyte_max_mahalanobis", 3.5))
    record(adata, "annotate", {"sample_id": sample_id, "day": day,
                               "subsets": _subsets_label(cfg),
                               "max_mahalanobis": radius,
                               "subset_precedence": list(
                                   annotated.uns["annotate"]["subset_precedence"])})
    return adata if copy else None
