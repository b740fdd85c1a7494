"""Flow QC against the simulator's per-event truth.

The demo cohort (fixture preset, default seed: what CI and the workflow run) plants debris,
doublets, dead cells, margin events and, in some files, a burst of shifted events; its
per-event codes say which event is which. ``ingest_flow`` must remove the planted artefacts
and keep the true lymphocytes, on files of every phase of the therapy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bcellmap.config import load_config
from bcellmap.demo import simulate

ingest = pytest.importorskip("bcellmap.flow._ingest")

REMOVED_AT_LEAST = 0.90     # share of each planted artefact class that QC must remove
KEPT_AT_LEAST = 0.90        # share of true lymphocytes (outside an anomaly) QC must keep
LYMPHOCYTE_CATEGORIES = ("t_cells", "nk_cells", "b_cells")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qc") / "demo"
    simulate.simulate_cohort(folder, preset="fixture", seed=simulate.DEFAULT_SEED,
                              scrna=False)
    return folder


def _pick(truth: pd.DataFrame, kind: str) -> pd.Series:
    """The first visit of a kind: a phase of therapy, or a file with an anomaly."""
    if kind == "anomaly":
        return truth[truth["anomaly_events"] > 0].iloc[0]
    return truth[(truth["phase"] == kind) & (truth["anomaly_events"] == 0)].iloc[0]


@pytest.mark.parametrize("kind", ["baseline", "aplasia", "return", "anomaly"])
def test_qc_removes_planted_artefacts_and_keeps_lymphocytes(cohort, kind):
    truth = pd.read_csv(cohort / "truth_samples.tsv", sep="\t")
    codes = pd.read_csv(cohort / "truth_codes.tsv", sep="\t")
    row = _pick(truth, kind)
    adata = ingest.ingest_flow(cohort / f"{row.sample_id}.fcs", config=load_config(),
                               sample_id=row.sample_id,
                               sample_meta={"patient_id": row.patient_id, "day": row.day})
    category = codes["category"].to_numpy()[
        np.load(cohort / "truth_events" / f"{row.sample_id}.npy")]
    kept = adata.obs["qc_pass"].to_numpy()
    assert len(kept) == len(category) == row.events_total

    for planted in ("debris", "doublets", "dead"):
        removed = 1.0 - kept[category == planted].mean()
        assert removed >= REMOVED_AT_LEAST, f"{planted}: {removed:.3f} removed"
    # Saturation: removed on scatter and on compensated fluorescence (the demo's detectors
    # are all compensated: a clipped one corrupts the others), by default.
    import flowio

    fcs = flowio.FlowData(str(cohort / f"{row.sample_id}.fcs"))
    raw = np.reshape(np.asarray(fcs.events, dtype=np.float64), (-1, fcs.channel_count))
    saturated = raw[:, :-1] >= simulate.MARGIN_VALUE
    on_scatter = saturated[:, :3].any(axis=1)
    assert (category[on_scatter] == "margin").all()
    assert 1.0 - kept[on_scatter].mean() >= REMOVED_AT_LEAST
    only_fluorescence = saturated[:, 3:].any(axis=1) & ~on_scatter
    assert only_fluorescence.sum() > 0
    assert adata.obs["qc_margin"].to_numpy()[only_fluorescence].all()

    time = adata.X[:, list(adata.var["canonical"]).index("Time")]
    in_anomaly = np.zeros(len(kept), dtype=bool)
    if row.anomaly_events > 0:
        in_anomaly = (time >= row.anomaly_time_start) & (time <= row.anomaly_time_end)
        assert in_anomaly.sum() == row.anomaly_events
        removed = 1.0 - kept[in_anomaly].mean()
        assert removed >= REMOVED_AT_LEAST, f"anomaly window: {removed:.3f} removed"

    lymphocytes = np.isin(category, LYMPHOCYTE_CATEGORIES) & ~in_anomaly
    assert kept[lymphocytes].mean() >= KEPT_AT_LEAST, (
        f"lymphocytes kept {kept[lymphocytes].mean():.3f}; removed by step: "
        + ", ".join(f"{c} {adata.obs[c].to_numpy()[lymphocytes].mean():.3f}"
                    for c in ("qc_margin", "qc_doublet", "qc_dead", "qc_debris",
                              "qc_time_anomaly")))
    b_cells = (category == "b_cells") & ~in_anomaly
    if b_cells.sum() >= 50:
        assert kept[b_cells].mean() >= KEPT_AT_LEAST
