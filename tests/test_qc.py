"""QC on hand-built events with planted margin events, doublets, dead cells, debris and a
time anomaly: each step must remove what was planted and keep the good events."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bcellmap.cli import main
from bcellmap.config import load_config, merge
from bcellmap.flow._qc import STEPS, collect_qc, dead_flags, qc_reason, run_qc

CANON = ["FSC-A", "FSC-H", "SSC-A", "CD19", "CD3", "Live", "Time"]
KINDS = ["scatter", "scatter", "scatter", "fluorescence", "fluorescence", "viability", "time"]
RANGES = np.full(len(CANON), 262144.0)
# The package defaults (run_qc reads a loaded config's ingest.qc section).
SETTINGS = load_config()["ingest"]["qc"]


def _planted(composition, n=20000, seed=7):
    """Linear events and the planted truth (independent of bcellmap's code)."""
    rng = np.random.default_rng(seed)
    names = list(composition)
    population = rng.choice(len(names), size=n, p=list(composition.values()))
    scatter = {"lymphocyte": ((60000, 6000), (20000, 3000)),
               "monocyte": ((100000, 9000), (60000, 7000)),
               "granulocyte": ((125000, 10000), (140000, 14000)),
               "debris": ((14000, 5000), (12000, 6000))}
    fsc = np.empty(n)
    ssc = np.empty(n)
    for k, name in enumerate(names):
        (fm, fs), (sm, ss) = scatter[name]
        rows = population == k
        fsc[rows] = rng.normal(fm, fs, rows.sum())
        ssc[rows] = np.abs(rng.normal(sm, ss, rows.sum()))
    fsc = np.abs(fsc) + 500
    is_doublet = rng.random(n) < 0.03
    ratio = rng.normal(1.15, 0.03, n)
    fsc_area = np.where(is_doublet, fsc * 2.0, fsc)
    fsc_height = np.where(is_doublet, fsc * 1.2 / 1.15, fsc / ratio)
    is_dead = rng.random(n) < 0.10
    live = np.where(is_dead, rng.normal(4.5, 0.35, n), rng.normal(1.5, 0.35, n))
    time = np.sort(rng.uniform(0, 1000, n))
    is_time_anomaly = (time >= 500) & (time < 520)
    cd19 = rng.normal(1.0, 0.5, n) + np.where(is_time_anomaly, 2.5, 0.0)
    cd3 = rng.normal(2.0, 0.8, n)
    linear = np.column_stack([fsc_area, fsc_height, ssc, 150 * np.sinh(cd19),
                              150 * np.sinh(cd3), 150 * np.sinh(live), time])
    is_margin = np.zeros(n, dtype=bool)
    saturated = rng.choice(n, 150, replace=False)
    linear[saturated[:100], 3] = 262143.0        # saturated CD19
    linear[saturated[100:130], 2] = 262143.0     # saturated SSC-A
    linear[saturated[130:], 0] = -4.0e5          # impossible negative FSC-A
    # Saturated CD19 is a bright cell: counted, not removed (default remove_saturated).
    is_margin[saturated[100:]] = True
    # Events that saturate scatter on their own (e.g. large doublets) are margin events too.
    is_margin |= np.any(linear[:, :3] >= 262143.0, axis=1)
    truth = pd.DataFrame({"population": np.array(names)[population], "doublet": is_doublet,
                          "dead": is_dead, "time_anomaly": is_time_anomaly,
                          "margin": is_margin})
    return linear, truth


def _transform(linear):
    X = linear.copy()
    X[:, :3] = linear[:, :3] / 262144 * 10
    X[:, 3:6] = np.arcsinh(linear[:, 3:6] / 150)
    return X.astype(np.float32)


@pytest.mark.parametrize("composition", [
    {"lymphocyte": 0.30, "monocyte": 0.25, "granulocyte": 0.25, "debris": 0.20},
    {"lymphocyte": 0.80, "debris": 0.20},
])
def test_each_step_removes_what_was_planted(composition):
    linear, truth = _planted(composition)
    flags, steps, learned = run_qc(_transform(linear), linear, canonicals=CANON, kinds=KINDS,
                                   ranges=RANGES, settings=SETTINGS, seed=42)
    margin = flags["qc_margin"]
    np.testing.assert_array_equal(margin, truth["margin"].to_numpy())
    assert learned["margin"]["counted"]["CD19"] >= 100 and not flags["qc_non_finite"].any()

    ok = ~truth["margin"].to_numpy()
    doublet = flags["qc_doublet"]
    assert doublet[ok & truth["doublet"]].mean() >= 0.95
    assert doublet[ok & ~truth["doublet"]].mean() <= 0.01

    dead = flags["qc_dead"]
    assert dead[ok & truth["dead"]].mean() >= 0.97
    assert dead[ok & ~truth["dead"]].mean() <= 0.01

    debris = flags["qc_debris"]
    lymph = ok & (truth["population"] == "lymphocyte").to_numpy() & ~truth["doublet"].to_numpy()
    assert debris[lymph].mean() <= 0.05          # keeps most lymphocytes
    junk = ok & (truth["population"] == "debris").to_numpy()
    assert debris[junk].mean() >= 0.95           # removes debris
    others = ok & truth["population"].isin(["monocyte", "granulocyte"]).to_numpy()
    if others.any():
        assert debris[others].mean() >= 0.95     # and non-lymphocytes

    anomaly = flags["qc_time_anomaly"]
    planted = truth["time_anomaly"].to_numpy()
    assert anomaly[planted].mean() >= 0.9
    assert anomaly[~planted].mean() <= 0.02

    # The table counts steps sequentially; the last row's events_out is the QC-passed count.
    assert [s["step"] for s in steps] == list(STEPS)
    passed = ~np.logical_or.reduce(list(flags.values()))
    assert steps[-1]["events_out"] == passed.sum()
    for before, after in zip(steps, steps[1:], strict=False):
        assert after["events_in"] == before["events_out"]
        assert before["events_in"] - before["events_removed"] == before["events_out"]
    assert learned["dead"]["method"] == "density valley"
    reason = qc_reason(flags)
    assert (reason[margin] == "margin").all()
    assert (reason[passed] == "pass").all()


def test_steps_without_channels_are_skipped_and_recorded():
    linear, _ = _planted({"lymphocyte": 1.0}, n=2000)
    keep = [3, 4]  # CD19, CD3 only
    flags, steps, _ = run_qc(_transform(linear)[:, keep], linear[:, keep],
                             canonicals=[CANON[i] for i in keep],
                             kinds=[KINDS[i] for i in keep], ranges=RANGES[keep],
                             settings=SETTINGS, seed=1)
    details = {s["step"]: s["detail"] for s in steps}
    for step in ("doublets", "dead", "debris", "time_anomaly"):
        assert details[step].startswith("skipped:"), details[step]
    assert all(s["events_removed"] == 0 for s in steps if s["step"] != "margin")


def test_dead_gate_valley_and_single_peak():
    """The viability gate uses the package's density learner: a valley between 10% dead and
    90% live cells, and the live peak's upper tail (median + 5 SD) without dead cells."""
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(1.0, 0.3, 9000), rng.normal(4.0, 0.3, 1000)])
    flags, info = dead_flags(two, fit_mask=np.ones(two.size, bool), threshold=None,
                             fallback_mad_cutoff=5.0)
    assert info["method"] == "density valley" and 2.0 < info["threshold"] < 3.2
    assert abs(int(flags.sum()) - 1000) <= 5
    live = rng.normal(1.0, 0.3, 10000)
    flags, info = dead_flags(live, fit_mask=np.ones(live.size, bool), threshold=None,
                             fallback_mad_cutoff=5.0)
    assert info["method"] == "single peak: median + MAD"
    assert abs(info["threshold"] - (1.0 + 5 * 0.3)) < 0.1 and flags.sum() <= 2


