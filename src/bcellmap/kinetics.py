"""Per-patient B-cell depletion and reconstitution, and the cohort summary.

For every patient, modality and measure (``b``: all B-lineage events, ``cd19``: CD19+,
``cd20``: CD20+), from ``results/tables/samples.tsv``:

- Unit: cells/µL when every evaluable visit of the patient and modality has an absolute
  count (``{measure}_per_ul``), else % of lymphocytes. Thresholds follow the unit
  (``kinetics.depletion`` / ``kinetics.reconstitution``).
- Evaluable visits: visits with at least one lymphocyte. A visit with zero QC-passed events
  cannot show depletion (or anything): it is left out of the timeline and flagged
  ``no_events``; visits around it count as consecutive.
- ``baseline_value``: the last visit with day <= 0 (none: empty, flag ``no_baseline``; the
  rest is still computed).
- ``depletion_day``: the first visit after infusion (day > 0) below the depletion threshold
  whose limit of quantification (LLOQ) is at or below that threshold. A visit below the
  threshold whose LLOQ is above it cannot call depletion (flag ``few_events``). Never
  depleted: flag ``no_depletion``; reconstitution is then not defined.
- ``nadir_value``: the lowest value after infusion (flag ``below_lloq`` when it is below the
  LLOQ of its visit, i.e. it is reported as "< LLOQ").
- ``reconstitution_day``: after depletion, the first of two consecutive evaluable visits at
  or above the reconstitution threshold; a qualifying last visit counts, flagged
  ``unconfirmed``. ``redepletion``: a later visit depleted again.
- ``aplasia_days``: reconstitution_day - depletion_day, or last_day - depletion_day when
  ``censored`` (depleted and never reconstituted by ``last_day``).
- Subsets at reconstitution from that visit; ``memory`` = unswitched + switched memory;
  ``memory_dominant_return`` when memory > naive.
- ``cd19_cd20_discordance`` (on every row of the patient and modality): a visit whose
  CD19-CD20+ share of B events is above ``discordance.fraction_b`` with one-sided
  ``discordance.confidence`` (the exact Clopper-Pearson lower bound of k CD19-CD20+ out of
  n B events exceeds it; n >= ``discordance.min_b_cells``), or CD20 reconstituting before
  (or without) CD19: CD19 masking or escape. Masking happens when B cells are rare, so the
  flag rests on the confidence bound, not on a large event minimum: 22 of 23 B events
  CD19-CD20+ is flagged (lower bound 0.81), 1 of 3 is not.

The cohort table (tidy: statistic, modality, measure, value, n, detail) has aplasia
duration (mean, SD, median, range) over patients with an observed reconstitution, a
Kaplan-Meier estimate (lifelines) of the time from infusion to reconstitution among depleted
patients, censored at the last visit, and mean subset composition at baseline and at
reconstitution.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .annotate import SUBSETS
from .errors import InputError

log = logging.getLogger(__name__)

MEASURES = ("b", "cd19", "cd20")
KINETICS_COLUMNS = ("patient_id", "modality", "measure", "baseline_value", "depletion_day",
                    "nadir_value", "reconstitution_day", "aplasia_days", "censored",
                    "last_day", "naive_pct_b_at_reconstitution",
                    "memory_pct_b_at_reconstitution", "transitional_pct_b_at_reconstitution",
                    "flags")
COHORT_COLUMNS = ("statistic", "modality", "measure", "value", "n", "detail")
_MEMORY = ("unswitched_memory", "switched_memory")


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kinetics`` settings with defaults for keys a config may lack."""
    settings = config.get("kinetics", {})
    depletion = settings.get("depletion", {})
    reconstitution = settings.get("reconstitution", {})
    discordance = settings.get("discordance", {})
    return {
        "depletion": {"cells_per_ul": float(depletion.get("per_ul", 1.0)),
                      "pct_lymphocytes": float(depletion.get("pct_lymphocytes", 0.1))},
        "reconstitution": {"cells_per_ul": float(reconstitution.get("per_ul", 10.0)),
                           "pct_lymphocytes": float(reconstitution.get("pct_lymphocytes",
                                                                       1.0))},
        "discordance_fraction": float(discordance.get("fraction_b", 0.2)),
        "discordance_min_b": float(discordance.get("min_b_cells", 3)),
        "discordance_confidence": float(discordance.get("confidence", 0.95)),
        "km_days": [int(d) for d in settings.get("km_days", [90, 180, 365])],
    }


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, all-NaN when the table lacks it."""
    if name not in table.columns:
        return pd.Series(np.nan, index=table.index)
    return pd.to_numeric(table[name], errors="coerce")


def _measure_kinetics(visits: pd.DataFrame, value: pd.Series, lloq: pd.Series, *,
                      depletion: float, reconstitution: float) -> dict[str, Any]:
    """Kinetics of one measure over one patient's evaluable visits (sorted by day)."""
    days = visits["day"].to_numpy()
    values = value.to_numpy(dtype=float)
    lloqs = lloq.to_numpy(dtype=float)
    flags: list[str] = []
    out: dict[str, Any] = {"baseline_value": np.nan, "baseline_day": np.nan,
                           "depletion_day": np.nan, "nadir_value": np.nan, "nadir_day": np.nan,
                           "reconstitution_day": np.nan, "aplasia_days": np.nan,
                           "censored": None, "last_day": days.max() if days.size else np.nan}
    baseline = np.flatnonzero(days <= 0)
    if baseline.size:
        out["baseline_value"] = values[baseline[-1]]
        out["baseline_day"] = days[baseline[-1]]
    else:
        flags.append("no_baseline")
    post = np.flatnonzero(days > 0)
    if post.size == 0:
        flags.append("no_follow_up")
        return {**out, "flags": flags, "reconstitution_row": None, "baseline_row":
                (baseline[-1] if baseline.size else None)}
    nadir = post[int(np.argmin(values[post]))]
    out["nadir_value"] = values[nadir]
    out["nadir_day"] = days[nadir]
    if values[nadir] < lloqs[nadir]:
        flags.append("below_lloq")

    below = values < depletion
    resolvable = lloqs <= depletion
    depleted = [i for i in post if below[i] and resolvable[i]]
    if any(below[i] and not resolvable[i] for i in post):
        flags.append("few_events")
    reconstitution_row = None
    if not depleted:
        flags.append("no_depletion")
    else:
        first = depleted[0]
        out["depletion_day"] = days[first]
        later = [i for i in post if i > first]
        for position, i in enumerate(later):
            if values[i] < reconstitution:
                continue
            if position + 1 == len(later):
                reconstitution_row = i
                flags.append("unconfirmed")
            elif values[later[position + 1]] >= reconstitution:
                reconstitution_row = i
            if reconstitution_row is not None:
                break
        if reconstitution_row is None:
            out["censored"] = True
            out["aplasia_days"] = out["last_day"] - days[first]
        else:
            out["censored"] = False
            out["reconstitution_day"] = days[reconstitution_row]
            out["aplasia_days"] = days[reconstitution_row] - days[first]
            if any(below[i] and resolvable[i] for i in post if i > reconstitution_row):
                flags.append("redepletion")
    return {**out, "flags": flags, "reconstitution_row": reconstitution_row,
            "baseline_row": baseline[-1] if baseline.size else None}


