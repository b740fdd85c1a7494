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
- ``upper95_at_zero_pct_lymphocytes`` / ``upper95_at_zero_per_ul``: what the "LLOQ" above
  really is, named for it: the one-sided 95% Poisson upper bound on the frequency when zero
  events are seen (3 events, the usual rounding of -ln 0.05 = 2.996, over the lymphocytes
  acquired). Equal to ``lloq_*`` at the default ``lloq_events: 3``; always 3 events.
- ``loq_pct_lymphocytes = loq_events / lymphocytes * 100`` and ``loq_per_ul``: the limit of
  quantification, ``kinetics.loq_events`` events (default 50: Poisson CV 1/sqrt(50) = 14%,
  EuroFlow/ICSH practice: detection ~20 events, quantification ~50). ``below_loq``: the
  sample's B-cell count is below ``loq_events`` (empty without lymphocytes).
- ``{subset}_per_ul = {subset}_count / lymphocytes * lymphocytes_per_ul``.
- 95% confidence intervals, two-sided, exact, in ``{column}_ci_low`` / ``{column}_ci_high``:
  counts (``b_cells``, ``cd19_pos``, ``cd20_pos``, ``cd19neg_cd20pos``, ``{subset}_count``):
  Poisson, Garwood (chi-square) limits chi2(0.025, 2k) / 2 and chi2(0.975, 2k + 2) / 2 (0 at
  k = 0); frequencies k / n (``*_pct_lymphocytes`` with n = lymphocytes, ``{subset}_pct_b``
  with n = b_cells): binomial, Clopper-Pearson limits Beta(0.025; k, n - k + 1) and
  Beta(0.975; k + 1, n - k), in %; cells/µL: the frequency interval of k / lymphocytes times
  ``lymphocytes_per_ul`` (the clinical lymphocyte count's own error is not included).
- ``lymphodepletion_day``: carried from the sample sheet's optional column of that name
  (integer days from infusion; empty where absent), for ``kinetics``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..contracts import SAMPLE_COLUMNS, SUBSETS
from ..errors import InputError
from ..io.readers import cell_text, read_table

log = logging.getLogger(__name__)

_NUMERIC = ("events_total", "events_qc_pass", "lymphocytes", "t_cells", "b_cells", "cd19_pos",
            "cd20_pos", "cd19neg_cd20pos", *(f"{s}_count" for s in SUBSETS),
            "cluster_discordant_events", "car_t_count", "car_t_pct_t")


#: Events behind the one-sided 95% Poisson upper bound at zero (-ln 0.05 = 2.996, rounded).
UPPER95_AT_ZERO_EVENTS = 3.0
#: Count columns that get a Poisson interval, and the frequency / cells/µL names built on them.
_MEASURE_COUNTS = (("b", "b_cells"), ("cd19", "cd19_pos"), ("cd20", "cd20_pos"),
                   ("cd19neg_cd20pos", "cd19neg_cd20pos"))


def poisson_interval(count: pd.Series, *, confidence: float = 0.95
                     ) -> tuple[pd.Series, pd.Series]:
    """Exact (Garwood) two-sided Poisson interval of an event count.

    Lower chi2((1 - c) / 2, 2k) / 2 (0 at k = 0), upper chi2((1 + c) / 2, 2k + 2) / 2.
    NaN where the count is missing or negative.
    """
    from scipy.stats import chi2

    k = pd.to_numeric(count, errors="coerce").astype(float)
    alpha = 1.0 - confidence
    valid = k.notna() & (k >= 0)
    low = pd.Series(np.nan, index=k.index)
    high = pd.Series(np.nan, index=k.index)
    low[valid & (k == 0)] = 0.0
    positive = valid & (k > 0)
    low[positive] = chi2.ppf(alpha / 2, 2 * k[positive]) / 2
    high[valid] = chi2.ppf(1 - alpha / 2, 2 * k[valid] + 2) / 2
    return low, high


def clopper_pearson(k: pd.Series, n: pd.Series, *, confidence: float = 0.95
                    ) -> tuple[pd.Series, pd.Series]:
    """Exact (Clopper-Pearson) two-sided binomial interval of k / n, as fractions.

    Lower Beta((1 - c) / 2; k, n - k + 1) (0 at k = 0), upper Beta((1 + c) / 2; k + 1, n - k)
    (1 at k = n). NaN where n is 0 or missing, or k is missing or outside [0, n].
    """
    from scipy.stats import beta

    k = pd.to_numeric(k, errors="coerce").astype(float)
    n = pd.to_numeric(n, errors="coerce").astype(float)
    alpha = 1.0 - confidence
    valid = (n > 0) & k.notna() & (k >= 0) & (k <= n)
    low = pd.Series(np.nan, index=k.index)
    high = pd.Series(np.nan, index=k.index)
    low[valid & (k == 0)] = 0.0
    high[valid & (k == n)] = 1.0
    some = valid & (k > 0)
    low[some] = beta.ppf(alpha / 2, k[some], n[some] - k[some] + 1)
    short = valid & (k < n)
    high[short] = beta.ppf(1 - alpha / 2, k[short] + 1, n[short] - k[short])
    return low, high


def _add_intervals(table: pd.DataFrame, name: str, count: str, denominator: str, *,
                   per_ul: pd.Series | None) -> None:
    """``{count}_ci_*``, ``{name}_ci_*`` (%) and, with ``per_ul``, the cells/µL interval."""
    low, high = poisson_interval(table[count])
    table[f"{count}_ci_low"], table[f"{count}_ci_high"] = low, high
    low, high = clopper_pearson(table[count], table[denominator])
    table[f"{name}_ci_low"], table[f"{name}_ci_high"] = 100.0 * low, 100.0 * high
    if per_ul is not None:
        stem = name.rsplit("_pct_", 1)[0]
        table[f"{stem}_per_ul_ci_low"] = low * per_ul
        table[f"{stem}_per_ul_ci_high"] = high * per_ul


def _lymphodepletion_day(sheet: pd.DataFrame) -> pd.Series:
    """The sheet's optional ``lymphodepletion_day`` as integers (empty where absent)."""
    if "lymphodepletion_day" not in sheet.columns:
        return pd.Series(pd.NA, index=sheet.index, dtype="Int64")
    days = []
    for sample_id, raw in sheet["lymphodepletion_day"].items():
        text = cell_text(raw).strip()
        if text == "":
            days.append(pd.NA)
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value != round(value):
            raise InputError(f"sample {sample_id}: lymphodepletion_day {text!r} is not an "
                             "integer number of days from infusion")
        days.append(int(round(value)))
    return pd.Series(pd.array(days, dtype="Int64"), index=sheet.index)


def _percent(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    """100 * numerator / denominator, NaN where the denominator is zero or missing."""
    denominator = denominator.astype(float).where(denominator.astype(float) > 0)
    return 100.0 * numerator.astype(float) / denominator


def quantify(counts: pd.DataFrame, sheet: pd.DataFrame, *, lloq_events: float = 3.0,
             loq_events: float = 50.0) -> pd.DataFrame:
    """Turn per-sample counts into the cohort samples table.

    Parameters
    ----------
    counts
        Concatenated per-sample counts tables (``annotate.COUNT_COLUMNS``, one row each).
    sheet
        The sample sheet (``read_sample_sheet``): patient_id, day, modality,
        lymphocytes_per_ul.
    lloq_events
        Events that define the "LLOQ" (``lloq_*``; 3: the 95% upper bound at zero events).
    loq_events
        Events that define the limit of quantification (``loq_*``, ``below_loq``).

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

    sheet_columns = sheet[["sample_id", "patient_id", "day", "modality",
                           "lymphocytes_per_ul"]].copy()
    sheet_columns["lymphodepletion_day"] = _lymphodepletion_day(sheet)
    table = counts.drop(columns=["modality", "lymphodepletion_day"], errors="ignore").merge(
        sheet_columns.reset_index(drop=True), on="sample_id", how="left")
    lymphocytes = table["lymphocytes"]
    per_ul = pd.to_numeric(table["lymphocytes_per_ul"], errors="coerce")
    for name, column in _MEASURE_COUNTS:
        table[f"{name}_pct_lymphocytes"] = _percent(table[column], lymphocytes)
        table[f"{name}_per_ul"] = table[f"{name}_pct_lymphocytes"] / 100.0 * per_ul
    table["lloq_pct_lymphocytes"] = _percent(pd.Series(lloq_events, index=table.index),
                                             lymphocytes)
    table["lloq_per_ul"] = table["lloq_pct_lymphocytes"] / 100.0 * per_ul
    table["upper95_at_zero_pct_lymphocytes"] = _percent(
        pd.Series(UPPER95_AT_ZERO_EVENTS, index=table.index), lymphocytes)
    table["upper95_at_zero_per_ul"] = table["upper95_at_zero_pct_lymphocytes"] / 100.0 * per_ul
    table["loq_pct_lymphocytes"] = _percent(pd.Series(loq_events, index=table.index),
                                            lymphocytes)
    table["loq_per_ul"] = table["loq_pct_lymphocytes"] / 100.0 * per_ul
    evaluable = (lymphocytes.astype(float) > 0) & table["b_cells"].notna()
    table["below_loq"] = (table["b_cells"].astype(float) < loq_events).where(
        evaluable).astype("boolean")
    for subset in SUBSETS:
        table[f"{subset}_pct_b"] = _percent(table[f"{subset}_count"], table["b_cells"])
        table[f"{subset}_per_ul"] = (_percent(table[f"{subset}_count"], lymphocytes)
                                     / 100.0 * per_ul)
    table["t_pct_lymphocytes"] = _percent(table["t_cells"], lymphocytes)
    for name, column in _MEASURE_COUNTS:
        _add_intervals(table, f"{name}_pct_lymphocytes", column, "lymphocytes", per_ul=per_ul)
    for subset in SUBSETS:
        count = f"{subset}_count"
        _add_intervals(table, f"{subset}_pct_b", count, "b_cells", per_ul=None)
        low, high = clopper_pearson(table[count], lymphocytes)
        table[f"{subset}_per_ul_ci_low"] = low * per_ul
        table[f"{subset}_per_ul_ci_high"] = high * per_ul

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
        frames.append(read_table(path, required=("sample_id", "lymphocytes", "b_cells"),
                                 what="counts table", one_row=True))
    return pd.concat(frames, ignore_index=True)
