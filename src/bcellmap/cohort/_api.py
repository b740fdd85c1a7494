"""The AnnData-first cohort API: ``quantify``, ``kinetics``, ``cohort_summary``,
``concordance`` (the workflow's ``quantify``, ``kinetics`` and ``concordance`` steps)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._apiutils import ConfigLike, as_mapping, resolve_config, sample_info
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

__all__ = ["quantify", "kinetics", "cohort_summary", "concordance"]


def _read_sheet(sample_sheet: Any, *, panels: Sequence[str] | None = None) -> pd.DataFrame:
    """A sample sheet as ``read_sample_sheet`` returns it (indexed by sample_id), from a path
    or a DataFrame."""
    import pandas as pd

    if isinstance(sample_sheet, (str, os.PathLike)):
        from ..io.samplesheet import read_sample_sheet

        return read_sample_sheet(sample_sheet, check_files=False,
                                 panels=None if panels is None else list(panels))
    if not isinstance(sample_sheet, pd.DataFrame):
        raise ConfigError(f"sample_sheet must be a path or a DataFrame, got "
                          f"{type(sample_sheet).__name__}")
    sheet = sample_sheet.copy()
    if "sample_id" not in sheet.columns:
        sheet = sheet.reset_index()
    sheet["sample_id"] = sheet["sample_id"].astype(str)
    sheet = sheet.set_index("sample_id", drop=False)
    sheet.index.name = None
    for column, default in (("lymphocytes_per_ul", float("nan")), ("panel", ""),
                            ("batch", ""), ("disease", "")):
        if column not in sheet.columns:
            sheet[column] = default
    return sheet


def _sheet_from_samples(samples: Mapping[str, Any]) -> pd.DataFrame:
    """A sample sheet built from ``uns["sample"]`` of every AnnData."""
    import pandas as pd

    rows = []
    for sample_id, adata in samples.items():
        sample = sample_info(adata)
        if not sample.get("patient_id") or sample.get("day") is None:
            raise InputError("uns['sample'] lacks patient_id or day: give sample_sheet=, or "
                             "ingest with patient_id= and day=", sample_id=sample_id)
        per_ul = sample.get("lymphocytes_per_ul")
        rows.append({"sample_id": sample_id, "patient_id": str(sample["patient_id"]),
                     "day": int(sample["day"]),
                     "modality": str(sample.get("modality") or "flow"),
                     "lymphocytes_per_ul": float("nan") if per_ul is None else float(per_ul),
                     "lymphodepletion_day": sample.get("lymphodepletion_day")})
    sheet = pd.DataFrame(rows)
    if sheet["lymphodepletion_day"].isna().all():
        sheet = sheet.drop(columns="lymphodepletion_day")
    return _read_sheet(sheet)


def _counts(adata: Any, sample_id: str) -> dict[str, Any]:
    counts = adata.uns.get("counts") if hasattr(adata, "uns") else None
    if not isinstance(counts, Mapping):
        raise InputError("no uns['counts']: annotate the sample first (bcellmap.tl.annotate)",
                         sample_id=sample_id)
    return dict(counts)


def quantify(
    adatas: Sequence[AnnData] | Mapping[str, AnnData],
    *,
    sample_sheet: pd.DataFrame | str | os.PathLike | None = None,
    lloq_events: float | None = None,
    loq_events: float | None = None,
    config: ConfigLike = None,
) -> pd.DataFrame:
    """The cohort's per-sample table (``results/tables/samples.tsv``).

    Counts, frequencies (% of lymphocytes, % of B cells), cells/µL, the "LLOQ" and limit of
    quantification, and exact 95% intervals (``bcellmap.cohort._quantify.quantify``).

    Parameters
    ----------
    adatas
        Annotated samples (:func:`bcellmap.tl.annotate`, which leaves the counts in
        ``uns["counts"]``): a sequence or a mapping ``{sample_id: AnnData}``.
    sample_sheet
        The sample sheet (path or DataFrame): patient_id, day, modality, optional
        lymphocytes_per_ul (cells/µL) and lymphodepletion_day. None: ``uns["sample"]`` of
        every sample (no absolute counts unless ingested with ``lymphocytes_per_ul=``).
    lloq_events
        Events behind the "LLOQ". Default: ``kinetics.lloq_events`` (3).
    loq_events
        Events behind the limit of quantification. Default: ``kinetics.loq_events`` (50).
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    pandas.DataFrame
        One row per sample, the ``samples.tsv`` columns (see the README), ordered by
        patient, modality and day.

    Raises
    ------
    bcellmap.errors.InputError
        A sample without counts, or not in the sample sheet.
    """
    import pandas as pd

    from ._quantify import quantify as quantify_counts

    samples = as_mapping(adatas)
    cfg = resolve_config(config, {"kinetics.lloq_events": lloq_events,
                                  "kinetics.loq_events": loq_events})
    counts = pd.DataFrame([_counts(adata, s) for s, adata in samples.items()])
    sheet = _sheet_from_samples(samples) if sample_sheet is None else _read_sheet(sample_sheet)
    return quantify_counts(counts, sheet,
                           lloq_events=float(cfg["kinetics"].get("lloq_events", 3.0)),
                           loq_events=float(cfg["kinetics"].get("loq_events", 50.0)))


def _samples_table(samples: Any) -> pd.DataFrame:
    import pandas as pd

    if isinstance(samples, pd.DataFrame):
        return samples
    if isinstance(samples, (str, os.PathLike)):
        try:
            return pd.read_csv(samples, sep="\t", keep_default_na=False, na_values=[""],
                               dtype={"patient_id": str, "sample_id": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"cannot read the samples table ({exc})", path=samples) from None
    raise ConfigError(f"samples must be a DataFrame or a samples.tsv path, got "
                      f"{type(samples).__name__}")


def kinetics(
    samples: pd.DataFrame | str | os.PathLike,
    *,
    depletion_per_ul: float | None = None,
    depletion_pct_lymphocytes: float | None = None,
    reconstitution_per_ul: float | None = None,
    reconstitution_pct_lymphocytes: float | None = None,
    loq_events: float | None = None,
    config: ConfigLike = None,
) -> pd.DataFrame:
    """Per-patient depletion, aplasia and reconstitution (``results/tables/kinetics.tsv``).

    For every patient, modality and measure (``b``, ``cd19``, ``cd20``): baseline, depletion
    day (first post-infusion visit below the depletion threshold that resolves it),
    reconstitution day (first of two consecutive evaluable visits at or above the
    reconstitution threshold), aplasia days, censoring, composition on return and flags
    (``bcellmap.cohort._kinetics.patient_kinetics``).

    Parameters
    ----------
    samples
        The samples table of :func:`quantify` (or a ``samples.tsv`` path).
    depletion_per_ul, depletion_pct_lymphocytes
        Depleted below this many B cells/µL, or % of lymphocytes without absolute counts.
        Default: ``kinetics.depletion`` (1 /µL, 0.1%).
    reconstitution_per_ul, reconstitution_pct_lymphocytes
        Reconstituted at or above this. Default: ``kinetics.reconstitution`` (10 /µL, 1%).
    loq_events
        B events a composition at reconstitution needs. Default: ``kinetics.loq_events``.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    pandas.DataFrame
        One row per patient x modality x measure: the ``kinetics.tsv`` columns (see the
        README).
    """
    from ._kinetics import patient_kinetics

    cfg = resolve_config(config, {
        "kinetics.depletion.per_ul": depletion_per_ul,
        "kinetics.depletion.pct_lymphocytes": depletion_pct_lymphocytes,
        "kinetics.reconstitution.per_ul": reconstitution_per_ul,
        "kinetics.reconstitution.pct_lymphocytes": reconstitution_pct_lymphocytes,
        "kinetics.loq_events": loq_events,
    })
    return patient_kinetics(_samples_table(samples), config=cfg)


def cohort_summary(
    kinetics: pd.DataFrame | str | os.PathLike,
    *,
    km_days: Sequence[int] | None = None,
    config: ConfigLike = None,
) -> pd.DataFrame:
    """The cohort summary (``results/tables/cohort.tsv``) of a kinetics table.

    Time to reconstitution and aplasia duration (mean, SD, median, range), patient counts,
    Kaplan-Meier estimates and mean subset composition, per modality, measure and unit
    (``bcellmap.cohort._kinetics.cohort_summary``).

    Parameters
    ----------
    kinetics
        The table of :func:`kinetics` (or a ``kinetics.tsv`` path).
    km_days
        Days at which the Kaplan-Meier probability of remaining aplastic is given.
        Default: ``kinetics.km_days`` (90, 180, 365).
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.

    Returns
    -------
    pandas.DataFrame
        Tidy table: statistic, modality, measure, value, n, detail, unit.
    """
    from ._kinetics import cohort_summary as summarise

    cfg = resolve_config(config, {
        "kinetics.km_days": None if km_days is None else [int(d) for d in km_days]})
    return summarise(_samples_table(kinetics), config=cfg)


def concordance(samples: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """Flow vs scRNA B-cell frequencies at visits measured both ways.

    Parameters
    ----------
    samples
        The samples table of :func:`quantify` (or a ``samples.tsv`` path).

    Returns
    -------
    pandas.DataFrame
        One row per paired visit and measure (``results/tables/concordance.tsv``); empty
        when no visit has both modalities.
    """
    from ._concordance import concordance as pair_visits

    return pair_visits(_samples_table(samples))