def patient_kinetics(table: pd.DataFrame, *, config: Mapping[str, Any]) -> pd.DataFrame:
    """Per patient, modality and measure: depletion, reconstitution and flags.

    Parameters
    ----------
    table
        The samples table (``quantify.SAMPLE_COLUMNS`` and per-subset columns).
    config
        The merged config (``kinetics`` section).

    Returns
    -------
    pandas.DataFrame
        ``KINETICS_COLUMNS`` plus ``unit``, ``baseline_day``, ``nadir_day``,
        ``depletion_threshold``, ``reconstitution_threshold``, ``n_visits``,
        ``n_evaluable`` and ``{subset}_pct_b_at_baseline`` / ``_at_reconstitution``.
    """
    settings = _settings(config)
    missing = [c for c in ("patient_id", "modality", "day", "lymphocytes") if c not in table]
    if missing:
        raise InputError(f"samples table lacks columns {', '.join(missing)}")
    rows = []
    for (patient, modality), visits in table.groupby(["patient_id", "modality"], sort=True):
        visits = visits.assign(day=pd.to_numeric(visits["day"])).sort_values("day")
        if visits["day"].duplicated().any():
            raise InputError(f"patient {patient!r} has two {modality} visits on one day")
        lymphocytes = _column(visits, "lymphocytes").fillna(0)
        empty_visits = visits[lymphocytes <= 0]
        evaluable = visits[lymphocytes > 0].reset_index(drop=True)
        per_ul = bool(len(evaluable)) and bool(_column(evaluable, "b_per_ul").notna().all())
        unit = "cells_per_ul" if per_ul else "pct_lymphocytes"
        group_flags: list[str] = ["no_events"] if len(empty_visits) else []
        group_flags += _discordant_visits(evaluable, settings)
        per_measure = {}
        for measure in MEASURES:
            suffix = "per_ul" if per_ul else "pct_lymphocytes"
            value = _column(evaluable, f"{measure}_{suffix}")
            lloq = _column(evaluable, f"lloq_{suffix}")
            if per_ul and lloq.isna().all():
                # An older samples table without lloq_per_ul: derive it from the % LLOQ.
                lloq = (_column(evaluable, "lloq_pct_lymphocytes") / 100.0
                        * _column(evaluable, "lymphocytes_per_ul"))
            measured = value.notna()
            result = _measure_kinetics(evaluable[measured].reset_index(drop=True),
                                       value[measured].reset_index(drop=True),
                                       lloq[measured].reset_index(drop=True),
                                       depletion=settings["depletion"][unit],
                                       reconstitution=settings["reconstitution"][unit])
            if not measured.any():
                result["flags"] = ["not_measured"]
            result["visits"] = evaluable[measured].reset_index(drop=True)
            per_measure[measure] = result
        cd19, cd20 = per_measure["cd19"], per_measure["cd20"]
        if not math.isnan(cd20["reconstitution_day"]) and (
                cd19["reconstitution_day"] > cd20["reconstitution_day"]
                or (cd19["censored"] is True)):
            group_flags.append("cd19_cd20_discordance")
        group_flags = list(dict.fromkeys(group_flags))
        for measure, result in per_measure.items():
            rows.append(_row(patient, modality, measure, unit, result, group_flags, settings,
                             n_visits=len(visits), n_evaluable=len(evaluable)))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(KINETICS_COLUMNS))
    extras = [c for c in frame.columns if c not in KINETICS_COLUMNS]
    frame = frame[list(KINETICS_COLUMNS) + extras]
    for column in ("depletion_day", "reconstitution_day", "aplasia_days", "last_day",
                   "baseline_day", "nadir_day"):
        frame[column] = pd.to_numeric(frame[column]).round().astype("Int64")
    # True: depleted and not reconstituted by last_day; empty when never depleted.
    frame["censored"] = frame["censored"].astype("boolean")
    return frame


