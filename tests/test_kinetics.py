"""Kinetics on hand-made timelines; cohort statistics against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bcellmap.cli import main
from bcellmap.cohort._kinetics import KINETICS_COLUMNS, cohort_summary, patient_kinetics
from bcellmap.config import load_config
from bcellmap.errors import InputError, SampleSheetError
from bcellmap.flow.annotate import SUBSETS
from bcellmap.io.samplesheet import read_sample_sheet

HEALTHY = {"naive": 70.0, "transitional": 4.0, "unswitched_memory": 10.0,
           "switched_memory": 12.0, "double_negative": 3.0, "plasmablast": 1.0}


def _visit(patient: str, day: int, b_pct: float, *, lymphocytes: int = 20000,
           per_ul: float | None = None, cd19neg_share: float = 0.0,
           cd20_pct: float | None = None, subsets: dict[str, float] | None = None) -> dict:
    """One samples.tsv row: counts derived from the percentages as quantify would."""
    b = round(b_pct / 100 * lymphocytes)
    cd20 = b_pct if cd20_pct is None else cd20_pct
    row = {"sample_id": f"{patient}_d{day}", "patient_id": patient, "day": day,
           "modality": "flow", "lymphocytes": lymphocytes, "b_cells": b,
           "cd19neg_cd20pos": round(cd19neg_share * b),
           "b_pct_lymphocytes": b_pct if lymphocytes else math.nan,
           "cd19_pct_lymphocytes": (b_pct * (1 - cd19neg_share)) if lymphocytes else math.nan,
           "cd20_pct_lymphocytes": cd20 if lymphocytes else math.nan,
           "lloq_pct_lymphocytes": 300.0 / lymphocytes if lymphocytes else math.nan}
    factor = math.nan if per_ul is None else per_ul / 100
    for name in ("b", "cd19", "cd20"):
        row[f"{name}_per_ul"] = row[f"{name}_pct_lymphocytes"] * factor
    row["lloq_per_ul"] = row["lloq_pct_lymphocytes"] * factor
    row["lymphocytes_per_ul"] = math.nan if per_ul is None else per_ul
    for subset in SUBSETS:
        row[f"{subset}_pct_b"] = (subsets or HEALTHY)[subset] if b else math.nan
    return row


RETURNING = {"naive": 80.0, "transitional": 15.0, "unswitched_memory": 2.0,
             "switched_memory": 1.0, "double_negative": 1.5, "plasmablast": 0.5}
MEMORY_RETURN = {"naive": 30.0, "transitional": 5.0, "unswitched_memory": 20.0,
                 "switched_memory": 30.0, "double_negative": 10.0, "plasmablast": 5.0}


@pytest.fixture(scope="module")
def kinetics() -> pd.DataFrame:
    v = _visit
    rows = [
        # P1: depleted day 7, back on 120 (and 150): aplasia 113 days.
        v("P1", -7, 10.0), v("P1", 7, 0.0), v("P1", 30, 0.0), v("P1", 90, 0.5),
        v("P1", 120, 2.0, subsets=RETURNING), v("P1", 150, 3.0),
        # P2: qualifying last visit only: reconstitution unconfirmed.
        v("P2", -3, 8.0), v("P2", 14, 0.0), v("P2", 60, 0.0), v("P2", 100, 1.5),
        # P3: never back: censored at day 200.
        v("P3", -1, 5.0), v("P3", 10, 0.0), v("P3", 60, 0.05), v("P3", 200, 0.5),
        # P4: back on 80, depleted again on 150; a single high visit (60) does not count.
        v("P4", -1, 5.0), v("P4", 10, 0.0), v("P4", 60, 2.0), v("P4", 70, 0.5),
        v("P4", 80, 2.0), v("P4", 110, 3.0), v("P4", 150, 0.0),
        # P5: never below 0.1 %.
        v("P5", -1, 5.0), v("P5", 30, 0.5), v("P5", 60, 3.0),
        # P6: memory-dominant return.
        v("P6", -1, 5.0), v("P6", 20, 0.0), v("P6", 100, 2.0, subsets=MEMORY_RETURN),
        v("P6", 130, 2.0),
        # P7: CD19-CD20+ B events at day 100 (40 % of 600 B events), CD20 back first.
        v("P7", -1, 5.0), v("P7", 20, 0.0), v("P7", 100, 3.0, cd19neg_share=0.4),
        v("P7", 130, 3.0, cd19neg_share=0.4),
        # P8: no baseline visit.
        v("P8", 10, 0.0), v("P8", 100, 2.0), v("P8", 130, 2.0),
        # P9: a visit without events (day 10) is not evaluable: depletion is day 30.
        v("P9", -1, 5.0), v("P9", 10, 0.0, lymphocytes=0), v("P9", 30, 0.0),
        # P10: 0 B events out of 1000 lymphocytes (LLOQ 0.3 %) cannot show < 0.1 %.
        v("P10", -1, 5.0), v("P10", 10, 0.0, lymphocytes=1000), v("P10", 30, 0.0),
        # P11: absolute counts: 1000 lymphocytes/µL; 0.05 % = 0.5 cells/µL; 1.2 % = 12/µL.
        v("P11", -1, 10.0, per_ul=1000), v("P11", 14, 0.05, per_ul=1000),
        v("P11", 90, 1.2, per_ul=1000), v("P11", 120, 1.5, per_ul=1000),
    ]
    return patient_kinetics(pd.DataFrame(rows), config=load_config())


def _get(kinetics: pd.DataFrame, patient: str, measure: str = "b") -> pd.Series:
    rows = kinetics[(kinetics["patient_id"] == patient) & (kinetics["measure"] == measure)]
    assert len(rows) == 1
    return rows.iloc[0]


def _flags(row: pd.Series) -> set[str]:
    return set(filter(None, row["flags"].split(";")))


def test_columns_and_rows(kinetics):
    assert list(kinetics.columns[:len(KINETICS_COLUMNS)]) == list(KINETICS_COLUMNS)
    assert len(kinetics) == 11 * 3


def test_depletion_reconstitution_and_subsets(kinetics):
    row = _get(kinetics, "P1")
    assert (row["baseline_value"], row["depletion_day"], row["reconstitution_day"]) == (
        10.0, 7, 120)
    assert row["aplasia_days"] == 113 and not row["censored"] and row["last_day"] == 150
    # 0 of 20000 resolves 0.1 % (upper bound 0.018 %): the depletion call is certain, so
    # no below_lloq; the nadir itself is below the LLOQ.
    assert row["nadir_value"] == 0.0 and "below_lloq" not in _flags(row)
    assert bool(row["nadir_below_lloq"])
    assert row["time_to_reconstitution_days"] == 120
    assert "not_in_kaplan_meier" not in _flags(row) and "low_baseline" not in _flags(row)
    assert row["naive_pct_b_at_reconstitution"] == 80.0
    assert row["memory_pct_b_at_reconstitution"] == 3.0
    assert row["transitional_pct_b_at_reconstitution"] == 15.0
    assert row["unit"] == "pct_lymphocytes"
    assert "memory_dominant_return" not in _flags(row)


def test_unconfirmed_censored_redepletion_no_depletion(kinetics):
    # P2: 1.5 % on the last visit (day 100) and nothing after it: censored, not an event.
    p2 = _get(kinetics, "P2")
    assert pd.isna(p2["reconstitution_day"]) and "unconfirmed" in _flags(p2)
    assert p2["censored"] and p2["unconfirmed_reconstitution_day"] == 100
    assert p2["aplasia_days"] == 100 - 14 and p2["time_to_reconstitution_days"] == 100
    assert pd.isna(p2["naive_pct_b_at_reconstitution"])
    p3 = _get(kinetics, "P3")
    assert p3["censored"] and pd.isna(p3["reconstitution_day"])
    assert p3["aplasia_days"] == 190 and p3["last_day"] == 200
    p4 = _get(kinetics, "P4")
    assert p4["reconstitution_day"] == 80 and "redepletion" in _flags(p4)
    p5 = _get(kinetics, "P5")
    assert "no_depletion" in _flags(p5) and pd.isna(p5["depletion_day"])
    assert "not_in_kaplan_meier" in _flags(p5) and "not_evaluable" not in _flags(p5)
    assert p5["not_evaluable_days"] == ""
    assert pd.isna(p5["aplasia_days"]) and pd.isna(p5["censored"])


def test_memory_return_discordance_baseline_events(kinetics):
    assert "memory_dominant_return" in _flags(_get(kinetics, "P6"))
    p7 = _get(kinetics, "P7")
    assert "cd19_cd20_discordance" in _flags(p7)
    # CD19: 3 % x 0.6 = 1.8 % >= 1 %, so both return on day 100: the flag is from the share.
    assert _get(kinetics, "P7", "cd19")["reconstitution_day"] == 100
    assert "cd19_cd20_discordance" not in _flags(_get(kinetics, "P1"))
    p8 = _get(kinetics, "P8")
    assert "no_baseline" in _flags(p8) and pd.isna(p8["baseline_value"])
    assert p8["depletion_day"] == 10 and p8["reconstitution_day"] == 100
    p9 = _get(kinetics, "P9")
    assert "no_events" in _flags(p9) and p9["depletion_day"] == 30
    assert p9["not_evaluable_days"] == "10"
    p10 = _get(kinetics, "P10")
    assert "few_events" in _flags(p10) and p10["depletion_day"] == 30
    assert p10["not_evaluable_days"] == "10"


def test_absolute_counts_use_cells_per_ul(kinetics):
    row = _get(kinetics, "P11")
    assert row["unit"] == "cells_per_ul"
    assert row["baseline_value"] == pytest.approx(100.0)
    assert row["depletion_day"] == 14 and row["reconstitution_day"] == 90
    assert row["depletion_threshold"] == 1.0 and row["reconstitution_threshold"] == 10.0


def test_cd20_returning_before_cd19_is_discordant():
    rows = [_visit("Q", -1, 5.0), _visit("Q", 20, 0.0),
            _visit("Q", 100, 0.05, cd20_pct=2.0), _visit("Q", 130, 0.05, cd20_pct=2.0)]
    table = patient_kinetics(pd.DataFrame(rows), config=load_config())
    assert _get(table, "Q", "cd20")["reconstitution_day"] == 100
    assert _get(table, "Q", "cd19")["censored"]
    assert "cd19_cd20_discordance" in _flags(_get(table, "Q", "b"))


def test_duplicate_visit_days_are_refused_by_the_sample_sheet(tmp_path):
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{"sample_id": s, "patient_id": "P1", "day": 30, "modality": "flow",
                   "path": "x.fcs"} for s in ("a", "b")]).to_csv(sheet, sep="\t", index=False)
    with pytest.raises(SampleSheetError, match="two flow samples on day 30"):
        read_sample_sheet(sheet, check_files=False)


def test_confirmation_skips_a_visit_that_cannot_resolve_the_threshold():
    # Day 110: 0 B of 200 lymphocytes, LLOQ 3 / 200 = 1.5 % > 1 %: it neither confirms nor
    # refutes; day 130 (2 %) confirms day 100. Day 110 is also below 0.1 % without
    # resolving it: not evaluable for depletion (few_events).
    rows = [_visit("R", -1, 5.0), _visit("R", 10, 0.0), _visit("R", 100, 2.0),
            _visit("R", 110, 0.0, lymphocytes=200), _visit("R", 130, 2.0)]
    row = _get(patient_kinetics(pd.DataFrame(rows), config=load_config()), "R")
    assert (row["depletion_day"], row["reconstitution_day"]) == (10, 100)
    assert row["time_to_reconstitution_days"] == 100 and row["aplasia_days"] == 90
    assert not row["censored"] and "unconfirmed" not in _flags(row)
    assert row["not_evaluable_days"] == "110" and "few_events" in _flags(row)
    # A resolving low visit (0 of 20000) between the two breaks the confirmation: day 130
    # is then a qualifying last visit, unconfirmed and censored at 130.
    rows[3] = _visit("R", 110, 0.0)
    row = _get(patient_kinetics(pd.DataFrame(rows), config=load_config()), "R")
    assert row["censored"] and pd.isna(row["reconstitution_day"])
    assert row["unconfirmed_reconstitution_day"] == 130 and "unconfirmed" in _flags(row)
    assert row["aplasia_days"] == 120 and row["time_to_reconstitution_days"] == 130


def test_unresolvable_visits_are_not_evaluable_never_no_depletion():
    rows = [
        # N1: 0 B of 1000 lymphocytes (LLOQ 0.3 % > 0.1 %) and 0.5 % after: could have
        # been depleted on day 10, cannot be told.
        _visit("N1", -1, 5.0), _visit("N1", 10, 0.0, lymphocytes=1000), _visit("N1", 30, 0.5),
        # N2: no events on day 10; day 30 is not depleted.
        _visit("N2", -1, 5.0), _visit("N2", 10, 0.0, lymphocytes=0), _visit("N2", 30, 0.5),
        # N3: never a lymphocyte.
        _visit("N3", -1, 0.0, lymphocytes=0), _visit("N3", 10, 0.0, lymphocytes=0),
    ]
    table = patient_kinetics(pd.DataFrame(rows), config=load_config())
    for patient, days in (("N1", "10"), ("N2", "10"), ("N3", "10")):
        row = _get(table, patient)
        flags = _flags(row)
        assert "not_evaluable" in flags and "no_depletion" not in flags, patient
        assert "not_in_kaplan_meier" in flags, patient
        assert pd.isna(row["depletion_day"]) and pd.isna(row["censored"]), patient
        assert row["not_evaluable_days"] == days, patient
    assert _get(table, "N3")["n_evaluable"] == 0
    cohort = cohort_summary(table, config=load_config())
    b = cohort[cohort["measure"] == "b"].set_index("statistic")
    assert b.loc["patients", "value"] == 3
    assert b.loc["patients_not_evaluable", "value"] == 3
    assert b.loc["patients_not_in_kaplan_meier", "value"] == 3
    assert b.loc["patients_depleted", "value"] == 0


def test_low_baseline_and_baseline_after_lymphodepletion():
    rows = [
        # L1: baseline 0.5 % < 1 % (reconstitution threshold): already low.
        _visit("L1", -7, 0.5), _visit("L1", 14, 0.0),
        # L2: baseline 1.5 %: low only with kinetics.low_baseline.pct_lymphocytes 2.
        _visit("L2", -7, 1.5), _visit("L2", 14, 0.0),
        # L3: 1000 lymphocytes/µL x 0.8 % = 8 cells/µL < 10 /µL.
        _visit("L3", -7, 0.8, per_ul=1000), _visit("L3", 14, 0.0, per_ul=1000),
        # L4: baseline drawn on day -3, lymphodepletion on day -5: after it.
        _visit("L4", -3, 5.0), _visit("L4", 14, 0.0),
        # L5: baseline on day -7, before lymphodepletion on day -5.
        _visit("L5", -7, 5.0), _visit("L5", 14, 0.0),
    ]
    frame = pd.DataFrame(rows)
    frame["lymphodepletion_day"] = np.where(frame["patient_id"].isin(["L4", "L5"]), -5,
                                            np.nan)
    table = patient_kinetics(frame, config=load_config())
    flagged = {p for p in ("L1", "L2", "L3", "L4", "L5")
               if "low_baseline" in _flags(_get(table, p))}
    assert flagged == {"L1", "L3"}
    after = {p for p in ("L1", "L2", "L3", "L4", "L5")
             if "baseline_after_lymphodepletion" in _flags(_get(table, p))}
    assert after == {"L4"}
    assert _get(table, "L4")["lymphodepletion_day"] == -5
    assert _get(table, "L3")["depletion_day"] == 14  # the flag changes no call
    config = load_config()
    config["kinetics"]["low_baseline"] = {"per_ul": 50.0, "pct_lymphocytes": 2.0}
    table = patient_kinetics(frame, config=config)
    assert "low_baseline" in _flags(_get(table, "L2"))
    assert _get(table, "L2")["low_baseline_threshold"] == 2.0
    # One lymphodepletion day per patient.
    frame.loc[frame.index[-1], "lymphodepletion_day"] = -4
    with pytest.raises(InputError, match="lymphodepletion_day"):
        patient_kinetics(frame, config=load_config())


def test_below_lloq_only_where_the_depletion_call_is_uncertain():
    # 0 B of 3300 lymphocytes: LLOQ 3 / 3300 = 0.0909 % <= 0.1 % calls depletion, but the
    # two-sided 95% upper bound 100 * (1 - 0.025^(1/3300)) = 0.1118 % is above 0.1 %.
    # 0 of 20000: upper bound 0.0184 % < 0.1 %: no flag.
    upper_3300 = 100 * (1 - 0.025 ** (1 / 3300))
    assert upper_3300 == pytest.approx(0.1118, abs=1e-4)
    rows = [_visit("U", -1, 5.0), _visit("U", 10, 0.0, lymphocytes=3300),
            _visit("C", -1, 5.0), _visit("C", 10, 0.0)]
    frame = pd.DataFrame(rows)
    table = patient_kinetics(frame, config=load_config())  # bound from the counts
    assert "below_lloq" in _flags(_get(table, "U"))
    assert _get(table, "U")["depletion_day"] == 10
    assert "below_lloq" not in _flags(_get(table, "C"))
    # The same from quantify's interval column.
    frame["b_pct_lymphocytes_ci_high"] = [10.0, upper_3300, 10.0, 0.0184]
    table = patient_kinetics(frame, config=load_config())
    assert "below_lloq" in _flags(_get(table, "U"))
    assert "below_lloq" not in _flags(_get(table, "C"))


def _cohort_input() -> pd.DataFrame:
    # Infusion-to-reconstitution times: 100, 120, 200 observed; censored at 90 and 150.
    rows = []
    for patient, recon, last, censored in (("A", 100, 130, False), ("B", 120, 150, False),
                                            ("C", None, 150, True), ("D", 200, 230, False),
                                            ("E", None, 90, True)):
        row = {"patient_id": patient, "modality": "flow", "measure": "b",
               "depletion_day": 10, "reconstitution_day": recon, "last_day": last,
               "censored": censored,
               "aplasia_days": (recon if recon else last) - 10}
        for subset in SUBSETS:
            row[f"{subset}_pct_b_at_baseline"] = HEALTHY[subset]
            row[f"{subset}_pct_b_at_reconstitution"] = (
                RETURNING[subset] if recon else math.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["reconstitution_day"] = frame["reconstitution_day"].astype("Int64")
    return frame


def test_cohort_aplasia_and_kaplan_meier_against_hand_computation():
    cohort = cohort_summary(_cohort_input(), config=load_config())
    value = cohort.set_index("statistic")["value"]
    # Aplasia of the reconstituted: 90, 110, 190 days.
    assert value["aplasia_days_mean"] == pytest.approx(130.0)
    assert value["aplasia_days_sd"] == pytest.approx(math.sqrt(2800.0))
    assert value["aplasia_days_median"] == 110.0
    assert (value["aplasia_days_min"], value["aplasia_days_max"]) == (90.0, 190.0)
    # Kaplan-Meier by hand: censored 90 (5 at risk, no step); 100: 4 at risk -> 3/4;
    # 120: 3 at risk -> 3/4 * 2/3 = 1/2 (median 120); censored 150; 200: 1 at risk -> 0.
    assert value["km_median_days_to_reconstitution"] == 120.0
    assert value["km_not_reconstituted_at_day_90"] == pytest.approx(1.0)
    assert value["km_not_reconstituted_at_day_180"] == pytest.approx(0.5)
    assert value["km_not_reconstituted_at_day_365"] == pytest.approx(0.0)
    naive = cohort[cohort["statistic"] == "naive_pct_b_mean"].set_index("detail")
    assert naive.loc["baseline", "value"] == 70.0 and naive.loc["baseline", "n"] == 5
    assert naive.loc["reconstitution", "value"] == 80.0
    assert naive.loc["reconstitution", "n"] == 3
    # Time from infusion (primary): 100, 120, 200 -> mean 140, SD sqrt(2800), median 120.
    assert value["time_to_reconstitution_days_mean"] == pytest.approx(140.0)
    assert value["time_to_reconstitution_days_sd"] == pytest.approx(math.sqrt(2800.0))
    assert value["time_to_reconstitution_days_median"] == 120.0
    assert (value["time_to_reconstitution_days_min"],
            value["time_to_reconstitution_days_max"]) == (100.0, 200.0)
    assert set(cohort["unit"]) == {"unspecified"}  # this input has no unit column


def test_cohort_never_pools_units():
    # cells/µL: reconstitution on days 100 and 140; % of lymphocytes: 60 and 80, and one
    # censored on day 50.
    rows = []
    for patient, unit, recon, last in (("A", "cells_per_ul", 100, 130),
                                       ("B", "cells_per_ul", 140, 170),
                                       ("C", "pct_lymphocytes", 60, 90),
                                       ("D", "pct_lymphocytes", 80, 110),
                                       ("E", "pct_lymphocytes", None, 50)):
        row = {"patient_id": patient, "modality": "flow", "measure": "b", "unit": unit,
               "depletion_day": 10, "reconstitution_day": recon, "last_day": last,
               "censored": recon is None, "aplasia_days": (recon or last) - 10, "flags": ""}
        for subset in SUBSETS:
            row[f"{subset}_pct_b_at_baseline"] = HEALTHY[subset]
            row[f"{subset}_pct_b_at_reconstitution"] = RETURNING[subset] if recon else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["reconstitution_day"] = frame["reconstitution_day"].astype("Int64")
    cohort = cohort_summary(frame, config=load_config())
    per_ul = cohort[cohort["unit"] == "cells_per_ul"].set_index("statistic")
    pct = cohort[cohort["unit"] == "pct_lymphocytes"].set_index("statistic")
    assert len(per_ul) + len(pct) == len(cohort)
    assert per_ul.loc["patients", "value"] == 2 and pct.loc["patients", "value"] == 3
    assert per_ul.loc["time_to_reconstitution_days_mean", "value"] == pytest.approx(120.0)
    assert per_ul.loc["time_to_reconstitution_days_sd", "value"] == pytest.approx(
        math.sqrt(800.0))
    assert pct.loc["time_to_reconstitution_days_mean", "value"] == pytest.approx(70.0)
    # % KM by hand: censored 50 (3 at risk, no step); 60: 2 at risk -> 1/2 (the median);
    # 80: 1 at risk -> 0.
    assert pct.loc["km_median_days_to_reconstitution", "value"] == 60.0
    assert pct.loc["km_not_reconstituted_at_day_90", "value"] == pytest.approx(0.0)
    assert per_ul.loc["km_median_days_to_reconstitution", "value"] == 100.0
    assert per_ul.loc["km_not_reconstituted_at_day_90", "value"] == pytest.approx(1.0)


def test_unconfirmed_return_is_censored_in_the_kaplan_meier_estimate():
    rows = [
        # U1: back on 100, confirmed 130. U3: back on 120, confirmed 160.
        _visit("U1", -1, 5.0), _visit("U1", 10, 0.0), _visit("U1", 100, 2.0),
        _visit("U1", 130, 2.0),
        # U2: 2 % only on the last visit (150): censored at 150, not an event.
        _visit("U2", -1, 5.0), _visit("U2", 10, 0.0), _visit("U2", 60, 0.0),
        _visit("U2", 150, 2.0),
        _visit("U3", -1, 5.0), _visit("U3", 10, 0.0), _visit("U3", 120, 2.0),
        _visit("U3", 160, 3.0),
    ]
    cohort = cohort_summary(patient_kinetics(pd.DataFrame(rows), config=load_config()),
                            config=load_config())
    b = cohort[cohort["measure"] == "b"].set_index("statistic")
    assert set(b["unit"]) == {"pct_lymphocytes"}
    assert (b.loc["patients_reconstituted", "value"], b.loc["patients_censored", "value"],
            b.loc["patients_unconfirmed", "value"]) == (2, 1, 1)
    # KM by hand: 100: 3 at risk -> 2/3; 120: 2 at risk -> 1/3; 150 censored (no step).
    # Counting U2 as an event would give 0 at day 180. Beyond day 150 nobody is at risk and
    # the curve has not reached 0: day 180 is not estimable (never 1/3 carried forward).
    assert b.loc["km_median_days_to_reconstitution", "value"] == 120.0
    assert b.loc["km_not_reconstituted_at_day_90", "value"] == pytest.approx(1.0)
    assert np.isnan(b.loc["km_not_reconstituted_at_day_180", "value"])
    assert "not estimable" in b.loc["km_not_reconstituted_at_day_180", "detail"]
    # Time from infusion 100 and 120 -> 110; aplasia 90 and 110 -> 100.
    assert b.loc["time_to_reconstitution_days_mean", "value"] == pytest.approx(110.0)
    assert b.loc["aplasia_days_mean", "value"] == pytest.approx(100.0)


def test_cli_kinetics_writes_both_tables(tmp_path):
    rows = [_visit("P1", -7, 10.0), _visit("P1", 7, 0.0), _visit("P1", 120, 2.0),
            _visit("P1", 150, 3.0)]
    table = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    out, cohort = tmp_path / "kinetics.tsv", tmp_path / "cohort.tsv"
    assert main(["kinetics", "--table", str(table), "--out", str(out), "--cohort",
                 str(cohort)]) == 0
    kinetics = pd.read_csv(out, sep="\t")
    assert set(kinetics["measure"]) == {"b", "cd19", "cd20"}
    b = kinetics[kinetics["measure"] == "b"].iloc[0]
    assert (b["depletion_day"], b["reconstitution_day"], b["aplasia_days"]) == (7, 120, 113)
    summary = pd.read_csv(cohort, sep="\t")
    assert list(summary.columns) == ["statistic", "modality", "measure", "value", "n", "detail",
                                     "unit"]
    assert np.isfinite(summary["n"]).all()


def _masked_visit(patient: str, day: int, *, b_events: int, cd19neg: int) -> dict:
    row = _visit(patient, day, 100.0 * b_events / 20000)
    row["b_cells"], row["cd19neg_cd20pos"] = b_events, cd19neg
    return row


@pytest.mark.parametrize(("b_events", "cd19neg", "flagged"), [
    (23, 22, True),      # masking while B cells are rare: 22 of 23 CD19-CD20+
    (3, 3, True),        # lower 95% bound 0.37 > 0.2
    (3, 1, False),       # 1 of 3: bound 0.017, could be chance
    (2, 2, False),       # below min_b_cells (3)
    (5000, 1250, True),  # 25% of many: bound 0.24 > 0.2
    (5000, 1000, False),  # exactly 20%: not above it with confidence
])
def test_discordance_flag_rests_on_a_confidence_bound(b_events, cd19neg, flagged):
    from scipy.stats import beta

    rows = [_visit("M", -1, 5.0), _visit("M", 20, 0.0),
            _masked_visit("M", 100, b_events=b_events, cd19neg=cd19neg)]
    table = patient_kinetics(pd.DataFrame(rows), config=load_config())
    assert ("cd19_cd20_discordance" in _flags(_get(table, "M"))) == flagged
    # The bound is the exact one-sided Clopper-Pearson bound.
    from bcellmap.cohort._kinetics import discordance_lower_bound

    bound = discordance_lower_bound(pd.Series([cd19neg]), pd.Series([b_events])).iloc[0]
    assert bound == pytest.approx(beta.ppf(0.05, cd19neg, b_events - cd19neg + 1))


def test_memory_dominant_return_needs_quantifiable_b_events():
    # 2% of 20,000 lymphocytes = 400 B events: a finding. 2% of 1,000 = 20 B events, below
    # the 50-event limit of quantification: said, but not as a finding.
    for lymphocytes, flag in ((20000, "memory_dominant_return"),
                              (1000, "memory_dominant_return_below_loq")):
        rows = [_visit("Q", -1, 5.0), _visit("Q", 20, 0.0, lymphocytes=20000),
                _visit("Q", 100, 2.0, lymphocytes=lymphocytes, subsets=MEMORY_RETURN),
                _visit("Q", 130, 2.0)]
        flags = _flags(_get(patient_kinetics(pd.DataFrame(rows), config=load_config()), "Q"))
        assert flag in flags
        other = {"memory_dominant_return", "memory_dominant_return_below_loq"} - {flag}
        assert not other & set(flags)


def _unreliable(row: dict, *, columns: tuple[str, ...]) -> dict:
    """A visit whose ``columns`` rest on an unreliable gate: NA, and said so, as quantify
    writes it (every value derived from them NA as well)."""
    row = dict(row)
    row["not_evaluable"] = ";".join(columns)
    derived = {"b_cells": ("b_pct_lymphocytes", "b_per_ul", "cd19_pct_lymphocytes",
                           "cd19_per_ul", "cd20_pct_lymphocytes", "cd20_per_ul"),
               "lymphocytes": ("lloq_pct_lymphocytes", "lloq_per_ul", "b_pct_lymphocytes",
                               "cd19_pct_lymphocytes", "cd20_pct_lymphocytes")}
    for column in columns:
        row[column] = math.nan
        for name in derived.get(column, ()):
            row[name] = math.nan
    for subset in SUBSETS:
        row[f"{subset}_pct_b"] = math.nan
    return row


def test_no_depletion_reconstitution_or_kaplan_meier_event_rests_on_an_unreliable_gate():
    v = _visit
    rows = [
        # G1: the day-7 visit would read 0 B cells, but its CD19 gate was nonspecific: the
        # depletion day is the next evaluable depleted visit, and day 7 is listed.
        v("G1", -5, 8.0), _unreliable(v("G1", 7, 0.0), columns=("b_cells",)),
        v("G1", 14, 0.0), v("G1", 100, 2.0), v("G1", 130, 2.5),
        # G2: the visit that would confirm the return is not evaluable: the next evaluable
        # visit confirms it instead.
        v("G2", -5, 8.0), v("G2", 7, 0.0), v("G2", 100, 2.0),
        _unreliable(v("G2", 130, 2.5), columns=("lymphocytes", "b_cells")),
        v("G2", 160, 3.0),
        # G3: every post-infusion visit rests on an unreliable gate: no depletion day, not in
        # the Kaplan-Meier estimate, never "no depletion".
        v("G3", -5, 8.0), *(_unreliable(v("G3", day, 0.0), columns=("b_cells",))
                            for day in (7, 30, 90)),
    ]
    table = pd.DataFrame(rows)
    kinetics = patient_kinetics(table, config=load_config())
    b = kinetics[kinetics["measure"] == "b"].set_index("patient_id")
    assert b.loc["G1", "depletion_day"] == 14
    assert "gate_not_evaluable" in b.loc["G1", "flags"].split(";")
    assert b.loc["G1", "not_evaluable_days"] == "7"
    assert b.loc["G1", "reconstitution_day"] == 100
    assert b.loc["G2", "reconstitution_day"] == 100   # confirmed on day 160, not 130
    assert "130" in b.loc["G2", "not_evaluable_days"].split(";")
    assert pd.isna(b.loc["G3", "depletion_day"])
    flags = b.loc["G3", "flags"].split(";")
    assert {"not_evaluable", "gate_not_evaluable", "not_in_kaplan_meier"} <= set(flags)
    assert "no_depletion" not in flags
    # G2's not-evaluable day 130 left the lymphocytes NA: still a visit, never "no events".
    assert "no_events" not in b.loc["G2", "flags"].split(";")
    cohort = cohort_summary(kinetics, config=load_config())
    row = cohort[(cohort["measure"] == "b")].set_index("statistic")
    assert row.loc["patients_depleted", "value"] == 2
    assert row.loc["patients_gate_not_evaluable", "value"] == 3
    assert "G3" in row.loc["patients_gate_not_evaluable", "detail"]
    assert row.loc["patients_not_in_kaplan_meier", "value"] == 1