def test_no_dead_cells_planted_removes_almost_nothing():
    rng = np.random.default_rng(5)
    from bcellmap.flow._qc import dead_flags

    live = rng.normal(1.5, 0.35, 10000)
    flag, info = dead_flags(live, fit_mask=np.ones(live.size, dtype=bool), threshold=None,
                            fallback_mad_cutoff=5.0)
    assert flag.mean() < 0.001 and info["method"].startswith("single peak")


def test_collect_qc_concatenates(tmp_path):
    paths = []
    for sample in ("A", "B"):
        frame = pd.DataFrame({"sample_id": sample, "step": list(STEPS), "events_in": 10,
                              "events_removed": 0, "events_out": 10, "detail": "x"})
        path = tmp_path / f"{sample}.tsv"
        frame.to_csv(path, sep="\t", index=False)
        paths.append(str(path))
    out = tmp_path / "tables" / "qc.tsv"
    assert main(["collect-qc", "--inputs", *paths, "--out", str(out)]) == 0
    combined = pd.read_csv(out, sep="\t")
    assert len(combined) == 2 * len(STEPS) and list(combined["sample_id"].unique()) == ["A", "B"]
    assert collect_qc([]).columns.tolist() == list(combined.columns)


def _log_channel_qc(remove_saturated):
    """An FCS 2.0-like file: $PnR 1024, FL1 log-amplified over 4 decades (CellQuest)."""
    from bcellmap.io.fcs import _linearise

    meta = [{"pne": (0.0, 0.0), "png": 1.0, "pnr": 1024.0},
            {"pne": (4.0, 1.0), "png": 1.0, "pnr": 1024.0}]
    raw = np.array([[500.0, 800.0], [600.0, 1000.0], [700.0, 1022.0], [650.0, 1023.0],
                    [1023.0, 300.0]])
    linear = _linearise(raw.copy(), meta, datatype="I", time_index=None)
    ranges = np.array([1024.0, 1024.0])
    saturation = _linearise((ranges - 1)[None, :].copy(), meta, datatype="I",
                            time_index=None)[0]
    settings = merge(SETTINGS, {"margin": {"remove_saturated": remove_saturated}})
    return run_qc(linear.astype(np.float32), linear, canonicals=["FSC-H", "CD19"],
                  kinds=["scatter", "fluorescence"], ranges=ranges, settings=settings, seed=0,
                  saturation=saturation)


