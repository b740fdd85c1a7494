"""Per-patient B-cell depletion and reconstitution, and the cohort summary.

For every patient, modality and measure (``b``: all B-lineage events, ``cd19``: CD19+,
``cd20``: CD20+), from ``results/tables/samples.tsv``:

- Unit: cells/µL when every evaluable visit of the patient and modality has an absolute
  count (``{measure}_per_ul``), else % of lymphocytes. Thresholds follow the unit
  (``kinetics.depletion`` / ``kinetics.reconstitution``).
- Evaluable visits: visits with at least one lymphocyte. A visit with zero QC-passed events
  is left out of the timeline and flagged ``no_events``; visits around it count as
  consecutive. A visit can also fail to resolve the threshold it is compared with: its
  "LLOQ" (``lloq_*``: 3 events over the lymphocytes acquired, the 95% upper bound at zero
  events) is above the threshold while its value is below it. Such visits are listed in
  ``not_evaluable_days`` (zero-event visits after infusion too).
- ``baseline_value``: the last visit with day <= 0 (none: empty, flag ``no_baseline``; the
  rest is still computed). ``low_baseline``: below the reconstitution threshold or below
  ``kinetics.low_baseline`` (prior B-cell depletion, e.g. rituximab, or sampled after
  lymphodepletion). ``baseline_after_lymphodepletion``: the baseline day is on or after the
  patient's ``lymphodepletion_day`` (optional sample-sheet column, one value per patient).
- ``depletion_day``: the first visit after infusion (day > 0) below the depletion threshold
  whose LLOQ is at or below that threshold. A visit below the threshold whose LLOQ is above
  it cannot call depletion (flag ``few_events``). No visit depleted: ``no_depletion`` only
  when every post-infusion visit was evaluable and resolved; otherwise ``not_evaluable``
  (depletion could not be assessed). Either way reconstitution is not defined and the row
  is not in the Kaplan-Meier estimate (flag ``not_in_kaplan_meier``).
- ``below_lloq``: the depletion call rests on a visit with fewer events than the LLOQ
  (value below its ``lloq_*``) whose two-sided 95% Clopper-Pearson upper bound
  (``{measure}_{unit}_ci_high``) is above the depletion threshold: "depleted" is then the
  best reading, not a certainty. (Zero events below a threshold the visit resolves carry no
  such doubt and are not flagged.) ``nadir_below_lloq`` keeps the old per-nadir reading.
- ``reconstitution_day``: after depletion, the first of two consecutive evaluable visits at
  or above the reconstitution threshold (confirmed). Visits whose value is below that
  threshold but whose LLOQ is above it cannot confirm or refute and are skipped. A
  qualifying last visit is not a reconstitution: the row is ``censored`` at ``last_day``,
  flagged ``unconfirmed``, and the day is in ``unconfirmed_reconstitution_day``.
  ``redepletion``: a later visit depleted again.
- ``time_to_reconstitution_days``: days from infusion (day 0) to reconstitution, or to
  ``last_day`` when ``censored``; the primary figure, as papers report it.
- ``aplasia_days``: reconstitution_day - depletion_day, or last_day - depletion_day when
  ``censored`` (depleted and not reconstituted, confirmed, by ``last_day``).
- Subsets at reconstitution from that visit; ``memory`` = unswitched + switched memory;
  ``memory_dominant_return`` when memory > naive on at least ``kinetics.loq_events`` B
  events (``memory_dominant_return_below_loq`` on fewer).
- ``cd19_cd20_discordance`` (on every row of the patient and modality): a visit whose
  CD19-CD20+ share of B events is above ``discordance.fraction_b`` with one-sided
  ``discordance.confidence`` (the exact Clopper-Pearson lower bound of k CD19-CD20+ out of
  n B events exceeds it; n >= ``discordance.min_b_cells``), or CD20 reconstituting before
  (or without) CD19: CD19 masking or escape. Masking happens when B cells are rare, so the
  flag rests on the confidence bound, not on a large event minimum: 22 of 23 B events
  CD19-CD20+ is flagged (lower bound 0.81), 1 of 3 is not.

The cohort table (tidy: statistic, modality, measure, value, n, detail, unit) is stratified
by unit: patients measured in cells/µL and in % of lymphocytes are never pooled. It has the
time from infusion to reconstitution (primary) and the aplasia duration (mean, SD, median,
range) over patients with an observed (confirmed) reconstitution, counts of depleted,
reconstituted, censored, unconfirmed, not evaluable and not-in-Kaplan-Meier patients, a
Kaplan-Meier estimate (lifelines) of the time from infusion to reconstitution among depleted
patients, censored at the last visit (unconfirmed returns included), and mean subset
composition at baseline and at reconstitution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..contracts import COHORT_COLUMNS, KINETICS_COLUMNS, SUBSETS
from ..errors import InputError

log = logging.getLogger(__name__)

MEASURES = ("b", "cd19", "cd20")
_COUNT_COLUMN = {"b": "b_cells", "cd19": "cd19_pos", "cd20": "cd20_pos"}
_MEMORY = ("unswitched_memory", "switched_memory")


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kinetics`` settings of a loaded config, in the shape the functions use."""
    from ..config import section

    settings = section(config, "kinetics")
    depletion, reconstitution = settings["depletion"], settings["reconstitution"]
    discordance, low_baseline = settings["discordance"], settings["low_baseline"]
    return {
        "depletion": {"cells_per_ul": float(depletion["per_ul"]),
                      "pct_lymphocytes": float(depletion["pct_lymphocytes"])},
        "reconstitution": {"cells_per_ul": float(reconstitution["per_ul"]),
                           "pct_lymphocytes": float(reconstitution["pct_lymphocytes"])},
        "discordance_fraction": float(discordance["fraction_b"]),
        "discordance_min_b": float(discordance["min_b_cells"]),
        "discordance_confidence": float(discordance["confidence"]),
        "km_days": [int(d) for d in settings["km_days"]],
        "loq_events": float(settings["loq_events"]),
        "low_baseline": {"cells_per_ul": float(low_baseline["per_ul"]),
                         "pct_lymphocytes": float(low_baseline["pct_lymphocytes"])},
    }


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, all-NaN when the table lacks it."""
    if name not in table.columns:
        return pd.Series(np.nan, index=table.index)
    return pd.to_numeric(table[name], errors="coerce")


def _measure_kinetics(visits: pd.DataFrame, value: pd.Series, lloq: pd.Series,
                      upper: pd.Series, *, depletion: float, reconstitution: float,
                      low_baseline: float, lymphodepletion_day: float = math.nan,
                      empty_days: Sequence[int] = (),
                      gate_days: Sequence[int] = ()) -> dict[str, Any]:
    """Kinetics of one measure over one patient's evaluable visits (sorted by day).

    ``upper`` is each visit's two-sided 95% upper bound of the value; ``empty_days`` are the
    patient's visits without events and ``gate_days`` those whose value rests on an
    unreliable gate (neither is in ``visits``).
    """
    days = visits["day"].to_numpy()
    values = value.to_numpy(dtype=float)
    lloqs = lloq.to_numpy(dtype=float)
    uppers = upper.to_numpy(dtype=float)
    flags: list[str] = []
    out: dict[str, Any] = {"baseline_value": np.nan, "baseline_day": np.nan,
                           "depletion_day": np.nan, "nadir_value": np.nan, "nadir_day": np.nan,
                           "nadir_below_lloq": None, "reconstitution_day": np.nan,
                           "unconfirmed_reconstitution_day": np.nan, "aplasia_days": np.nan,
                           "time_to_reconstitution_days": np.nan, "censored": None,
                           "last_day": days.max() if days.size else np.nan,
                           "not_evaluable_days": ""}
    baseline = np.flatnonzero(days <= 0)
    baseline_row = baseline[-1] if baseline.size else None
    if baseline_row is not None:
        out["baseline_value"] = values[baseline_row]
        out["baseline_day"] = days[baseline_row]
        if values[baseline_row] < max(reconstitution, low_baseline):
            flags.append("low_baseline")
        if not math.isnan(lymphodepletion_day) and days[baseline_row] >= lymphodepletion_day:
            flags.append("baseline_after_lymphodepletion")
    else:
        flags.append("no_baseline")
    post = np.flatnonzero(days > 0)
    below = values < depletion
    resolvable = lloqs <= depletion
    unresolved = [i for i in post if below[i] and not resolvable[i]]
    empty_post = sorted(int(d) for d in [*empty_days, *gate_days] if d > 0)
    not_evaluable = sorted({*empty_post, *(int(days[i]) for i in unresolved)})
    if gate_days:
        flags.append("gate_not_evaluable")
    out["not_evaluable_days"] = ";".join(str(d) for d in not_evaluable)
    result = {"reconstitution_row": None, "baseline_row": baseline_row}
    if post.size == 0:
        flags += ["not_evaluable"] if empty_post else ["no_follow_up"]
        flags.append("not_in_kaplan_meier")
        return {**out, **result, "flags": flags}
    nadir = post[int(np.argmin(values[post]))]
    out["nadir_value"] = values[nadir]
    out["nadir_day"] = days[nadir]
    out["nadir_below_lloq"] = bool(values[nadir] < lloqs[nadir])

    depleted = [i for i in post if below[i] and resolvable[i]]
    if unresolved:
        flags.append("few_events")
    if not depleted:
        # Never "no_depletion" when a visit could not show it.
        flags += ["not_evaluable" if not_evaluable else "no_depletion", "not_in_kaplan_meier"]
        return {**out, **result, "flags": flags}
    first = depleted[0]
    out["depletion_day"] = days[first]
    if values[first] < lloqs[first] and uppers[first] > depletion:
        flags.append("below_lloq")
    # Visits that can confirm or refute reconstitution: at or above the threshold, or below
    # it with an LLOQ that resolves it (a missing LLOQ counts as resolving).
    candidates = [i for i in post if i > first
                  and (values[i] >= reconstitution or not lloqs[i] > reconstitution)]
    reconstitution_row = None
    for position, i in enumerate(candidates):
        if values[i] < reconstitution:
            continue
        if position + 1 == len(candidates):
            out["unconfirmed_reconstitution_day"] = days[i]
            flags.append("unconfirmed")
            break
        if values[candidates[position + 1]] >= reconstitution:
            reconstitution_row = i
            break
    if reconstitution_row is None:
        out["censored"] = True
        out["aplasia_days"] = out["last_day"] - days[first]
        out["time_to_reconstitution_days"] = out["last_day"]
    else:
        out["censored"] = False
        out["reconstitution_day"] = days[reconstitution_row]
        out["aplasia_days"] = days[reconstitution_row] - days[first]
        out["time_to_reconstitution_days"] = days[reconstitution_row]
        if any(below[i] and resolvable[i] for i in post if i > reconstitution_row):
            flags.append("redepletion")
    result["reconstitution_row"] = reconstitution_row
    return {**out, **result, "flags": flags}


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
        ``n_evaluable``, ``{subset}_pct_b_at_baseline`` / ``_at_reconstitution``,
        ``time_to_reconstitution_days``, ``unconfirmed_reconstitution_day``,
        ``not_evaluable_days``, ``lymphodepletion_day``, ``nadir_below_lloq`` and
        ``low_baseline_threshold``.
    """
    settings = _settings(config)
    missing = [c for c in ("patient_id", "modality", "day", "lymphocytes") if c not in table]
    if missing:
        raise InputError(f"samples table lacks columns {', '.join(missing)}")
    lymphodepletion = _lymphodepletion_days(table)
    rows = []
    for (patient, modality), visits in table.groupby(["patient_id", "modality"], sort=True):
        visits = visits.assign(day=pd.to_numeric(visits["day"])).sort_values("day")
        if visits["day"].duplicated().any():
            raise InputError(f"patient {patient!r} has two {modality} visits on one day")
        lymphocytes = _column(visits, "lymphocytes")
        # A visit whose lymphocytes rest on an unreliable gate had events: it is kept, its
        # values are NA (not evaluable), never "no events".
        gated_out = lymphocytes.isna() & _rests_on_gate(visits, "lymphocytes")
        empty_visits = visits[(lymphocytes.fillna(0) <= 0) & ~gated_out]
        evaluable = visits[(lymphocytes > 0) | gated_out].reset_index(drop=True)
        per_ul = bool(len(evaluable)) and bool(
            _column(evaluable, "lymphocytes_per_ul").notna().all())
        unit = "cells_per_ul" if per_ul else "pct_lymphocytes"
        group_flags: list[str] = ["no_events"] if len(empty_visits) else []
        group_flags += _discordant_visits(evaluable, settings)
        per_measure = {}
        empty_days = [int(d) for d in empty_visits["day"]]
        ld_day = lymphodepletion.get(patient, math.nan)
        for measure in MEASURES:
            suffix = "per_ul" if per_ul else "pct_lymphocytes"
            value = _column(evaluable, f"{measure}_{suffix}")
            lloq = _column(evaluable, f"lloq_{suffix}")
            if per_ul and lloq.isna().all():
                # An older samples table without lloq_per_ul: derive it from the % LLOQ.
                lloq = (_column(evaluable, "lloq_pct_lymphocytes") / 100.0
                        * _column(evaluable, "lymphocytes_per_ul"))
            upper = _upper_bound(evaluable, measure, per_ul=per_ul)
            measured = value.notna()
            gate_days = [int(d) for d in evaluable.loc[
                ~measured & _rests_on_gate(evaluable, _COUNT_COLUMN[measure]), "day"]]
            result = _measure_kinetics(evaluable[measured].reset_index(drop=True),
                                       value[measured].reset_index(drop=True),
                                       lloq[measured].reset_index(drop=True),
                                       upper[measured].reset_index(drop=True),
                                       depletion=settings["depletion"][unit],
                                       reconstitution=settings["reconstitution"][unit],
                                       low_baseline=settings["low_baseline"][unit],
                                       lymphodepletion_day=ld_day, empty_days=empty_days,
                                       gate_days=gate_days)
            if not measured.any():
                result["flags"] = (
                    ["not_evaluable", "gate_not_evaluable", "not_in_kaplan_meier"] if gate_days
                    else ["not_evaluable" if evaluable.empty else "not_measured",
                          "not_in_kaplan_meier"])
            result["visits"] = evaluable[measured].reset_index(drop=True)
            result["lymphodepletion_day"] = ld_day
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
                   "baseline_day", "nadir_day", "time_to_reconstitution_days",
                   "unconfirmed_reconstitution_day", "lymphodepletion_day"):
        frame[column] = pd.to_numeric(frame[column]).round().astype("Int64")
    # True: depleted and not reconstituted by last_day; empty when never depleted.
    frame["censored"] = frame["censored"].astype("boolean")
    frame["nadir_below_lloq"] = frame["nadir_below_lloq"].astype("boolean")
    return frame


