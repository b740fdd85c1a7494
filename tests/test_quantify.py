"""Quantification: hand-computed frequencies, cells/µL and LLOQ."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bcellmap.annotate import COUNT_COLUMNS, SUBSETS
from bcellmap.cli import main
from bcellmap.errors import InputError
from bcellmap.quantify import SAMPLE_COLUMNS, quantify, read_counts


def _counts(sample_id: str, lymphocytes: int, b: int, cd19: int, cd20: int, cd19neg: int,
            subsets: dict[str, int | None]) -> dict:
    row = dict.fromkeys(COUNT_COLUMNS)
    row.update(sample_id=sample_id, modality="flow", events_total=lymphocytes + 500,
               events_qc_pass=lymphocytes, lymphocytes=lymphocytes, t_cells=lymphocytes // 2,
               b_cells=b, cd19_pos=cd19, cd20_pos=cd20, cd19neg_cd20pos=cd19neg,
               subsets_not_called="", cluster_discordant_events=0)
    for subset in SUBSETS:
        row[f"{subset}_count"] = subsets.get(subset, 0)
    return row


def _sheet(per_ul: dict[str, float]) -> pd.DataFrame:
    rows = [{"sample_id": s, "patient_id": "P1", "day": day, "modality": "flow",
             "lymphocytes_per_ul": per_ul.get(s, math.nan)}
            for s, day in (("A", -7), ("B", 30), ("C", 90))]
    return pd.DataFrame(rows).set_index("sample_id", drop=False)


def test_hand_computed_frequencies_per_ul_and_lloq():
    counts = pd.DataFrame([
        _counts("A", 20000, 2000, 1900, 1950, 100,
                {"naive": 1400, "transitional": 60, "switched_memory": 300,
                 "unswitched_memory": 200, "double_negative": 30, "plasmablast": 10}),
        _counts("B", 15000, 0, 0, 0, 0, {}),
        _counts("C", 3000, 60, 54, 57, 6, {"naive": 45, "transitional": 12}),
    ])
    table = quantify(counts, _sheet({"A": 1500.0, "B": 800.0}), lloq_events=3.0)
    table = table.set_index("sample_id")
    assert list(table.reset_index().columns[:len(SAMPLE_COLUMNS)]) == list(SAMPLE_COLUMNS)
    # A: 2000 / 20000 = 10 %; 1900 / 20000 = 9.5 %; 1950 / 20000 = 9.75 %.
    assert table.loc["A", "b_pct_lymphocytes"] == pytest.approx(10.0)
    assert table.loc["A", "cd19_pct_lymphocytes"] == pytest.approx(9.5)
    assert table.loc["A", "cd20_pct_lymphocytes"] == pytest.approx(9.75)
    # 10 % of 1500 lymphocytes/µL = 150 B cells/µL; CD19 9.5 % -> 142.5; CD20 -> 146.25.
    assert table.loc["A", "b_per_ul"] == pytest.approx(150.0)
    assert table.loc["A", "cd19_per_ul"] == pytest.approx(142.5)
    assert table.loc["A", "cd20_per_ul"] == pytest.approx(146.25)
    # LLOQ: 3 / 20000 * 100 = 0.015 %; 3 / 15000 * 100 = 0.02 %; 3 / 3000 * 100 = 0.1 %.
    assert table.loc["A", "lloq_pct_lymphocytes"] == pytest.approx(0.015)
    assert table.loc["B", "lloq_pct_lymphocytes"] == pytest.approx(0.02)
    assert table.loc["C", "lloq_pct_lymphocytes"] == pytest.approx(0.1)
    assert table.loc["B", "lloq_per_ul"] == pytest.approx(0.02 / 100 * 800)
    # Subsets as % of B: 1400 / 2000 = 70 %; 12 / 60 = 20 %.
    assert table.loc["A", "naive_pct_b"] == pytest.approx(70.0)
    assert table.loc["A", "plasmablast_pct_b"] == pytest.approx(0.5)
    assert table.loc["C", "transitional_pct_b"] == pytest.approx(20.0)
    # Zero B cells: 0 %, 0 cells/µL, subset shares undefined.
    assert table.loc["B", "b_pct_lymphocytes"] == 0.0 and table.loc["B", "b_per_ul"] == 0.0
    assert pd.isna(table.loc["B", "naive_pct_b"])
    # No absolute count for C: per-µL columns empty.
    assert pd.isna(table.loc["C", "b_per_ul"])
    assert table.loc["A", "events_total"] == 20500 and table.loc["A", "patient_id"] == "P1"


def test_zero_lymphocytes_and_uncalled_subsets_stay_empty():
    row = _counts("A", 0, 0, 0, 0, 0, {})
    row["transitional_count"] = None
    row["subsets_not_called"] = "transitional"
    table = quantify(pd.DataFrame([row]), _sheet({"A": 1000.0}))
    assert pd.isna(table.loc[0, "b_pct_lymphocytes"])
    assert pd.isna(table.loc[0, "lloq_pct_lymphocytes"])
    assert pd.isna(table.loc[0, "transitional_count"])
    assert pd.isna(table.loc[0, "transitional_pct_b"])


def test_scrna_extras_are_carried_and_unknown_samples_refused():
    row = _counts("B", 4000, 400, 200, 380, 190, {"naive": 300})
    row.update(modality="scrna", car_t_count=25, car_t_pct_t=1.25)
    table = quantify(pd.DataFrame([row]), _sheet({}))
    assert table.loc[0, "car_t_count"] == 25 and table.loc[0, "car_t_pct_t"] == 1.25
    with pytest.raises(InputError, match="not in the sheet"):
        quantify(pd.DataFrame([_counts("Z", 10, 1, 1, 1, 0, {})]), _sheet({}))


def test_cli_quantify(tmp_path):
    paths = []
    for sample_id, lymphocytes, b in (("A", 10000, 500), ("B", 8000, 0)):
        path = tmp_path / f"{sample_id}.tsv"
        pd.DataFrame([_counts(sample_id, lymphocytes, b, b, b, 0, {"naive": b})]).to_csv(
            path, sep="\t", index=False)
        paths.append(str(path))
    sheet = tmp_path / "samples.tsv"
    _sheet({"A": 2000.0}).assign(path="x.fcs").to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "samples_table.tsv"
    assert main(["quantify", "--samples", str(sheet), "--inputs", *paths, "--out",
                 str(out)]) == 0
    table = pd.read_csv(out, sep="\t").set_index("sample_id")
    assert table.loc["A", "b_per_ul"] == pytest.approx(100.0)  # 5 % of 2000
    assert table.loc["B", "lloq_pct_lymphocytes"] == pytest.approx(0.0375)
    assert len(read_counts(paths)) == 2