def test_saturation_is_judged_on_raw_channels_of_log_data():
    # Hand-computed: raw 800 of 1024 over 4 decades is 10**(3200/1024) = 1333.5, above the
    # old (wrong) limit $PnR - 1 = 1023 but not saturated; raw 1023 is saturated.
    assert 10 ** (4 * 800 / 1024) == pytest.approx(1333.52, rel=1e-4)
    flags, steps, learned = _log_channel_qc(["scatter"])
    # Only the saturated scatter event (raw FSC 1023) is removed; CD19 at raw 1023 counted.
    np.testing.assert_array_equal(flags["qc_margin"], [False, False, False, False, True])
    assert learned["margin"]["counted"] == {"CD19": 1}
    assert learned["margin"]["removed"] == {"FSC-H": 1}
    margin = next(s for s in steps if s["step"] == "margin")
    assert margin["events_removed"] == 1 and "kept (counted): CD19 1" in margin["detail"]
    flags, _, _ = _log_channel_qc(["scatter", "fluorescence"])
    np.testing.assert_array_equal(flags["qc_margin"], [False, False, False, True, True])


def test_non_finite_events_are_a_step_of_their_own_before_the_others():
    linear, _ = _planted({"lymphocyte": 1.0}, n=3000)
    linear[[5, 17], 3] = np.nan
    linear[40, 0] = np.inf
    X = _transform(linear)
    flags, steps, _ = run_qc(X, linear, canonicals=CANON, kinds=KINDS, ranges=RANGES,
                             settings=SETTINGS, seed=3)
    assert steps[0]["step"] == STEPS[0] == "non_finite"
    assert steps[0]["events_removed"] == 3 and steps[0]["events_out"] == 2997
    np.testing.assert_array_equal(np.flatnonzero(flags["qc_non_finite"]), [5, 17, 40])
    reason = qc_reason(flags)
    assert set(reason[[5, 17, 40]]) == {"non_finite"}
    # Disabling is not possible: later steps could not fit on NaN.
    flags, steps, _ = run_qc(X, linear, canonicals=CANON, kinds=KINDS, ranges=RANGES,
                             settings={**SETTINGS, "non_finite": {"enabled": False}}, seed=3)
    assert steps[0]["events_removed"] == 3


def test_ingest_with_nan_and_inf_events_counts_and_removes_them(tmp_path):
    import flowio

    from bcellmap.config import load_config, merge
    from bcellmap.flow._ingest import ingest_flow

    linear, _ = _planted({"lymphocyte": 0.8, "debris": 0.2}, n=3000, seed=11)
    linear = np.clip(linear, -1e5, 262000).astype(np.float32)
    linear[[3, 99], 3] = np.nan
    linear[500, 0] = np.inf
    names = ["FSC-A", "FSC-H", "SSC-A", "PE-A", "FITC-A", "APC-Cy7-A", "Time"]
    path = tmp_path / "nan.fcs"
    with open(path, "wb") as handle:
        flowio.create_fcs(handle, linear.ravel().tolist(), names,
                          opt_channel_names=["", "", "", "CD19", "CD3", "Live", ""])
    config = merge(load_config(), {"ingest": {"required_markers": [],
                                              "compensation": {"source": "none"}}})
    adata = ingest_flow(path, config=config, sample_id="nan")
    assert np.isfinite(adata.X).all() and np.isfinite(adata.layers["compensated"]).all()
    np.testing.assert_array_equal(np.flatnonzero(adata.obs["qc_non_finite"]), [3, 99, 500])
    assert not adata.obs["qc_pass"].to_numpy()[[3, 99, 500]].any()
    table = adata.uns["qc"]["table"]
    assert list(table["step"]) == list(STEPS) and table["events_removed"][0] == 3