def _rests_on_gate(visits: pd.DataFrame, column: str) -> pd.Series:
    """Visits whose ``column`` (or their lymphocytes) is not evaluable: it rests on an
    unreliable gate (``not_evaluable`` of the samples table)."""
    if "not_evaluable" not in visits.columns:
        return pd.Series(False, index=visits.index)
    listed = visits["not_evaluable"].fillna("").astype(str).str.split(";")
    return listed.apply(lambda names: column in names or "lymphocytes" in names)


def _lymphodepletion_days(table: pd.DataFrame) -> dict[Any, float]:
    """Each patient's ``lymphodepletion_day`` (optional column; one value per patient)."""
    days = _column(table, "lymphodepletion_day")
    out: dict[Any, float] = {}
    for patient, values in days.groupby(table["patient_id"]):
        distinct = sorted(set(values.dropna()))
        if len(distinct) > 1:
            raise InputError(f"patient {patient!r} has more than one lymphodepletion_day "
                             f"({', '.join(f'{d:g}' for d in distinct)})")
        if distinct:
            out[patient] = float(distinct[0])
    return out


def _upper_bound(visits: pd.DataFrame, measure: str, *, per_ul: bool) -> pd.Series:
    """Each visit's two-sided 95% upper bound of the measure, in the timeline's unit.

    From ``{measure}_{unit}_ci_high`` (quantify); for an older table, from the counts.
    """
    column = f"{measure}_per_ul_ci_high" if per_ul else f"{measure}_pct_lymphocytes_ci_high"
    if column in visits.columns:
        return _column(visits, column)
    from ._quantify import clopper_pearson

    _, high = clopper_pearson(_column(visits, _COUNT_COLUMN[measure]),
                              _column(visits, "lymphocytes"))
    return high * (_column(visits, "lymphocytes_per_ul") if per_ul else 100.0)


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
        # A composition of a handful of events is no finding: below the limit of
        # quantification (kinetics.loq_events B events) the flag says so instead.
        b_events = float(_column(visits, "b_cells").iloc[result["reconstitution_row"]])
        flags.append("memory_dominant_return" if b_events >= settings["loq_events"]
                     else "memory_dominant_return_below_loq")
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
        "time_to_reconstitution_days": result.get("time_to_reconstitution_days", np.nan),
        "unconfirmed_reconstitution_day": result.get("unconfirmed_reconstitution_day", np.nan),
        "not_evaluable_days": result.get("not_evaluable_days", ""),
        "lymphodepletion_day": result.get("lymphodepletion_day", np.nan),
        "nadir_below_lloq": result.get("nadir_below_lloq"),
        "low_baseline_threshold": max(settings["low_baseline"][unit],
                                      settings["reconstitution"][unit]),
    }
    for subset in SUBSETS:
        row[f"{subset}_pct_b_at_baseline"] = at_baseline[subset]
    for subset in SUBSETS:
        row.setdefault(f"{subset}_pct_b_at_reconstitution", at_reconstitution[subset])
    return row