def _discordant_visits(visits: pd.DataFrame, settings: Mapping[str, Any]) -> list[str]:
    """``cd19_cd20_discordance`` when a visit's CD19-CD20+ share is confidently high."""
    b_cells = _column(visits, "b_cells")
    cd19neg = _column(visits, "cd19neg_cd20pos")
    bound = discordance_lower_bound(cd19neg, b_cells,
                                    confidence=settings["discordance_confidence"])
    enough = b_cells >= settings["discordance_min_b"]
    if bool((enough & (bound > settings["discordance_fraction"])).any()):
        return ["cd19_cd20_discordance"]
    return []


def discordance_lower_bound(cd19neg_cd20pos: pd.Series, b_cells: pd.Series, *,
                            confidence: float = 0.95) -> pd.Series:
    """One-sided exact (Clopper-Pearson) lower confidence bound of k / n per visit.

    NaN where n is 0 or missing; 0 where k is 0.
    """
    from scipy.stats import beta

    k = pd.to_numeric(cd19neg_cd20pos, errors="coerce").astype(float)
    n = pd.to_numeric(b_cells, errors="coerce").astype(float)
    valid = (n > 0) & k.notna() & (k >= 0) & (k <= n)
    out = pd.Series(np.nan, index=k.index)
    positive = valid & (k > 0)
    out[valid & (k == 0)] = 0.0
    out[positive] = beta.ppf(1.0 - confidence, k[positive], n[positive] - k[positive] + 1.0)
    return out


def _row(patient: str, modality: str, measure: str, unit: str, result: Mapping[str, Any],
         group_flags: Sequence[str], settings: Mapping[str, Any], *, n_visits: int,
         n_evaluable: int) -> dict[str, Any]:
    """Assemble one kinetics row from a measure's result."""
    visits = result["visits"]

    def _subset_pct(row_index: int | None, subset: str) -> float:
        if row_index is None:
            return float("nan")
        return float(_column(visits, f"{subset}_pct_b").iloc[row_index])

    at_reconstitution = {s: _subset_pct(result["reconstitution_row"], s) for s in SUBSETS}
    at_baseline = {s: _subset_pct(result["baseline_row"], s) for s in SUBSETS}
    memory = at_reconstitution["unswitched_memory"] + at_reconstitution["switched_memory"]
    flags = list(result["flags"])
    if result["reconstitution_row"] is not None and memory > at_reconstitution["naive"]:
        flags.append("memory_dominant_return")
    flags = list(dict.fromkeys([*flags, *group_flags]))
    row: dict[str, Any] = {
        "patient_id": patient, "modality": modality, "measure": measure,
        "baseline_value": result["baseline_value"], "depletion_day": result["depletion_day"],
        "nadir_value": result["nadir_value"],
        "reconstitution_day": result["reconstitution_day"],
        "aplasia_days": result["aplasia_days"], "censored": result["censored"],
        "last_day": result["last_day"],
        "naive_pct_b_at_reconstitution": at_reconstitution["naive"],
        "memory_pct_b_at_reconstitution": memory,
        "transitional_pct_b_at_reconstitution": at_reconstitution["transitional"],
        "flags": ";".join(flags),
        "unit": unit, "baseline_day": result["baseline_day"], "nadir_day": result["nadir_day"],
        "depletion_threshold": settings["depletion"][unit],
        "reconstitution_threshold": settings["reconstitution"][unit],
        "n_visits": n_visits, "n_evaluable": n_evaluable,
    }
    for subset in SUBSETS:
        row[f"{subset}_pct_b_at_baseline"] = at_baseline[subset]
    for subset in SUBSETS:
        row.setdefault(f"{subset}_pct_b_at_reconstitution", at_reconstitution[subset])
    return row


