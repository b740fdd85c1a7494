"""End to end on real files: the FCS files of ../shared/data/realfcs arranged as three pretend
patients, as a new user would. The workflow either stops before any job with every problem
listed at once, or runs and flags what is implausible; never exit 0 with silently wrong
numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_workflow import _snakemake

REALFCS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realfcs"

pytestmark = [
    pytest.mark.realfcs, pytest.mark.e2e,
    pytest.mark.skipif(not REALFCS.is_dir(), reason="../shared/data/realfcs absent"),
]

# sample_id, patient, day, file, panel
NAIVE = [
    ("R1_base", "R1", -5, "flowkit_100715.fcs"),
    ("R1_d30", "R1", 30, "flowkit_test_comp_example.fcs"),
    ("R1_d90", "R1", 90, "fcsparser_facs_diva_test.fcs"),
    ("R2_base", "R2", -3, "flowsom_ff.fcs"),
    ("R2_d28", "R2", 28, "flowai_bcells_1.fcs"),
    ("R2_d56", "R2", 56, "flowai_bcells_2.fcs"),
    ("R2_d112", "R2", 112, "flowai_bcells_3.fcs"),
    ("R3_base", "R3", -7, "tidytof_121002hipsurg_102_1h.fcs"),
    ("R3_d1", "R3", 1, "tidytof_121002hipsurg_102_24h.fcs"),
    ("R3_d30", "R3", 30, "tidytof_121002hipsurg_102_1mo.fcs"),
]


def _sheet(path: Path, rows, panels: dict[str, str] | None = None) -> Path:
    panels = panels or {}
    frame = pd.DataFrame([{"sample_id": s, "patient_id": p, "day": d, "modality": "flow",
                           "path": str(REALFCS / f), "lymphocytes_per_ul": 1000,
                           "panel": panels.get(f, "")} for s, p, d, f in rows])
    frame.to_csv(path, sep="\t", index=False)
    return path


def test_naive_sheet_stops_before_any_job_listing_every_problem(tmp_path):
    _sheet(tmp_path / "samples.tsv", NAIVE)
    (tmp_path / "my.yaml").write_text("samples: samples.tsv\ndevice: cpu\n")
    result = _snakemake("--cores", "1", "--configfile", "my.yaml", cwd=tmp_path, check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    # Several samples' problems at once: double processing, a CyTOF/fluorescence mix, an
    # invalid spillover matrix.
    for sample in ("R2_base", "R2_d28", "R3_base"):
        assert sample in message, sample
    assert "already" in message and "mass cytometry" in message
    assert not (tmp_path / "results" / "flow").exists()  # no job ran


def test_configured_sheet_runs_and_flags_what_is_implausible(tmp_path):
    rows = [r for r in NAIVE if not r[3].startswith(("tidytof", "flowkit_test"))]
    panels = {"flowsom_ff.fcs": "ff", **{f"flowai_bcells_{i}.fcs": "flowai" for i in (1, 2, 3)}}
    _sheet(tmp_path / "samples.tsv", rows, panels)
    (tmp_path / "my.yaml").write_text(
        "samples: samples.tsv\ndevice: cpu\nreport: {enabled: false}\n"
        "cluster: {markers: [CD3, CD19, CD20], som: {xdim: 4, ydim: 4}, n_metaclusters: 4}\n"
        "ingest: {required_markers: [[CD19, CD20]]}\n"
        "panels:\n  default: {channels: {}}\n"
        "  ff: {channels: {}, compensation: {source: none}, transform: {method: none},"
        " required_markers: [CD3, CD19]}\n"
        "  flowai: {channels: {}, compensation: {source: none}}\n")
    _snakemake("--cores", "2", "--configfile", "my.yaml", cwd=tmp_path)
    table = pd.read_csv(tmp_path / "results" / "tables" / "samples.tsv", sep="\t",
                        keep_default_na=False, na_values=[""]).set_index("sample_id")
    assert sorted(table.index) == sorted(r[0] for r in rows)
    flags = table["sample_flags"].fillna("").str.split(";")
    # Panels without CD3 are called and say so; T and NK are not reported for them.
    for sample in ("R1_d90", "R2_d28", "R2_d56", "R2_d112"):
        assert "no_cd3_in_panel" in flags[sample], sample
        assert pd.isna(table.loc[sample, "t_cells"])
    # Every baseline either has T and B cells, is flagged for lacking them, or says that its
    # T cells rest on a gate that cannot be stood behind (flowkit_100715: CD3 one mode).
    for sample in ("R1_base", "R2_base"):
        if "t_cells" in str(table.loc[sample, "not_evaluable"]).split(";"):
            assert pd.isna(table.loc[sample, "t_cells"]), sample
            continue
        t_share = table.loc[sample, "t_cells"] / table.loc[sample, "lymphocytes"]
        assert t_share >= 0.05 or "few_t_cells_at_baseline" in flags[sample], sample
    assert "t_cells" in table.loc["R1_base", "not_evaluable"].split(";")
    # The expert-gated file: B cells as the manual gates count them among QC-passed events.
    import anndata as ad

    annotated = ad.read_h5ad(tmp_path / "results" / "annotated" / "R2_base.h5ad")
    labels = pd.read_csv(REALFCS / "flowsom_ff_labels.csv")["label"].to_numpy()
    manual = (labels[annotated.obs["event_index"].to_numpy()] == "B cells").sum()
    assert table.loc["R2_base", "b_cells"] == pytest.approx(manual, rel=0.05)
    # Gates were learned per panel: the ff panel's CD19 gate is on its own (logicle) scale.
    gates = pd.read_csv(tmp_path / "results" / "models" / "gates.tsv", sep="\t")
    groups = gates.groupby("sample_id")["group"].first()
    assert groups["R2_base"] == "ff" and groups["R2_d28"] == "flowai"
    assert groups["R1_base"] == "all"
    assert np.isfinite(gates["threshold"]).any()


# The issue's cases as pretend patients: a mass-cytometry CD19 that stains every cell
# (CytoNorm), a T-cell panel whose CD3 and CD19 are single modes (flowkit_100715), and a
# CD3-less B-cell panel whose CD19 is one population with a tail (flowAI).
UNRELIABLE = [
    ("C_base", "C", -7, "cytonorm_PTLG021_control_1.fcs", "cytof"),
    ("C_d30", "C", 30, "cytonorm_PTLG028_control_1.fcs", "cytof"),
    ("C_d90", "C", 90, "cytonorm_PTLG034_control_1.fcs", "cytof"),
    ("C_d180", "C", 180, "cytonorm_PTLG021_control_2.fcs", "cytof"),
    ("K_base", "K", -5, "flowkit_100715.fcs", ""),
    ("A_base", "A", -3, "flowai_bcells_1.fcs", "flowai"),
    ("A_d28", "A", 28, "flowai_bcells_2.fcs", "flowai"),
    ("A_d112", "A", 112, "flowai_bcells_3.fcs", "flowai"),
]


def test_values_resting_on_gates_that_cannot_be_stood_behind_are_not_evaluable(tmp_path):
    frame = pd.DataFrame([{"sample_id": s, "patient_id": p, "day": d, "modality": "flow",
                           "path": str(REALFCS / f), "lymphocytes_per_ul": 1000, "panel": panel}
                          for s, p, d, f, panel in UNRELIABLE])
    frame.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    (tmp_path / "my.yaml").write_text(
        "samples: samples.tsv\ndevice: cpu\nreport: {enabled: false}\n"
        "cluster: {markers: [CD3, CD19], som: {xdim: 4, ydim: 4}, n_metaclusters: 4}\n"
        "ingest: {required_markers: [[CD19, CD20]]}\n"
        "panels:\n  default: {channels: {}}\n  cytof: {channels: {}}\n"
        "  flowai: {channels: {}, compensation: {source: none}, required_markers: [CD19]}\n")
    result = _snakemake("--cores", "2", "--configfile", "my.yaml", cwd=tmp_path)
    terminal = result.stdout + result.stderr
    table = pd.read_csv(tmp_path / "results" / "tables" / "samples.tsv", sep="\t",
                        keep_default_na=False, na_values=[""]).set_index("sample_id")
    gates = pd.read_csv(tmp_path / "results" / "models" / "gates.tsv", sep="\t")
    cd19 = gates[gates["marker"] == "CD19"].set_index("sample_id")
    # The CytoNorm CD19 stains the T cells: nonspecific; no B count comes from it.
    for sample in ("C_base", "C_d30", "C_d90", "C_d180"):
        assert cd19.loc[sample, "reliability"] == "nonspecific", sample
    # The single-mode CD19 of the T-cell panel and of the CD3-less B-cell panel: unreliable.
    for sample in ("K_base", "A_base", "A_d28", "A_d112"):
        assert cd19.loc[sample, "reliability"] == "unreliable", sample
    for sample in table.index:
        assert pd.isna(table.loc[sample, "b_cells"]), sample
        assert pd.isna(table.loc[sample, "b_pct_lymphocytes"]), sample
        assert "b_cells" in table.loc[sample, "not_evaluable"].split(";"), sample
    kinetics = pd.read_csv(tmp_path / "results" / "tables" / "kinetics.tsv", sep="\t",
                           keep_default_na=False, na_values=[""])
    b = kinetics[kinetics["measure"] == "b"].set_index("patient_id")
    for patient in ("C", "A"):
        assert pd.isna(b.loc[patient, "depletion_day"]), patient
        assert pd.isna(b.loc[patient, "reconstitution_day"]), patient
        assert "gate_not_evaluable" in b.loc[patient, "flags"].split(";"), patient
    cohort = pd.read_csv(tmp_path / "results" / "tables" / "cohort.tsv", sep="\t")
    depleted = cohort[(cohort["statistic"] == "patients_depleted")
                      & (cohort["measure"] == "b")]["value"]
    assert (depleted == 0).all()
    assert not cohort["statistic"].str.startswith("km_").any() or cohort.loc[
        cohort["statistic"].str.startswith("km_") & (cohort["measure"] == "b"), "n"].eq(0).all()
    # The terminal says so.
    assert "bcellmap run summary" in terminal
    assert "CD19:nonspecific" in terminal and "CD19:unreliable" in terminal


FLOWATLAS = REALFCS.parent / "workspaces" / "flowatlas"


@pytest.mark.skipif(not (FLOWATLAS / "workspace.wsp").is_file(), reason="workspace absent")
def test_the_workflow_holds_its_b_cells_against_a_flowjo_workspace(tmp_path):
    """compare.workspace: the run's own B cells against the expert's gate, per sample, in
    results/tables/gate_agreement.tsv and a report figure; the GatingML export and a user's
    correction work on these files too."""
    files = {"blood": "412C_Blood_025.fcs", "bm": "412C_BM_032.fcs", "mln": "412C_mLN_026.fcs",
             "ileum": "412C_Ileum_027.fcs"}
    pd.DataFrame([{"sample_id": s, "patient_id": "D412C", "day": d, "modality": "flow",
                   "path": str(FLOWATLAS / f), "panel": "atlas"}
                  for d, (s, f) in enumerate(files.items())]).to_csv(
        tmp_path / "samples.tsv", sep="\t", index=False)
    (tmp_path / "my.yaml").write_text(
        "samples: samples.tsv\ndevice: cpu\nreport: {enabled: false}\n"
        "cluster: {markers: [CD19, CD8, CD4], som: {xdim: 4, ydim: 4}, n_metaclusters: 4}\n"
        "panels:\n  default: {channels: {}}\n"
        "  atlas: {channels: {CD19: 'FJComp-405 585_15-A', CD8: 'FJComp-355 560_40-A',"
        " CD4: 'FJComp-355 820_60-A'}, compensation: {source: none},"
        " required_markers: [CD19]}\n"
        f"compare: {{workspace: {FLOWATLAS / 'workspace.wsp'}}}\n")
    _snakemake("--cores", "2", "--configfile", "my.yaml", cwd=tmp_path)
    table = pd.read_csv(tmp_path / "results" / "tables" / "gate_agreement.tsv", sep="\t",
                        keep_default_na=False, na_values=[""])
    b = table[table["population"] == "B"].set_index("sample_id")
    assert sorted(b.index) == sorted(files)
    assert b.loc["blood", "workspace_count"] == 4260 and b.loc["mln", "workspace_count"] == 2874
    assert (b.loc[["blood", "bm", "mln"], "f1"] >= 0.95).all(), b["f1"]
    assert (tmp_path / "results" / "report" / "gate_agreement.png").is_file()
    assert sorted(p.name for p in (tmp_path / "results" / "gates").iterdir()) == sorted(
        f"{s}.gatingml.xml" for s in files)