def cohort_summary(kinetics: pd.DataFrame, *, config: Mapping[str, Any]) -> pd.DataFrame:
    """Cohort statistics per modality, measure and unit (tidy table, ``COHORT_COLUMNS``).

    Patients in cells/µL and in % of lymphocytes are never pooled: their depletion and
    reconstitution rest on different thresholds (0.1% of 300 lymphocytes/µL is 0.3/µL).
    """
    from lifelines import KaplanMeierFitter

    settings = _settings(config)
    kinetics = kinetics.copy()
    if "unit" not in kinetics.columns:
        kinetics["unit"] = "unspecified"
    kinetics["unit"] = kinetics["unit"].fillna("unspecified")
    rows: list[tuple[Any, ...]] = []
    for (modality, measure, unit), group in kinetics.groupby(["modality", "measure", "unit"],
                                                             sort=True):
        flags = group.get("flags", pd.Series("", index=group.index)).fillna("").astype(str)
        flag_sets = flags.str.split(";").apply(set)
        depleted = group[group["depletion_day"].notna()]
        censored = depleted["censored"].astype(bool)
        observed = depleted[~censored]
        unconfirmed = flag_sets[depleted.index].apply(lambda f: "unconfirmed" in f)
        not_evaluable = group["depletion_day"].isna() & flag_sets.apply(
            lambda f: "not_evaluable" in f)

        def add(name: str, value: Any, n: int, detail: str = "") -> None:
            rows.append((name, modality, measure, value, n, detail, unit))  # noqa: B023

        add("patients", len(group), len(group))
        add("patients_depleted", len(depleted), len(group))
        add("patients_reconstituted", len(observed), len(depleted),
            "among depleted patients; confirmed on the next evaluable visit")
        add("patients_censored", int(censored.sum()), len(depleted),
            "depleted, not reconstituted (confirmed) by the last visit")
        add("patients_unconfirmed", int((censored & unconfirmed).sum()), len(depleted),
            "censored: the last visit qualified but nothing confirmed it")
        add("patients_not_evaluable", int(not_evaluable.sum()), len(group),
            "depletion could not be assessed (too few lymphocytes or no events)")
        add("patients_not_in_kaplan_meier", len(group) - len(depleted), len(group),
            "never depleted, depletion not evaluable, or no follow-up")
        gated = flag_sets.apply(lambda f: "gate_not_evaluable" in f)
        add("patients_gate_not_evaluable", int(gated.sum()), len(group),
            "visits left out because their values rest on an unreliable or nonspecific gate"
            + (f": {', '.join(map(str, group.loc[gated, 'patient_id']))}"
               if gated.any() else ""))
        for stem, values, detail in (
                ("time_to_reconstitution_days", observed["reconstitution_day"],
                 "primary: days from infusion (day 0) to confirmed reconstitution, "
                 "patients with observed reconstitution"),
                ("aplasia_days", observed["aplasia_days"],
                 "days from the depletion visit to confirmed reconstitution, patients with "
                 "observed reconstitution")):
            values = pd.to_numeric(values, errors="coerce").astype(float)
            n = len(values)
            stats = {"mean": values.mean() if n else np.nan,
                     "sd": values.std(ddof=1) if n > 1 else np.nan,
                     "median": values.median() if n else np.nan,
                     "min": values.min() if n else np.nan,
                     "max": values.max() if n else np.nan}
            for name, value in stats.items():
                add(f"{stem}_{name}", value, n, detail)

        if len(depleted):
            durations = np.where(censored, depleted["last_day"].astype(float),
                                 depleted["reconstitution_day"].astype(float))
            fitter = KaplanMeierFitter().fit(durations, event_observed=~censored.to_numpy())
            median = float(fitter.median_survival_time_)
            add("km_median_days_to_reconstitution",
                median if np.isfinite(median) else np.nan, len(depleted),
                "Kaplan-Meier, days from infusion, censored at the last visit (unconfirmed "
                "returns censored)" + ("" if np.isfinite(median) else "; median not reached"))
            at = fitter.survival_function_at_times(settings["km_days"]).to_numpy()
            follow_up = float(np.max(durations))
            ended = float(fitter.survival_function_at_times([follow_up]).iloc[0]) == 0.0
            for day, still in zip(settings["km_days"], at, strict=True):
                # Beyond the last time anyone was at risk the estimate is not defined
                # (lifelines would carry its last value forward), unless it had reached 0.
                beyond = day > follow_up and not ended
                add(f"km_not_reconstituted_at_day_{day}", np.nan if beyond else float(still),
                    len(depleted), "Kaplan-Meier probability of remaining B-cell aplastic"
                    + (f"; not estimable: follow-up ends at day {follow_up:g}" if beyond
                       else ""))
        if measure == "b":
            for subset in SUBSETS:
                for when in ("baseline", "reconstitution"):
                    values = pd.to_numeric(group[f"{subset}_pct_b_at_{when}"], errors="coerce")
                    values = values.dropna()
                    add(f"{subset}_pct_b_mean", values.mean() if len(values) else np.nan,
                        len(values), when)
    return pd.DataFrame(rows, columns=list(COHORT_COLUMNS))
