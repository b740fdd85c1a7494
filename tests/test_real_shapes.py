"""Simulated visits with the shapes of real blood (``bcellmap.demo.simulate_visit``), gated as a
cohort of one, scored per event against the simulator's truth: the answer a cytometry core
would hold an expert-gated file to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bcellmap as bl
from bcellmap.contracts import SUBSETS
from bcellmap.demo.simulate import codes_table
from bcellmap.demo.simulate_visit import VISIT_PROFILES, simulate_visit
from bcellmap.kernels.density import learn_marker_threshold

EXPORT_PANEL = {"panels": {"export": {"channels": {}, "compensation": {"source": "none"},
                                      "transform": {"method": "none"}}}}


def _run_one(path: Path, *, export: str):
    """Ingest, gate as a cohort of one, annotate; per-event truth of the QC-passed events."""
    config = EXPORT_PANEL if export == "compressed" else None
    panel = "export" if export == "compressed" else None
    adata = bl.flow.ingest(path, sample_id="v", patient_id="H", day=-1, panel=panel,
                           config=config)
    adata = adata[adata.obs["qc_pass"].to_numpy().astype(bool)].copy()
    _, gates = bl.tl.gate({"v": adata}, config=config)
    bl.tl.annotate(adata, config=config)
    codes = np.load(path.with_suffix(".truth.npy"))[adata.obs["event_index"].to_numpy()]
    table = codes_table().set_index("code")
    truth = pd.DataFrame({"category": table.loc[codes, "category"].to_numpy(),
                          "b_subset": table.loc[codes, "b_subset"].to_numpy()})
    return adata, gates, truth


def _f1(truth: np.ndarray, called: np.ndarray) -> float:
    return 2.0 * float((truth & called).sum()) / max(int(truth.sum() + called.sum()), 1)


@pytest.mark.parametrize("export", ["raw", "compressed"])
@pytest.mark.parametrize("profile", ["healthy_adult", "naive_return"])
def test_a_visit_gated_alone_gets_every_subset_within_two_points(tmp_path, profile, export):
    path = tmp_path / f"{profile}.fcs"
    simulate_visit(path, profile=profile, export=export, seed=3)
    adata, gates, truth = _run_one(path, export=export)
    called_b = adata.obs["cell_type"].to_numpy() == "B"
    true_b = truth["category"].to_numpy() == "b_cells"
    assert _f1(true_b, called_b) > 0.98
    subset = adata.obs["b_subset"].astype(str).to_numpy()
    for name in SUBSETS:
        true_pct = 100.0 * (truth["b_subset"].to_numpy()[true_b] == name).mean()
        called_pct = 100.0 * (subset[called_b] == name).mean()
        assert called_pct == pytest.approx(true_pct, abs=2.0), (name, called_pct, true_pct)
    # Nothing here is unreliable, and nothing is flagged.
    assert set(gates["reliability"]) <= {"ok"}
    assert (gates["flag"] == "").all()
    assert adata.uns["annotate"]["not_evaluable"] == ""


def test_the_simulated_visit_has_the_shapes_of_real_blood(tmp_path):
    path = tmp_path / "v.fcs"
    truth_row = simulate_visit(path, profile="healthy_adult", seed=1)
    naive = truth_row["naive_pct_b"]
    assert 60.0 <= naive <= 85.0
    memory = truth_row["unswitched_memory_pct_b"] + truth_row["switched_memory_pct_b"]
    assert 10.0 <= memory <= 25.0
    adata, _, truth = _run_one(path, export="raw")
    b_cells = truth["category"].to_numpy() == "b_cells"
    igd = adata[:, adata.var["canonical"] == "IgD"].X.ravel()[b_cells]
    # IgD on B cells: no deep valley between the IgD- memory and the naive cells (the pool's
    # deepest valley, if any, is shallow or elsewhere), so a valley learner alone fails here.
    fit = learn_marker_threshold(igd)
    t_cells = truth["category"].to_numpy() == "t_cells"
    t_igd = adata[:, adata.var["canonical"] == "IgD"].X.ravel()[t_cells]
    # ... and the IgD- cells sit at the T cells' level.
    negative = np.isin(truth["b_subset"].to_numpy()[b_cells],
                       ["switched_memory", "double_negative"])
    assert abs(np.median(igd[negative]) - np.median(t_igd)) < 0.5
    assert fit.method in ("valley", "upper_tail")


def test_a_nonspecific_cd19_channel_makes_b_cells_not_evaluable(tmp_path):
    path = tmp_path / "v.fcs"
    simulate_visit(path, profile="healthy_adult", nonspecific="CD19", seed=2)
    adata, gates, _ = _run_one(path, export="raw")
    cd19 = gates[gates["marker"] == "CD19"].iloc[0]
    assert cd19["reliability"] == "nonspecific"
    samples = bl.cohort.quantify({"v": adata}, sample_sheet=pd.DataFrame(
        [{"sample_id": "v", "patient_id": "H", "day": -1, "modality": "flow", "path": "x"}]))
    row = samples.iloc[0]
    assert pd.isna(row["b_cells"]) and pd.isna(row["b_pct_lymphocytes"])
    assert pd.isna(row["naive_pct_b"])
    assert row["cd20_pos"] > 0 and np.isfinite(row["cd20_pct_lymphocytes"])
    assert "b_cells" in row["not_evaluable"].split(";")


@pytest.mark.parametrize("profile", sorted(VISIT_PROFILES))
def test_simulated_visits_are_reproducible(tmp_path, profile):
    first = simulate_visit(tmp_path / "a.fcs", profile=profile, seed=5, n_events=3000)
    second = simulate_visit(tmp_path / "b.fcs", profile=profile, seed=5, n_events=3000,
                            sample_id="a")
    assert first == second
    assert (tmp_path / "a.fcs").read_bytes() != b""
