"""Per-sample counts and frequencies: the per-sample counts tables -> samples.tsv.

Definitions (flow and scRNA alike; the counts tables come from ``annotate`` and
``annotate-scrna``):

- ``lymphocytes``: the counts table's ``lymphocytes`` (for flow, the QC-passed events,
  because QC includes the lymphocyte scatter gate; for scRNA, QC-passed T, B and NK cells).
- ``b_pct_lymphocytes = b_cells / lymphocytes * 100``; likewise ``cd19_pct_lymphocytes``,
  ``cd20_pct_lymphocytes`` and ``cd19neg_cd20pos_pct_lymphocytes`` (all CD3- B lineage).
- ``{subset}_pct_b = {subset}_count / b_cells * 100`` (empty without B cells, or when the
  panel cannot call the subset).
- ``b_per_ul = b_pct_lymphocytes / 100 * lymphocytes_per_ul`` from the sample sheet (empty
  without it); likewise ``cd19_per_ul``, ``cd20_per_ul``.
- ``lloq_pct_lymphocytes = lloq_events / lymphocytes * 100``: the frequency the number of
  lymphocytes acquired can resolve. ``lloq_events`` (``kinetics.lloq_events``, default 3)
  is the one-sided 95% Poisson upper bound at zero events (-ln 0.05 = 3.0). Empty when no
  lymphocyte was acquired. ``lloq_per_ul`` is its absolute equivalent.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .annotate import COUNT_COLUMNS, SUBSETS
from .errors import InputError

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("sample_id", "patient_id", "day", "modality", "events_total",
                  "events_qc_pass", "lymphocytes", "b_cells", "cd19_pos", "cd20_pos",
                  "cd19neg_cd20pos", "b_pct_lymphocytes", "cd19_pct_lymphocytes",
                  "cd20_pct_lymphocytes", "b_per_ul", "lloq_pct_lymphocytes")
_NUMERIC = ("events_total", "events_qc_pass", "lymphocytes", "t_cells", "b_cells", "cd19_pos",
            "cd20_pos", "cd19neg_cd20pos", *(f"{s}_count" for s in SUBSETS),
            "cluster_discordant_events", "car_t_count", "car_t_pct_t")


def _percent(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    """100 * numerator / denominator, NaN where the denominator is zero or missing."""
    denominator = denominator.astype(float).where(denominator.astype(float) > 0)
    return 100.0 * numerator.astype(float) / denominator


def quantify(counts: pd.DataFrame, sheet: pd.DataFrame, *, lloq_events: float = 3.0
             ) -> pd.DataFrame:
    """Turn per-sample counts into the cohort samples table.

    Parameters
    ----------
    counts
        Concatenated per-sample counts tables (``annotate.COUNT_COLUMNS``, one row each).
    sheet
        The sample sheet (``read_sample_sheet``): patient_id, day, modality,
        lymphocytes_per_ul.
    lloq_events
        Events that define the lower limit of quantification.

    Returns
    -------
    pandas.DataFrame
        ``SAMPLE_COLUMNS``, then the per-subset columns and extras, ordered by patient,
        modality and day.
    """
    missing = [c for c in ("sample_id", "lymphocytes", "b_cells") if c not in counts.columns]
    if missing:
        raise InputError(f"counts tables lack columns {', '.join(missing)}")
    counts = counts.copy()
    for column in _NUMERIC:
        if column not in counts.columns:
            counts[column] = np.nan
        counts[column] = pd.to_numeric(counts[column], errors="coerce")
    unknown = sorted(set(counts["sample_id"].astype(str)) - set(sheet.index.astype(str)))
    if unknown:
        raise InputError(f"counts for samples not in the sheet: {', '.join(unknown)}")
    duplicated = counts["sample_id"][counts["sample_id"].duplicated()].tolist()
    if duplicated:
        raise InputError(f"more than one counts table for {', '.join(map(str, duplicated))}")

    table = counts.drop(columns=["modality"], errors="ignore").merge(
        sheet[["sample_id", "patient_id", "day", "modality", "lymphocytes_per_ul"]]
        .reset_index(drop=True), on="sample_id", how="left")
    lymphocytes = table["lymphocytes"]
    per_ul = pd.to_numeric(table["lymphocytes_per_ul"], errors="coerce")
    for name, column in (("b", "b_cells"), ("cd19", "cd19_pos"), ("cd20", "cd20_pos"),
                         ("cd19neg_cd20pos", "cd19neg_cd20pos")):
        table[f"{name}_pct_lymphocytes"] = _percent(table[column], lymphocytes)
        table[f"{name}_per_ul"] = table[f"{name}_pct_lymphocytes"] / 100.0 * per_ul
    table["lloq_pct_lymphocytes"] = _percent(pd.Series(lloq_events, index=table.index),
                                             lymphocytes)
    table["lloq_per_ul"] = table["lloq_pct_lymphocytes"] / 100.0 * per_ul
    for subset in SUBSETS:
        table[f"{subset}_pct_b"] = _percent(table[f"{subset}_count"], table["b_cells"])
    table["t_pct_lymphocytes"] = _percent(table["t_cells"], lymphocytes)

    subset_columns = [c for s in SUBSETS for c in (f"{s}_count", f"{s}_pct_b")]
    order = [*SAMPLE_COLUMNS, *subset_columns]
    extras = [c for c in table.columns if c not in order]
    table = table[order + extras]
    for column in _NUMERIC:
        if column != "car_t_pct_t":
            # Counts stay integers; a count the sample lacks stays empty.
            table[column] = table[column].round().astype("Int64")
    return table.sort_values(["patient_id", "modality", "day"], kind="stable").reset_index(
        drop=True)


def read_counts(paths: Sequence[str]) -> pd.DataFrame:
    """Read and concatenate per-sample counts tables."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""],
                                dtype={"sample_id": str, "subsets_not_called": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"cannot read the counts table ({exc})", path=path) from None
        missing = [c for c in ("sample_id", "lymphocytes", "b_cells") if c not in frame.columns]
        if missing or len(frame) != 1:
            raise InputError("a counts table needs one row and columns "
                             f"{', '.join(COUNT_COLUMNS[:7])}...", path=path)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _lloq_events(config: Mapping[str, Any]) -> float:
    return float(config.get("kinetics", {}).get("lloq_events", 3.0))


def cli_quantify(args: argparse.Namespace) -> None:
    """``bcellmap quantify``: counts tables + sheet -> results/tables/samples.tsv."""
    from ._io import write_tsv
    from .config import load_config
    from .samplesheet import read_sample_sheet

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    table = quantify(read_counts(args.inputs), sheet, lloq_events=_lloq_events(config))
    write_tsv(table, args.out, float_format="%.10g")
    log.info("%d samples quantified", len(table))
