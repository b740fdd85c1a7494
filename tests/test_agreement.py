"""bcellmap against a real FlowJo workspace's manual gates (``bcellmap compare-gates``).

The workspace (FlowAtlas.jl, FlowJo 10.7; ``../shared/data/workspaces/flowatlas``) holds nine
FCS files of blood, bone marrow, lymph node, gut and lung, without marker names in the files,
and an expert's "B cells" CD19 x CD8 gate. Truth: the workspace's gates as FlowKit applies
them, whose counts the data's README lists (FlowKit 1.3.2). Skipped where the folder is absent.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from bcellmap.cli import main
from bcellmap.flow.agreement import match_gates, read_workspace

pytestmark = pytest.mark.realfcs
flowkit = pytest.importorskip("flowkit")

#: The README's counts: workspace sample id -> (events, B cells).
EXPECTED_B = {
    "423_Donor_Ileum_033.fcs": (2848, 620), "423_Donor_Liver_022.fcs": (10231, 94),
    "423_Donor_Lung_032.fcs": (5199, 140), "428_Donor_Ileum_030.fcs": (14952, 1317),
    "428_Donor_Lung_029.fcs": (12507, 345), "Specimen_001_412C BM_032.fcs": (22999, 1646),
    "Specimen_001_412C Ileum_027.fcs": (609, 8),
    "Specimen_001_412C Pre Ed Blood_025.fcs": (47167, 4260),
    "Specimen_001_412C mLN_026.fcs": (11791, 2874)}


def test_compare_gates_on_a_real_workspace(flowatlas_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        main(["compare-gates", str(flowatlas_dir / "workspace.wsp"), "--out",
              str(tmp_path / "agreement.tsv"), "--figure-dir", str(tmp_path)])
    table = pd.read_csv(tmp_path / "agreement.tsv", sep="\t", keep_default_na=False,
                        na_values=[""])
    b = table[table["population"] == "B"].set_index("workspace_sample")
    # Every sample was found (three by $FIL, not by their file name) and gated as the
    # expert did, by FlowKit applying the workspace.
    assert sorted(b.index) == sorted(EXPECTED_B)
    for sample, (events, count) in EXPECTED_B.items():
        assert (b.loc[sample, "events"], b.loc[sample, "workspace_count"]) == (events, count)
    assert set(b["gate_path"]) == {"B cells"}
    # bcellmap's B cells (CD19+; the file's "CD3" detector also carries IgD, as the workspace
    # says, so no CD3 gate is used) agree per event with the expert wherever there are 300
    # B cells or more.
    enough = b[b["workspace_count"] >= 300]
    assert len(enough) == 6 and (enough["f1"] >= 0.95).all(), enough["f1"]
    # Where bcellmap cannot stand behind its CD19 gate, the table says so.
    flagged = b[b["bcellmap_not_evaluable"].notna()]
    assert flagged["bcellmap_not_evaluable"].str.contains("CD19").all()
    assert (tmp_path / "gate_agreement.png").stat().st_size > 10_000
    assert "F1" in caplog.text


def test_gates_are_matched_by_name_or_by_a_mapping(flowatlas_dir):
    workspace = read_workspace(flowatlas_dir / "workspace.wsp")
    sample = "Specimen_001_412C Pre Ed Blood_025.fcs"
    matched, notes = match_gates(workspace, sample)
    assert matched["B"] == ("B cells", ("root",))
    assert matched["T"] == ("T cells", ("root", "non-B"))
    assert not notes
    matched, notes = match_gates(workspace, sample, {"T": "non-B/T cells/CD4",
                                                     "naive": "CD4 | Naive",
                                                     "memory": "CD4 | Memory",
                                                     "B": "missing gate"})
    assert matched["T"] == ("CD4", ("root", "non-B", "T cells"))
    assert matched["naive"][0] == "CD4 | Naive"
    assert "B" not in matched
    assert any("missing gate" in note for note in notes)
    assert any(note.startswith("memory: not a bcellmap population") for note in notes)


def test_a_wrong_file_label_is_put_right_by_mapping_the_marker_to_no_channel(flowatlas_dir):
    """423_Donor_Ileum labels its CD3+IgD detector "CD3": read as CD3, naive (IgD+) B cells
    are gated CD3+ and lost. ``channels: {CD3: null}`` says the panel has no CD3 channel."""
    import numpy as np

    import bcellmap as bl

    workspace = read_workspace(flowatlas_dir / "workspace.wsp")
    sample = "423_Donor_Ileum_033.fcs"
    workspace.analyze_samples(sample_id=sample, use_mp=False)
    expert = np.asarray(workspace.get_gate_membership(sample, "B cells"), dtype=bool)

    def recall(channels: dict) -> float:
        config = {"panels": {"atlas": {"channels": channels, "compensation": {"source": "none"},
                                       "required_markers": ["CD19"]}}}
        adata = bl.flow.ingest(flowatlas_dir / sample, sample_id="ileum", panel="atlas",
                               config=config)
        bl.tl.gate({"ileum": adata}, config=config)
        bl.tl.annotate(adata, config=config)
        called = np.zeros(expert.size, dtype=bool)
        called[adata.obs["event_index"].to_numpy()[(adata.obs["cell_type"] == "B").to_numpy()]] \
            = True
        return float((called & expert).sum() / expert.sum())

    assert recall({"CD19": "FJComp-405 585_15-A"}) < 0.2
    assert recall({"CD19": "FJComp-405 585_15-A", "CD3": None}) > 0.95
