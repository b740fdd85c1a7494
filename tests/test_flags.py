"""Every flag of a run in one table, the end-of-run summary and fail_on, on hand-made tables."""

from __future__ import annotations

import pandas as pd
import pytest

from bcellmap.cli import main
from bcellmap.cohort._flags import failing_flags, flag_table, summary_text


def _tables(tmp_path):
    samples = pd.DataFrame([
        {"sample_id": "A_d0", "patient_id": "A", "day": 0, "modality": "flow",
         "sample_flags": "dead_removed_most;debris_removed_most",
         "gate_flags": "CD27:cohort_positive_mode",
         "unreliable_gates": "", "not_evaluable": "", "not_evaluable_reason": ""},
        {"sample_id": "C_d0", "patient_id": "C", "day": 0, "modality": "flow",
         "sample_flags": "", "gate_flags": "", "unreliable_gates": "CD19:nonspecific",
         "not_evaluable": "b_cells;cd19_pos",
         "not_evaluable_reason": "CD19 gate nonspecific: stains T cells"},
    ])
    kinetics = pd.DataFrame([
        {"patient_id": "C", "modality": "flow", "measure": "b",
         "flags": "not_evaluable;gate_not_evaluable;not_in_kaplan_meier",
         "not_evaluable_days": "30;90"},
        {"patient_id": "A", "modality": "flow", "measure": "b", "flags": "",
         "not_evaluable_days": ""},
    ])
    gates = pd.DataFrame([
        {"sample_id": "C_d0", "marker": "CD19", "level": "pos", "reliability": "nonspecific",
         "reliability_detail": "CD19 stains its negative reference"},
        {"sample_id": "A_d0", "marker": "IgD", "level": "pos", "reliability": "ok",
         "reliability_detail": ""},
    ])
    (tmp_path / "tables").mkdir()
    (tmp_path / "models").mkdir()
    samples.to_csv(tmp_path / "tables" / "samples.tsv", sep="\t", index=False)
    kinetics.to_csv(tmp_path / "tables" / "kinetics.tsv", sep="\t", index=False)
    gates.to_csv(tmp_path / "models" / "gates.tsv", sep="\t", index=False)
    return samples, kinetics, gates


def test_every_flag_is_one_row_with_what_it_decides(tmp_path):
    samples, kinetics, gates = _tables(tmp_path)
    table = flag_table(samples, kinetics, gates)
    rows = {(r.level, r.id, r.flag): r.kind for r in table.itertuples()}
    assert rows[("sample", "A_d0", "dead_removed_most")] == "decides"
    # Whole blood loses most events to the scatter gate: said, but it decides nothing.
    assert rows[("sample", "A_d0", "debris_removed_most")] == "informative"
    assert rows[("gate", "A_d0", "CD27:cohort_positive_mode")] == "informative"
    assert rows[("gate", "C_d0", "CD19:nonspecific")] == "decides"
    assert rows[("sample", "C_d0", "not_evaluable")] == "decides"
    assert rows[("patient", "C:flow:b", "gate_not_evaluable")] == "decides"
    assert rows[("patient", "C:flow:b", "not_in_kaplan_meier")] == "timeline"
    assert ("gate", "A_d0", "IgD:ok") not in rows
    detail = table[(table["flag"] == "not_evaluable") & (table["level"] == "sample")]
    assert "b_cells, cd19_pos" in detail["detail"].iloc[0]


def test_the_summary_counts_by_reason_and_names_the_flags_page(tmp_path):
    _tables(tmp_path)
    text = summary_text(tmp_path, flags_page=["results/tables/flags.tsv"])
    assert "samples: 2; flagged 2" in text
    assert "sample notes (informative): debris_removed_most 1" in text
    assert "gates not to be relied on: 1 in 1 samples (CD19:nonspecific 1)" in text
    assert "values not evaluable (NA, resting on an unreliable gate): 2 in 1 samples" in text
    assert "C_d0: b_cells;cd19_pos -- CD19 gate nonspecific" in text
    assert "flags page: results/tables/flags.tsv" in text


@pytest.mark.parametrize(("fail_on", "expected"), [
    (["nonspecific"], {"CD19:nonspecific"}),
    (["removed_most"], {"dead_removed_most"}),
    (["debris_removed_most"], {"debris_removed_most"}),
    (["gate_not_evaluable", "dead_removed_most"], {"gate_not_evaluable",
                                                    "dead_removed_most"}),
    (["unreliable"], set()),
    ([], set()),
])
def test_fail_on_matches_a_flag_its_tail_or_its_suffix(tmp_path, fail_on, expected):
    table = flag_table(*_tables(tmp_path))
    assert set(failing_flags(table, fail_on)["flag"]) == expected


def test_flags_command_writes_the_table_and_check_fails_naming_the_flag(tmp_path, capsys):
    _tables(tmp_path)
    tables = tmp_path / "tables"
    main(["flags", "--samples-table", str(tables / "samples.tsv"), "--kinetics",
          str(tables / "kinetics.tsv"), "--gates", str(tmp_path / "models" / "gates.tsv"),
          "--out", str(tables / "flags.tsv")])
    written = pd.read_csv(tables / "flags.tsv", sep="\t")
    assert "CD19:nonspecific" in set(written["flag"])
    assert main(["flags", "--check", "--config-json", '{"fail_on": ["nonspecific"]}',
                 "--samples-table", str(tables / "samples.tsv"), "--gates",
                 str(tmp_path / "models" / "gates.tsv")]) == 1
    assert "C_d0: CD19:nonspecific" in capsys.readouterr().err
    # A flag the run did not raise passes, writing nothing.
    assert main(["flags", "--check", "--config-json", '{"fail_on": ["unreliable"]}',
                 "--samples-table", str(tables / "samples.tsv")]) == 0
