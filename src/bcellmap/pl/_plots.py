"""The report's figures as functions of tables and AnnData objects
(``bcellmap.report.figures``, which ``bcellmap report`` draws from the workflow's files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._apiutils import ConfigLike, as_mapping, qc_mask, resolve_config, sample_info
from ..errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from matplotlib.figure import Figure


def _table(table: Any, what: str) -> pd.DataFrame:
    """A table given as a DataFrame or a TSV path (read as the workflow reads it)."""
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, (str, os.PathLike)):
        from ..cohort._api import _samples_table

        frame = _samples_table(table)
        if "day" in frame.columns:
            frame["day"] = pd.to_numeric(frame["day"], errors="coerce")
        return frame
    raise ConfigError(f"{what} must be a DataFrame or a TSV path, got {type(table).__name__}")


def _report_settings(config: ConfigLike) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = resolve_config(config)
    return cfg, dict(cfg.get("report") or {})


# --------------------------------------------------------------------------- tables


def patient(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    kinetics: pd.DataFrame | str | os.PathLike,
    patient_id: str,
) -> Figure:
    """One patient's B-cell timeline: B cells, CD19+ and CD20+ with limits and calls.

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    kinetics
        The kinetics table (:func:`bcellmap.cohort.kinetics` or ``kinetics.tsv``).
    patient_id
        The patient to draw.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``patient_{patient_id}`` figure.
    """
    from ..report.figures import plot_patient

    return plot_patient(_table(samples, "samples"), _table(kinetics, "kinetics"),
                        str(patient_id))


def cohort_trajectories(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    kinetics: pd.DataFrame | str | os.PathLike,
) -> Figure:
    """Every patient's B-cell level over time, aligned on infusion.

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    kinetics
        The kinetics table (:func:`bcellmap.cohort.kinetics` or ``kinetics.tsv``).

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``cohort_trajectories`` figure.
    """
    from ..report.figures import plot_cohort_trajectories

    return plot_cohort_trajectories(_table(samples, "samples"), _table(kinetics, "kinetics"))


def swimmer(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    kinetics: pd.DataFrame | str | os.PathLike,
) -> Figure:
    """Swimmer plot: per patient, visits, depletion, aplasia and reconstitution.

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    kinetics
        The kinetics table (:func:`bcellmap.cohort.kinetics` or ``kinetics.tsv``).

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``swimmer`` figure.
    """
    from ..report.figures import plot_swimmer

    return plot_swimmer(_table(samples, "samples"), _table(kinetics, "kinetics"))


def kaplan_meier(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    kinetics: pd.DataFrame | str | os.PathLike,
) -> Figure:
    """Kaplan-Meier curve of the time from infusion to B-cell reconstitution.

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    kinetics
        The kinetics table (:func:`bcellmap.cohort.kinetics` or ``kinetics.tsv``).

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``kaplan_meier`` figure.
    """
    from ..report.figures import plot_kaplan_meier

    return plot_kaplan_meier(_table(samples, "samples"), _table(kinetics, "kinetics"))


def composition_visits(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    min_b_events: int | None = None,
    config: ConfigLike = None,
) -> Figure:
    """B-cell subset composition at every visit (stacked bars per patient).

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    min_b_events
        Visits with fewer B events are hatched. Default:
        ``report.min_b_events_composition`` (50).
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``composition_visits`` figure.
    """
    from ..report.figures import plot_composition_visits

    _, settings = _report_settings(config)
    minimum = int(settings.get("min_b_events_composition", 50) if min_b_events is None
                  else min_b_events)
    return plot_composition_visits(_table(samples, "samples"), min_b_events=minimum)


def composition_baseline_vs_reconstitution(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    kinetics: pd.DataFrame | str | os.PathLike,
    min_b_events: int | None = None,
    config: ConfigLike = None,
) -> Figure:
    """Subset composition at baseline and at reconstitution, per patient.

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    kinetics
        The kinetics table (:func:`bcellmap.cohort.kinetics` or ``kinetics.tsv``).
    min_b_events
        Visits with fewer B events are hatched. Default:
        ``report.min_b_events_composition`` (50).
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``composition_baseline_vs_reconstitution`` figure.
    """
    from ..report.figures import plot_composition_baseline_vs_reconstitution

    _, settings = _report_settings(config)
    minimum = int(settings.get("min_b_events_composition", 50) if min_b_events is None
                  else min_b_events)
    return plot_composition_baseline_vs_reconstitution(
        _table(samples, "samples"), _table(kinetics, "kinetics"), min_b_events=minimum)


def flags(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    kinetics: pd.DataFrame | str | os.PathLike,
    max_rows: int = 70,
) -> Figure:
    """Everything flagged: implausible samples, fallback gates, kinetics flags.

    Parameters
    ----------
    samples
        The samples table (:func:`bcellmap.cohort.quantify` or ``samples.tsv``).
    kinetics
        The kinetics table (:func:`bcellmap.cohort.kinetics` or ``kinetics.tsv``).
    max_rows
        Most rows listed.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``flags`` figure.
    """
    from ..report.figures import plot_flags

    return plot_flags(_table(samples, "samples"), _table(kinetics, "kinetics"),
                      max_rows=int(max_rows))


# --------------------------------------------------------------------------- AnnData


def _qc_frame(adatas: Any) -> pd.DataFrame:
    """The cohort QC table (``results/tables/qc.tsv``) from ingested/annotated samples."""
    import pandas as pd

    from ..flow._qc import qc_table

    samples = as_mapping(adatas)
    frames = []
    for sample_id, adata in samples.items():
        qc = adata.uns.get("qc")
        if isinstance(qc, Mapping) and "table" in qc:
            frames.append(qc_table(qc["table"], sample_id=sample_id))
    frames += [pd.DataFrame([dict(adata.uns["lineage_qc"])]) for adata in samples.values()
               if isinstance(adata.uns.get("lineage_qc"), Mapping)]
    if not frames:
        raise ConfigError("no uns['qc'] table in any sample: ingest them with bcellmap.flow")
    return pd.concat(frames, ignore_index=True)


def qc_removed(
    qc: pd.DataFrame | str | os.PathLike | Sequence[AnnData] | Mapping[str, AnnData],
) -> Figure:
    """Events removed per QC step per sample, as % of the events acquired.

    Parameters
    ----------
    qc
        The cohort QC table (``qc.tsv``), or the samples themselves (their
        ``uns["qc"]["table"]`` and, when annotated, ``uns["lineage_qc"]``).

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``qc_removed`` figure.
    """
    import pandas as pd

    from ..report.figures import plot_qc_removed

    if isinstance(qc, (pd.DataFrame, str, os.PathLike)):
        frame = qc if isinstance(qc, pd.DataFrame) else pd.read_csv(
            qc, sep="\t", keep_default_na=False, dtype={"sample_id": str, "detail": str})
    else:
        frame = _qc_frame(qc)
    return plot_qc_removed(frame)


def _annotated_paths(adatas: Any, folder: Path) -> list[str]:
    """Paths of annotated h5ad files: given paths, or slim copies of in-memory samples
    (their QC-passed events, as the workflow's annotated h5ad holds them)."""
    import anndata as ad
    import numpy as np

    items = list(adatas.values()) if isinstance(adatas, Mapping) else (
        [adatas] if hasattr(adatas, "obs") else list(adatas))
    names = list(adatas) if isinstance(adatas, Mapping) else [None] * len(items)
    paths = []
    for name, item in zip(names, items, strict=True):
        if isinstance(item, (str, os.PathLike)):
            paths.append(str(item))
            continue
        sample = sample_info(item)
        sample_id = str(sample.get("sample_id") or name)
        passed = item[qc_mask(item)]
        columns = [c for c in ("metacluster", "cell_type", "b_subset", "metacluster_cell_type")
                   if c in passed.obs.columns]
        slim = ad.AnnData(X=np.asarray(passed.X, dtype=np.float32),
                          obs=passed.obs[columns].copy(),
                          var=passed.var[["canonical"]].copy(),
                          uns={"sample": {k: v for k, v in sample.items()
                                          if k in ("sample_id", "patient_id", "modality")}})
        path = folder / f"{sample_id}.h5ad"
        slim.write_h5ad(path)
        paths.append(str(path))
    return paths


def _pooled(adatas: Any, *, markers: Sequence[str] | None, events_per_sample: int | None,
            seed: int | None, config: ConfigLike) -> tuple[pd.DataFrame, dict, dict]:
    from ..report.figures import pool_annotated

    cfg, settings = _report_settings(config)
    markers = list(cfg["cluster"]["markers"] if markers is None else markers)
    per_sample = int(settings.get("heatmap_events_per_sample", 5000) if events_per_sample is None
                     else events_per_sample)
    seed = int(cfg["seed"] if seed is None else seed)
    with tempfile.TemporaryDirectory(prefix="bcellmap-pl-") as folder:
        pooled = pool_annotated(_annotated_paths(adatas, Path(folder)), markers=markers,
                                events_per_sample=per_sample, seed=seed)
    return pooled, cfg, settings


def cluster_heatmap(
    adatas: Sequence[AnnData] | Mapping[str, AnnData] | Sequence[str | os.PathLike],
    *,
    markers: Sequence[str] | None = None,
    events_per_sample: int | None = None,
    seed: int | None = None,
    config: ConfigLike = None,
) -> Figure:
    """Median marker level per metacluster, with each metacluster's cell type.

    Parameters
    ----------
    adatas
        Annotated flow samples (:func:`bcellmap.tl.annotate`), or annotated h5ad files.
    markers
        Canonical markers shown. Default: ``cluster.markers``.
    events_per_sample
        Events pooled per sample (seeded). Default: ``report.heatmap_events_per_sample``.
    seed
        Seed of the pooling. Default: the config's ``seed``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``cluster_heatmap`` figure.
    """
    from ..report.figures import plot_cluster_heatmap

    pooled, _, _ = _pooled(adatas, markers=markers, events_per_sample=events_per_sample,
                           seed=seed, config=config)
    return plot_cluster_heatmap(pooled)


def embedding(
    adatas: Sequence[AnnData] | Mapping[str, AnnData] | Sequence[str | os.PathLike],
    *,
    markers: Sequence[str] | None = None,
    events_per_sample: int | None = None,
    max_events: int | None = None,
    n_neighbors: int | None = None,
    seed: int | None = None,
    config: ConfigLike = None,
) -> Figure:
    """UMAP of pooled events coloured by cell type and by B-cell subset.

    Parameters
    ----------
    adatas
        Annotated flow samples (:func:`bcellmap.tl.annotate`), or annotated h5ad files.
    markers
        Canonical markers embedded. Default: ``cluster.markers``.
    events_per_sample
        Events pooled per sample (seeded). Default: ``report.heatmap_events_per_sample``.
    max_events
        Most events embedded. Default: ``report.embedding_events``.
    n_neighbors
        UMAP neighbours. Default: ``report.embedding_neighbors``.
    seed
        Seed of the pooling and of UMAP. Default: the config's ``seed``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``embedding`` figure.
    """
    from ..report.figures import plot_embedding

    pooled, cfg, settings = _pooled(adatas, markers=markers,
                                    events_per_sample=events_per_sample, seed=seed,
                                    config=config)
    return plot_embedding(
        pooled, max_events=int(settings.get("embedding_events", 20_000) if max_events is None
                               else max_events),
        seed=int(cfg["seed"] if seed is None else seed),
        n_neighbors=int(settings.get("embedding_neighbors", 15) if n_neighbors is None
                        else n_neighbors))


def gates(
    adatas: Sequence[AnnData] | Mapping[str, AnnData] | Sequence[str | os.PathLike],
    *,
    patient_id: str,
    samples: pd.DataFrame | str | os.PathLike | None = None,
    max_events: int | None = None,
    min_b_events: int | None = None,
    seed: int | None = None,
    config: ConfigLike = None,
) -> Figure:
    """The gates of every flow visit of one patient (CD19 x CD20, IgD x CD27, CD24 x CD38).

    Parameters
    ----------
    adatas
        Annotated flow samples (:func:`bcellmap.tl.annotate`) or annotated h5ad files;
        those of other patients are left out.
    patient_id
        The patient to draw.
    samples
        A table with sample_id, patient_id, day, for samples whose ``uns["sample"]`` lacks
        them.
    max_events
        Most events drawn per panel. Default: ``report.gate_events``.
    min_b_events
        Visits with fewer B cells show no subset %. Default:
        ``report.min_b_events_composition``.
    seed
        Seed of the drawn subsample. Default: the config's ``seed``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    matplotlib.figure.Figure
        The report's ``gates_{patient_id}`` figure.
    """
    from ..report.figures import plot_gates, read_gate_visit

    cfg, settings = _report_settings(config)
    table = None if samples is None else _table(samples, "samples")
    seed = int(cfg["seed"] if seed is None else seed)
    limit = int(settings.get("gate_events", 20_000) if max_events is None else max_events)
    items = list(adatas.values()) if isinstance(adatas, Mapping) else (
        [adatas] if hasattr(adatas, "obs") else list(adatas))
    visits = []
    for item in items:
        source = item if isinstance(item, (str, os.PathLike)) else item[qc_mask(item)]
        visit = read_gate_visit(source, samples=table, max_events=limit, seed=seed)
        if visit.patient_id == str(patient_id):
            visits.append(visit)
    minimum = int(settings.get("min_b_events_composition", 50) if min_b_events is None
                  else min_b_events)
    return plot_gates(visits, str(patient_id), min_b_events=minimum)
