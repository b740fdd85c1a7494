"""Flow vs scRNA concordance pairs visits by patient and day, hand-checked."""

from __future__ import annotations

import math

import pandas as pd

from bcellmap.cohort._concordance import concordance


def _row(sample_id, patient, day, modality, lymphocytes, b, cd19, cd20):
    return {"sample_id": sample_id, "patient_id": patient, "day": day, "modality": modality,
            "lymphocytes": lymphocytes, "b_cells": b, "cd19_pos": cd19, "cd20_pos": cd20,
            "b_pct_lymphocytes": 100 * b / lymphocytes,
            "cd19_pct_lymphocytes": 100 * cd19 / lymphocytes,
            "cd20_pct_lymphocytes": 100 * cd20 / lymphocytes}


def test_pairs_same_patient_and_day_only():
    samples = pd.DataFrame([
        _row("f1", "P1", -5, "flow", 10_000, 1_000, 990, 980),
        _row("r1", "P1", -5, "scrna", 1_000, 120, 60, 118),
        _row("f2", "P1", 28, "flow", 10_000, 0, 0, 0),
        _row("r2", "P1", 28, "scrna", 1_000, 0, 0, 0),
        _row("f3", "P1", 56, "flow", 10_000, 200, 200, 200),   # no scRNA that day
        _row("r9", "P2", -5, "scrna", 1_000, 50, 40, 50),      # no flow for P2
    ])
    table = concordance(samples)
    assert len(table) == 2 * 3
    baseline_b = table[(table["day"] == -5) & (table["measure"] == "b")].iloc[0]
    assert baseline_b["flow_sample_id"] == "f1" and baseline_b["scrna_sample_id"] == "r1"
    assert math.isclose(baseline_b["flow_pct_lymphocytes"], 10.0)
    assert math.isclose(baseline_b["scrna_pct_lymphocytes"], 12.0)
    assert math.isclose(baseline_b["difference_pct_points"], 2.0)
    assert math.isclose(baseline_b["ratio"], 1.2)
    aplasia = table[(table["day"] == 28) & (table["measure"] == "b")].iloc[0]
    assert math.isnan(aplasia["ratio"]) and aplasia["difference_pct_points"] == 0


def test_no_shared_visit_gives_an_empty_table():
    samples = pd.DataFrame([_row("f1", "P1", 0, "flow", 100, 1, 1, 1)])
    assert concordance(samples).empty


def test_identifiers_stay_strings_through_the_command(tmp_path):
    from bcellmap.cli import main

    samples = pd.DataFrame([_row("007", "NA", 0, "flow", 1_000, 100, 100, 100),
                            _row("007r", "NA", 0, "scrna", 1_000, 90, 90, 90)])
    table = tmp_path / "samples.tsv"
    samples.to_csv(table, sep="\t", index=False)
    out = tmp_path / "concordance.tsv"
    assert main(["concordance", "--table", str(table), "--out", str(out)]) == 0
    written = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert set(written["patient_id"]) == {"NA"} and set(written["flow_sample_id"]) == {"007"}
    assert len(written) == 3
