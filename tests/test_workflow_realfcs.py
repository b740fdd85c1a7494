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
    # Every baseline either has T and B cells or is flagged for lacking them.
    for sample in ("R1_base", "R2_base"):
        t_share = table.loc[sample, "t_cells"] / table.loc[sample, "lymphocytes"]
        assert t_share >= 0.05 or "few_t_cells_at_baseline" in flags[sample], sample
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
