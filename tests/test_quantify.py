"""Quantification: hand-computed frequencies, cells/µL and LLOQ."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bcellmap.cli import main
from bcellmap.cohort._quantify import SAMPLE_COLUMNS, quantify, read_counts
from bcellmap.errors import InputError
from bcellmap.flow.annotate import COUNT_COLUMNS, SUBSETS


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


# Exact interval limits from their closed forms (k = 0 or k = n: (alpha/2)^(1/n) and the
# exponential quantile -ln(0.025)) or published tables (Garwood 1936 Poisson limits;
# Clopper-Pearson binomial limits), not from the code.
GARWOOD_0 = (0.0, -math.log(0.025))    # 0 events: (0, 3.6889)
GARWOOD_1 = (-math.log(0.975), 5.5716)  # 1 event: (0.0253, 5.5716)
GARWOOD_5 = (1.6235, 11.6683)
GARWOOD_10 = (4.7954, 18.3904)


def test_confidence_intervals_loq_and_subsets_per_ul():
    counts = pd.DataFrame([
        # A: 2000 B of 20000 lymphocytes, 1500 lymphocytes/µL.
        _counts("A", 20000, 2000, 1900, 1950, 100,
                {"naive": 1400, "transitional": 60, "switched_memory": 300,
                 "unswitched_memory": 200, "double_negative": 30, "plasmablast": 10}),
        # B: aplastic, 0 of 15000 lymphocytes, 800/µL.
        _counts("B", 15000, 0, 0, 0, 0, {}),
        # C: 5 B of 10 lymphocytes (1 naive, 5 transitional), 1000/µL.
        _counts("C", 10, 5, 5, 1, 0, {"naive": 1, "transitional": 5}),
    ])
    table = quantify(counts, _sheet({"A": 1500.0, "B": 800.0, "C": 1000.0}),
                     loq_events=50).set_index("sample_id")
    # Poisson (Garwood) intervals on counts.
    assert table.loc["B", "b_cells_ci_low"] == 0.0
    assert table.loc["B", "b_cells_ci_high"] == pytest.approx(GARWOOD_0[1], rel=1e-6)
    assert table.loc["C", "cd20_pos_ci_low"] == pytest.approx(GARWOOD_1[0], rel=1e-4)
    assert table.loc["C", "cd20_pos_ci_high"] == pytest.approx(GARWOOD_1[1], rel=1e-4)
    assert table.loc["C", "b_cells_ci_low"] == pytest.approx(GARWOOD_5[0], rel=1e-4)
    assert table.loc["C", "b_cells_ci_high"] == pytest.approx(GARWOOD_5[1], rel=1e-4)
    assert table.loc["A", "plasmablast_count_ci_low"] == pytest.approx(GARWOOD_10[0], rel=1e-4)
    assert table.loc["A", "plasmablast_count_ci_high"] == pytest.approx(GARWOOD_10[1],
                                                                        rel=1e-4)
    # Clopper-Pearson on frequencies. 0 of 15000: (0, 1 - 0.025^(1/15000)).
    upper = 1 - 0.025 ** (1 / 15000)
    assert table.loc["B", "b_pct_lymphocytes_ci_low"] == 0.0
    assert table.loc["B", "b_pct_lymphocytes_ci_high"] == pytest.approx(100 * upper)
    # ... in cells/µL: the same interval times 800 lymphocytes/µL.
    assert table.loc["B", "b_per_ul_ci_high"] == pytest.approx(800 * upper)
    # 5 of 10 (tables: 0.1871-0.8129), 1000/µL -> 187.1-812.9 cells/µL.
    assert table.loc["C", "b_pct_lymphocytes_ci_low"] == pytest.approx(18.71, abs=0.01)
    assert table.loc["C", "b_pct_lymphocytes_ci_high"] == pytest.approx(81.29, abs=0.01)
    assert table.loc["C", "b_per_ul_ci_low"] == pytest.approx(187.1, abs=0.1)
    assert table.loc["C", "b_per_ul_ci_high"] == pytest.approx(812.9, abs=0.1)
    # CD19+: also 5 of 10 lymphocytes.
    assert table.loc["C", "cd19_pct_lymphocytes_ci_low"] == pytest.approx(18.71, abs=0.01)
    # Subsets as % of B: 5 of 5 transitional: (100 * 0.025^(1/5), 100);
    # 1 of 5 naive: (100 * (1 - 0.975^(1/5)), 71.64 from the tables).
    assert table.loc["C", "transitional_pct_b_ci_low"] == pytest.approx(100 * 0.025 ** 0.2)
    assert table.loc["C", "transitional_pct_b_ci_high"] == 100.0
    assert table.loc["C", "naive_pct_b_ci_low"] == pytest.approx(100 * (1 - 0.975 ** 0.2))
    assert table.loc["C", "naive_pct_b_ci_high"] == pytest.approx(71.64, abs=0.01)
    # Subset cells/µL: 1400 naive of 20000 lymphocytes x 1500/µL = 105; interval of 1 of
    # 10 lymphocytes (C's naive) x 1000/µL: (1000 * (1 - 0.975^(1/10)), 445.0 from tables).
    assert table.loc["A", "naive_per_ul"] == pytest.approx(105.0)
    assert table.loc["C", "naive_per_ul"] == pytest.approx(100.0)
    assert table.loc["C", "naive_per_ul_ci_low"] == pytest.approx(1000 * (1 - 0.975 ** 0.1))
    assert table.loc["C", "naive_per_ul_ci_high"] == pytest.approx(445.0, abs=0.1)
    assert pd.isna(table.loc["B", "naive_pct_b_ci_low"])  # no B cells: no share
    # The "LLOQ" is the upper 95% bound at zero: 3 / 20000 * 100 = 0.015 %; 0.015 % of 1500.
    assert table.loc["A", "upper95_at_zero_pct_lymphocytes"] == pytest.approx(0.015)
    assert table.loc["A", "upper95_at_zero_per_ul"] == pytest.approx(0.225)
    assert (table["upper95_at_zero_pct_lymphocytes"] == table["lloq_pct_lymphocytes"]).all()
    # LOQ: 50 / 20000 * 100 = 0.25 % = 3.75 cells/µL at 1500/µL; 50 / 15000 -> 0.333 %.
    assert table.loc["A", "loq_pct_lymphocytes"] == pytest.approx(0.25)
    assert table.loc["A", "loq_per_ul"] == pytest.approx(3.75)
    assert table.loc["B", "loq_pct_lymphocytes"] == pytest.approx(100 * 50 / 15000)
    # below_loq: 2000 B events >= 50; 0 and 5 < 50.
    assert list(table.loc[["A", "B", "C"], "below_loq"]) == [False, True, True]


def test_loq_is_configurable_and_empty_without_lymphocytes():
    counts = pd.DataFrame([_counts("A", 20000, 49, 49, 49, 0, {"naive": 49}),
                           _counts("B", 20000, 50, 50, 50, 0, {"naive": 50}),
                           _counts("C", 0, 0, 0, 0, 0, {})])
    table = quantify(counts, _sheet({}), loq_events=50).set_index("sample_id")
    assert bool(table.loc["A", "below_loq"]) and not bool(table.loc["B", "below_loq"])
    assert pd.isna(table.loc["C", "below_loq"]) and pd.isna(table.loc["C", "loq_pct_lymphocytes"])
    assert pd.isna(table.loc["C", "b_pct_lymphocytes_ci_high"])
    table = quantify(counts, _sheet({}), loq_events=20).set_index("sample_id")
    assert table.loc["A", "loq_pct_lymphocytes"] == pytest.approx(0.1)  # 20 / 20000
    assert not bool(table.loc["A", "below_loq"])


def test_lymphodepletion_day_is_carried_from_the_sheet():
    counts = pd.DataFrame([_counts(s, 1000, 10, 10, 10, 0, {}) for s in ("A", "B", "C")])
    sheet = _sheet({}).assign(lymphodepletion_day=["-5", "-5", ""])
    table = quantify(counts, sheet).set_index("sample_id")
    assert table.loc["A", "lymphodepletion_day"] == -5
    assert pd.isna(table.loc["C", "lymphodepletion_day"])
    # Without the column: an empty column.
    assert quantify(counts, _sheet({}))["lymphodepletion_day"].isna().all()
    with pytest.raises(InputError, match="lymphodepletion_day"):
        quantify(counts, _sheet({}).assign(lymphodepletion_day=["-5.5", "", ""]))