def test_viability_gate_of_a_live_cell_export_stays_above_its_live_peak():
    # A live-cell export: one live population with a small dim shoulder (compensation spread
    # below it), the same scatter throughout. The first density valley lies below the live
    # peak; a gate there would call 90% of the export dead.
    rng = np.random.default_rng(2)
    viability = np.concatenate([rng.normal(0.2, 0.25, 1_000), rng.normal(1.5, 0.3, 9_000)])
    fsc = rng.normal(60_000, 6_000, viability.size)
    fit = np.ones(viability.size, dtype=bool)
    flags, info = dead_flags(viability, fit_mask=fit, threshold=None, fallback_mad_cutoff=5.0,
                             fsc=fsc)
    assert flags.mean() < 0.02
    assert info["threshold"] > 1.5 and "dominant (live) peak" in info["method"]
    # Dead cells are the bright, shrunken ones: a bright majority with a smaller FSC is dead.
    dead_fsc = np.where(viability > 0.9, rng.normal(35_000, 4_000, viability.size), fsc)
    flags, info = dead_flags(viability, fit_mask=fit, threshold=None, fallback_mad_cutoff=5.0,
                             fsc=dead_fsc)
    assert flags.mean() > 0.85 and info["method"] == "density valley"


def test_a_step_that_removes_most_events_is_flagged_by_name():
    linear, truth = _planted({"lymphocyte": 0.15, "granulocyte": 0.75, "debris": 0.10})
    flags, steps, learned = run_qc(_transform(linear), linear, canonicals=CANON, kinds=KINDS,
                                   ranges=RANGES, settings=SETTINGS, seed=0)
    removed = {s["step"]: s["events_removed"] / s["events_in"] for s in steps}
    assert removed["debris"] > 0.5
    assert learned["flags"] == ["debris_removed_most"]
    debris = next(s for s in steps if s["step"] == "debris")
    assert "flagged" in debris["detail"]
    # A PBMC-like file loses no step's majority: nothing flagged.
    linear, _ = _planted({"lymphocyte": 0.8, "monocyte": 0.1, "debris": 0.1})
    _, _, learned = run_qc(_transform(linear), linear, canonicals=CANON, kinds=KINDS,
                           ranges=RANGES, settings=SETTINGS, seed=0)
    assert learned["flags"] == []


def test_lymphocytes_by_their_markers_removed_by_the_scatter_gate_are_measured():
    from bcellmap.flow._qc import FLAG_COLUMNS, _lineage_cells_removed

    rng = np.random.default_rng(4)
    n = 10_000
    t_cell = rng.random(n) < 0.6
    cd3 = np.where(t_cell, rng.normal(3.5, 0.3, n), rng.normal(0.3, 0.3, n))
    X = np.column_stack([cd3]).astype(np.float32)
    flags = {column: np.zeros(n, dtype=bool) for column in FLAG_COLUMNS.values()}
    # A scatter gate learned for whole blood, cutting 40% of a live-cell export's T cells.
    flags[FLAG_COLUMNS["debris"]] = t_cell & (rng.random(n) < 0.4)
    found = _lineage_cells_removed(X, {"CD3": 0}, flags)
    assert found["markers"] == ["CD3"]
    assert found["removed_pct"] == pytest.approx(40.0, abs=3.0)
    # Events removed at random (5% of all): about 5% of the T cells too.
    flags[FLAG_COLUMNS["debris"]] = rng.random(n) < 0.05
    assert _lineage_cells_removed(X, {"CD3": 0}, flags)["removed_pct"] < 8.0
    # One B-lineage channel alone is no reference (spillover, autofluorescence): no check.
    assert _lineage_cells_removed(X, {"CD19": 0}, flags) is None