def cohort_summary(kinetics: pd.DataFrame, *, config: Mapping[str, Any]) -> pd.DataFrame:
    """Cohort statistics per modality and measure (tidy table, ``COHORT_COLUMNS``)."""
    from lifelines import KaplanMeierFitter

    settings = _settings(config)
    rows: list[tuple[Any, ...]] = []
    for (modality, measure), group in kinetics.groupby(["modality", "measure"], sort=True):
        depleted = group[group["depletion_day"].notna()]
        censored = depleted["censored"].astype(bool)
        observed = depleted[~censored]
        rows += [("patients", modality, measure, len(group), len(group), ""),
                 ("patients_depleted", modality, measure, len(depleted), len(group), ""),
                 ("patients_reconstituted", modality, measure, len(observed), len(depleted),
                  "among depleted patients"),
                 ("patients_censored", modality, measure, int(censored.sum()), len(depleted),
                  "depleted, not reconstituted by the last visit")]
        aplasia = observed["aplasia_days"].astype(float)
        detail = "days from depletion to reconstitution, patients with observed reconstitution"
        n = len(aplasia)
        stats = {"aplasia_days_mean": aplasia.mean() if n else np.nan,
                 "aplasia_days_sd": aplasia.std(ddof=1) if n > 1 else np.nan,
                 "aplasia_days_median": aplasia.median() if n else np.nan,
                 "aplasia_days_min": aplasia.min() if n else np.nan,
                 "aplasia_days_max": aplasia.max() if n else np.nan}
        rows += [(name, modality, measure, value, n, detail) for name, value in stats.items()]

        if len(depleted):
            durations = np.where(censored, depleted["last_day"].astype(float),
                                 depleted["reconstitution_day"].astype(float))
            fitter = KaplanMeierFitter().fit(durations, event_observed=~censored.to_numpy())
            median = float(fitter.median_survival_time_)
            rows.append(("km_median_days_to_reconstitution", modality, measure,
                         median if np.isfinite(median) else np.nan, len(depleted),
                         "Kaplan-Meier, days from infusion, censored at the last visit"
                         + ("" if np.isfinite(median) else "; median not reached")))
            at = fitter.survival_function_at_times(settings["km_days"]).to_numpy()
            for day, still in zip(settings["km_days"], at, strict=True):
                rows.append((f"km_not_reconstituted_at_day_{day}", modality, measure,
                             float(still), len(depleted),
                             "Kaplan-Meier probability of remaining B-cell aplastic"))
        if measure == "b":
            for subset in SUBSETS:
                for when in ("baseline", "reconstitution"):
                    values = pd.to_numeric(group[f"{subset}_pct_b_at_{when}"], errors="coerce")
                    values = values.dropna()
                    rows.append((f"{subset}_pct_b_mean", modality, measure,
                                 values.mean() if len(values) else np.nan, len(values), when))
    return pd.DataFrame(rows, columns=list(COHORT_COLUMNS))


def cli_kinetics(args: argparse.Namespace) -> None:
    """``bcellmap kinetics``: samples.tsv -> kinetics.tsv and cohort.tsv."""
    from ._io import atomic_path
    from .config import load_config

    config = load_config(args.config)
    try:
        table = pd.read_csv(args.table, sep="\t", keep_default_na=False, na_values=[""],
                            dtype={"patient_id": str, "sample_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read the samples table ({exc})", path=args.table) from None
    kinetics = patient_kinetics(table, config=config)
    cohort = cohort_summary(kinetics, config=config)
    # Both outputs or neither: write to temporaries, rename only when both are complete.
    with atomic_path(args.out) as kinetics_tmp, atomic_path(args.cohort) as cohort_tmp:
        kinetics.to_csv(kinetics_tmp, sep="\t", index=False, float_format="%.10g")
        cohort.to_csv(cohort_tmp, sep="\t", index=False, float_format="%.10g")
    log.info("%d patient x modality x measure rows", len(kinetics))
