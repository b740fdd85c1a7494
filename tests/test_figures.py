"""Tests of the report figures (bcellmap.report.figures) on small hand-made tables.

The tables follow the contracts of results/tables/{samples,kinetics,qc}.tsv; every expected
value below is computed by hand (or by numpy on the generated events), not by the code under
test.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from bcellmap.errors import InputError  # noqa: E402
from bcellmap.report import figures  # noqa: E402

SUBSETS = figures.SUBSETS
DAYS = (-5, 3, 7, 14, 28, 56, 84, 112, 150, 240, 365)
MARKERS = ("CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24")
BASELINE_MIX = {"transitional": 4.0, "naive": 65.0, "unswitched_memory": 10.0,
                "switched_memory": 15.0, "double_negative": 5.0, "plasmablast": 1.0}
RETURN_MIX = {"transitional": 25.0, "naive": 70.0, "unswitched_memory": 2.0,
              "switched_memory": 2.0, "double_negative": 1.0, "plasmablast": 0.0}
# patient -> (baseline B/µL, reconstitution day or None, B/µL after return, CD19- share on return)
PATIENTS = {
    "P01": (250.0, 84, 120.0, 0.0),
    "P02": (180.0, 112, 60.0, 0.0),
    "P03": (300.0, 112, 150.0, 0.4),  # CD19-CD20+ B cells on return
    "P04": (120.0, 150, 25.0, 0.0),
    "P05": (100.0, None, 0.0, 0.0),   # never returns: censored at day 365
}


def _sample_row(patient: str, day: int, *, b_per_ul: float, cd19_negative_share: float,
                lymphocytes_per_ul: float, lymphocyte_events: int, modality: str = "flow",
                mix: dict[str, float] | None = None, absolute: bool = True) -> dict:
    """One samples.tsv row with counts consistent with a B-cell level per µL."""
    b_events = int(round(b_per_ul / lymphocytes_per_ul * lymphocyte_events))
    cd19neg = int(round(b_events * cd19_negative_share))
    b_pct = 100.0 * b_events / lymphocyte_events
    row = {
        "sample_id": f"{patient}_d{day}{'_sc' if modality == 'scrna' else ''}",
        "patient_id": patient, "day": day, "modality": modality,
        "events_total": lymphocyte_events + 5000, "events_qc_pass": lymphocyte_events,
        "lymphocytes": lymphocyte_events, "b_cells": b_events,
        "cd19_pos": b_events - cd19neg, "cd20_pos": b_events, "cd19neg_cd20pos": cd19neg,
        "b_pct_lymphocytes": b_pct,
        "cd19_pct_lymphocytes": 100.0 * (b_events - cd19neg) / lymphocyte_events,
        "cd20_pct_lymphocytes": b_pct,
        "b_per_ul": b_pct / 100.0 * lymphocytes_per_ul if absolute else np.nan,
        "lloq_pct_lymphocytes": 3.0 / lymphocyte_events * 100.0,
        "lymphocytes_per_ul": lymphocytes_per_ul if absolute else np.nan,
    }
    for subset in SUBSETS:
        pct = (mix or {}).get(subset, np.nan) if b_events else np.nan
        row[f"{subset}_pct_b"] = pct
        row[f"{subset}_count"] = 0 if not b_events else int(round(pct / 100 * b_events))
    return row


def realistic_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Samples, kinetics and QC tables of a 5-patient cohort with known kinetics."""
    rows, kinetics = [], []
    for number, (patient, (baseline, back, level, cd19neg)) in enumerate(PATIENTS.items()):
        for visit, day in enumerate(DAYS):
            lymphocytes_per_ul = 900.0 + 50.0 * number + 30.0 * visit
            events = 20000 + 1000 * visit
            if day <= 0:
                b_per_ul, mix, share = baseline, BASELINE_MIX, 0.0
            elif back is not None and day >= back:
                b_per_ul, mix, share = level * (1 + 0.3 * (day - back) / 100), RETURN_MIX, cd19neg
            else:
                b_per_ul, mix, share = 0.0, None, 0.0  # aplasia: 0 events
            rows.append(_sample_row(patient, day, b_per_ul=b_per_ul, cd19_negative_share=share,
                                    lymphocytes_per_ul=lymphocytes_per_ul,
                                    lymphocyte_events=events, mix=mix))
        kinetics.append({
            "patient_id": patient, "modality": "flow", "measure": "b",
            "baseline_value": baseline, "depletion_day": 3, "nadir_value": 0.0,
            "reconstitution_day": back if back is not None else np.nan,
            "aplasia_days": (back - 3) if back is not None else 365 - 3,
            "censored": back is None, "last_day": 365, "flags": "",
        })
    samples = pd.DataFrame(rows)
    qc_rows = []
    rng = np.random.default_rng(1)
    for sample_id, total in zip(samples["sample_id"], samples["events_total"], strict=True):
        events_in = int(total)
        for step in ("margin", "doublets", "dead", "debris", "time_anomaly"):
            removed = int(rng.integers(0, events_in // 10))
            qc_rows.append({"sample_id": sample_id, "step": step, "events_in": events_in,
                            "events_removed": removed, "events_out": events_in - removed,
                            "detail": ""})
            events_in -= removed
    return samples, pd.DataFrame(kinetics), pd.DataFrame(qc_rows)


def annotated_h5ad(path: Path, *, sample_id: str, n_events: int, seed: int) -> object:
    """A small annotated flow AnnData: three metaclusters with known marker levels."""
    import anndata

    rng = np.random.default_rng(seed)
    centres = {  # metacluster -> (cell_type, b_subset, marker means in MARKERS order)
        0: ("T", "", [4.0, 0.2, 0.3, 0.2, 2.0, 1.0, 0.5]),
        1: ("B", "naive", [0.2, 3.5, 3.8, 3.0, 0.3, 1.5, 2.0]),
        2: ("B", "switched_memory", [0.2, 3.2, 3.5, 0.3, 3.0, 1.0, 1.5]),
    }
    metacluster = rng.integers(0, 3, n_events)
    x = np.vstack([np.asarray(centres[m][2]) for m in metacluster])
    x = (x + rng.normal(0, 0.3, x.shape)).astype(np.float32)
    scatter = rng.uniform(2, 5, (n_events, 1)).astype(np.float32)
    adata = anndata.AnnData(
        X=np.hstack([scatter, x]),
        obs=pd.DataFrame({
            "event_index": np.arange(n_events),
            "metacluster": metacluster,
            "cell_type": [centres[m][0] for m in metacluster],
            "b_subset": [centres[m][1] for m in metacluster],
        }, index=[str(i) for i in range(n_events)]),
        var=pd.DataFrame({"canonical": ["FSC-A", *MARKERS]},
                         index=["FSC-A", "BV510-A", "PE-Cy7-A", "APC-A", "FITC-A", "BV421-A",
                                "PerCP-A", "PE-A"]),
    )
    adata.uns["sample"] = {"sample_id": sample_id, "patient_id": "P01", "day": -5,
                           "modality": "flow", "panel": "default"}
    adata.write_h5ad(path)
    return adata


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return realistic_tables()


def _write_inputs(directory: Path, samples, kinetics, qc) -> dict[str, Path]:
    paths = {name: directory / f"{name}.tsv" for name in ("samples", "kinetics", "qc",
                                                          "cohort")}
    samples.to_csv(paths["samples"], sep="\t", index=False)
    kinetics.to_csv(paths["kinetics"], sep="\t", index=False)
    qc.to_csv(paths["qc"], sep="\t", index=False)
    paths["cohort"].write_text("statistic\tvalue\n")
    return paths


def _report(paths: dict[str, Path], annotated: list[Path], outdir: Path,
            config: Path | None = None) -> int:
    """Run ``bcellmap report``; return its exit status."""
    from bcellmap.cli import main

    argv = ["report", "--samples-table", str(paths["samples"]),
            "--kinetics", str(paths["kinetics"]), "--cohort", str(paths["cohort"]),
            "--qc", str(paths["qc"]), "--model", str(outdir / "absent.npz"),
            "--outdir", str(outdir), "--annotated", *[str(p) for p in annotated]]
    if config is not None:
        argv += ["--config", str(config)]
    return main(argv)


def _by_gid(fig, gid: str):
    found = [a for a in fig.findobj() if a.get_gid() == gid]
    assert found, f"no artist with gid {gid!r}"
    return found[0]


def test_cli_report_writes_every_figure(tmp_path, tables):
    samples, kinetics, qc = tables
    paths = _write_inputs(tmp_path, samples, kinetics, qc)
    annotated = [tmp_path / "S1.h5ad", tmp_path / "S2.h5ad"]
    annotated_h5ad(annotated[0], sample_id="S1", n_events=300, seed=1)
    annotated_h5ad(annotated[1], sample_id="S2", n_events=200, seed=2)
    config = tmp_path / "config.yaml"
    config.write_text("report:\n  embedding_events: 400\n")
    outdir = tmp_path / "report"
    assert _report(paths, annotated, outdir, config) == 0
    stems = [f"patient_{p}" for p in PATIENTS] + [
        "cohort_trajectories", "swimmer", "kaplan_meier", "composition_visits",
        "composition_baseline_vs_reconstitution", "cluster_heatmap", "embedding", "qc_removed",
        "flags",
    ] + [f"gates_{p}" for p in PATIENTS]  # every patient has flow rows
    for stem in stems:
        png = imread(outdir / f"{stem}.png")
        assert png.shape[0] > 300 and png.shape[1] > 600, stem
        assert png[..., :3].std() > 0.01, f"{stem}.png is blank"
        root = ElementTree.parse(outdir / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")
        # Journal width: at most 7 inches (SVG size is in points).
        assert float(root.get("width").removesuffix("pt")) <= 7 * 72 + 1
    assert sorted(p.name for p in outdir.iterdir()) == sorted(
        f"{s}.{e}" for s in stems for e in ("png", "svg"))


def _marker_is(collection, marker: str) -> bool:
    """True when a scatter's marker path is matplotlib's ``marker`` path."""
    from matplotlib.markers import MarkerStyle

    style = MarkerStyle(marker)
    expected = style.get_path().transformed(style.get_transform()).vertices
    drawn = collection.get_paths()[0].vertices
    return drawn.shape == expected.shape and np.allclose(drawn, expected)


def _is_open(collection) -> bool:
    """Open (white-filled) markers."""
    return bool(np.allclose(collection.get_facecolors()[:, :3], 1.0))


def _joined_pairs(line) -> list[tuple[float, float]]:
    """(x0, x1) of every segment a Line2D draws: consecutive points both finite."""
    x = np.asarray(line.get_xdata(), dtype=float)
    y = np.asarray(line.get_ydata(), dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    return [(x[i], x[i + 1]) for i in range(len(x) - 1) if ok[i] and ok[i + 1]]


def _offset_days(collection) -> list[float]:
    return sorted(np.asarray(collection.get_offsets())[:, 0].tolist())


def test_patient_lloq_and_levels_per_ul(tables):
    samples, kinetics, _ = tables
    fig = figures.plot_patient(samples, kinetics, "P03")
    rows = samples[samples["patient_id"] == "P03"].sort_values("day")
    lloq = _by_gid(fig, "lloq_flow")
    expected_lloq = 3.0 / rows["lymphocytes"] * 100 / 100 * rows["lymphocytes_per_ul"]
    np.testing.assert_allclose(lloq.get_ydata(), expected_lloq.to_numpy(), rtol=1e-9)
    assert "cells/µL" in fig.axes[0].get_ylabel()
    # During aplasia (0 events) CD19 is an upper bound: an open down-triangle at the LLOQ, and
    # the measured line is broken there (NaN), so no segment joins unmeasured visits.
    line = _by_gid(fig, "level_cd19_flow")
    cd19 = np.asarray(line.get_ydata(), dtype=float)
    aplastic = ((rows["day"] > 0) & (rows["day"] < 112)).to_numpy()
    assert np.isnan(cd19[aplastic]).all()
    aplastic_days = set(rows["day"][aplastic])
    assert _joined_pairs(line), "measured visits are still joined"
    assert not [p for p in _joined_pairs(line) if set(p) & aplastic_days]
    bounds = _by_gid(fig, "below_lloq_cd19_flow")
    assert _offset_days(bounds) == sorted(rows["day"][aplastic])
    np.testing.assert_allclose(np.asarray(bounds.get_offsets())[:, 1],
                               expected_lloq.to_numpy()[aplastic])
    assert _marker_is(bounds, "v") and _is_open(bounds)
    after = (rows["day"] >= 112).to_numpy()
    expected_cd19 = (rows["cd19_pos"] / rows["lymphocytes"] * rows["lymphocytes_per_ul"])
    np.testing.assert_allclose(cd19[after], expected_cd19.to_numpy()[after], rtol=1e-9)
    measured = _by_gid(fig, "measured_cd19_flow")
    assert _marker_is(measured, "o") and not _is_open(measured)
    assert _offset_days(measured) == sorted(rows["day"][~aplastic])
    # CD20 above CD19 on return: the CD19-CD20+ cells are visible.
    cd20 = np.asarray(_by_gid(fig, "level_cd20_flow").get_ydata(), dtype=float)
    assert np.all(cd20[after] > cd19[after] * 1.5)
    assert fig.axes[0].get_yscale() == "log"
    assert _by_gid(fig, "depletion").get_xdata()[0] == 3
    assert _by_gid(fig, "reconstitution").get_xdata()[0] == 112
    assert _by_gid(fig, "day0").get_xdata()[0] == 0
    # An old table (no loq_* and no *_ci_* columns): no LOQ line, no CI bars, nothing hollow.
    gids = {a.get_gid() for a in fig.findobj()}
    assert not {"loq_flow", "ci_cd19_flow", "ci_cd20_flow"} & gids
    assert len(_by_gid(fig, "below_loq_cd19_flow").get_offsets()) == 0
    # No discordance flag in the kinetics table: nothing drawn for it.
    assert not {"discordance_flow", "discordance_note"} & gids


def test_patient_percent_without_absolute_counts_and_scrna_only():
    # scRNA-only patient, no absolute counts, all B counts zero.
    rows = [_sample_row("S9", day, b_per_ul=0.0, cd19_negative_share=0.0,
                        lymphocytes_per_ul=1000.0, lymphocyte_events=4000, modality="scrna",
                        absolute=False) for day in (-3, 30, 90)]
    samples = pd.DataFrame(rows)
    kinetics = pd.DataFrame(columns=["patient_id", "modality", "measure", "depletion_day",
                                     "reconstitution_day", "aplasia_days", "censored",
                                     "last_day"])
    fig = figures.plot_patient(samples, kinetics, "S9")
    assert "% of lymphocytes" in fig.axes[0].get_ylabel()
    np.testing.assert_allclose(_by_gid(fig, "lloq_scrna").get_ydata(), [3 / 4000 * 100] * 3)
    # Zero events everywhere: no measured line at all, three upper bounds at the LLOQ.
    assert np.isnan(np.asarray(_by_gid(fig, "level_cd20_scrna").get_ydata(), float)).all()
    np.testing.assert_allclose(
        np.asarray(_by_gid(fig, "below_lloq_cd20_scrna").get_offsets())[:, 1],
        [3 / 4000 * 100] * 3)


def _quantified_patient() -> tuple[pd.DataFrame, pd.DataFrame]:
    """One patient with the new samples.tsv columns: loq_*, below_loq and 95% CI bounds.

    B events per visit (20,000 lymphocyte events, 1,000 lymphocytes/µL): baseline 2,000;
    days 7 and 14 none; day 28 two (below the 3-event LLOQ); days 60 and 90 20 and 40 (above
    the LLOQ, below the 50-event LOQ); day 120 400. CI bounds are made-up numbers, distinct
    per visit, so the test can see that the figure draws exactly them.
    """
    events = {-5: 2000, 7: 0, 14: 0, 28: 2, 60: 20, 90: 40, 120: 400}
    lymphocyte_events, per_ul = 20000, 1000.0
    rows = []
    for day, b in events.items():
        row = _sample_row("Q1", day, b_per_ul=b / lymphocyte_events * per_ul,
                          cd19_negative_share=0.0, lymphocytes_per_ul=per_ul,
                          lymphocyte_events=lymphocyte_events, mix=BASELINE_MIX)
        assert row["b_cells"] == b
        row["lloq_per_ul"] = 3 / lymphocyte_events * per_ul
        row["loq_pct_lymphocytes"] = 50 / lymphocyte_events * 100
        row["loq_per_ul"] = 50 / lymphocyte_events * per_ul
        row["below_loq"] = b < 50
        for measure in ("b", "cd19", "cd20"):
            level = row[f"{measure}_pct_lymphocytes"]
            row[f"{measure}_pct_lymphocytes_ci_low"] = level * 0.5
            row[f"{measure}_pct_lymphocytes_ci_high"] = level * 2.0 + 0.001 * (day + 10)
            row[f"{measure}_per_ul_ci_low"] = level / 100 * per_ul * 0.5
            row[f"{measure}_per_ul_ci_high"] = level / 100 * per_ul * 2.0 + 0.01 * (day + 10)
        rows.append(row)
    kinetics = pd.DataFrame([{
        "patient_id": "Q1", "modality": "flow", "measure": "b", "depletion_day": 7,
        "reconstitution_day": np.nan, "aplasia_days": 113, "censored": True, "last_day": 120,
        "flags": "unconfirmed"}])
    return pd.DataFrame(rows), kinetics


def test_patient_loq_ci_and_upper_bounds():
    samples, kinetics = _quantified_patient()
    fig = figures.plot_patient(samples, kinetics, "Q1")
    line = _by_gid(fig, "level_cd19_flow")
    y = np.asarray(line.get_ydata(), dtype=float)
    days = np.asarray(line.get_xdata(), dtype=float)
    # Below the LLOQ (0, 0 and 2 events of a 3-event LLOQ): not measured, not joined.
    below_lloq = {7.0, 14.0, 28.0}
    assert np.isnan(y[np.isin(days, list(below_lloq))]).all()
    pairs = _joined_pairs(line)
    assert not [p for p in pairs if set(p) & below_lloq]
    # Below the LOQ but above the LLOQ: measured (joined), drawn hollow at its value.
    assert (60.0, 90.0) in pairs and (90.0, 120.0) in pairs
    hollow = _by_gid(fig, "below_loq_cd19_flow")
    assert _offset_days(hollow) == [60.0, 90.0] and _is_open(hollow)
    assert _marker_is(hollow, "o")
    np.testing.assert_allclose(np.asarray(hollow.get_offsets())[:, 1], [1.0, 2.0])  # 20, 40 /µL
    filled = _by_gid(fig, "measured_cd19_flow")
    assert _offset_days(filled) == [-5.0, 120.0] and not _is_open(filled)
    bounds = _by_gid(fig, "below_lloq_cd19_flow")
    assert _offset_days(bounds) == [7.0, 14.0, 28.0] and _marker_is(bounds, "v")
    np.testing.assert_allclose(np.asarray(bounds.get_offsets())[:, 1], [0.15] * 3)  # 3/20000*1000
    np.testing.assert_allclose(_by_gid(fig, "loq_flow").get_ydata(), [2.5] * 7)  # 50/20000*1000
    # 95% CI bars exactly at the table's bounds, at measured visits only.
    segments = {float(s[0, 0]): (float(s[0, 1]), float(s[1, 1]))
                for s in _by_gid(fig, "ci_cd19_flow").get_segments()}
    assert sorted(segments) == [-5.0, 60.0, 90.0, 120.0]
    for day, b in ((-5, 2000), (60, 20), (90, 40), (120, 400)):
        level = b / 20000 * 1000
        assert segments[float(day)] == pytest.approx((level * 0.5, level * 2 + 0.01 * (day + 10)))
    # Censored (unconfirmed last visit): said on the plot.
    assert "censored" in _by_gid(fig, "censored").get_text()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("upper bound" in t for t in legend) and any("below LOQ" in t for t in legend)
    assert "95% CI" in legend and any(t.startswith("LOQ (50 events)") for t in legend)


def test_patient_unconfirmed_reconstitution_is_dotted():
    samples, kinetics = _quantified_patient()
    kinetics = kinetics.assign(reconstitution_day=120, censored=False, aplasia_days=113)
    fig = figures.plot_patient(samples, kinetics, "Q1")
    line = _by_gid(fig, "reconstitution")
    assert line.get_xdata()[0] == 120 and line.get_linestyle() == ":"
    assert "unconfirmed" in line.get_label()


def test_patient_discordance_only_for_flagged_patient(tables):
    samples, kinetics, _ = tables
    kinetics = kinetics.copy()
    kinetics.loc[kinetics["patient_id"] == "P03", "flags"] = "cd19_cd20_discordance;x"
    fig = figures.plot_patient(samples, kinetics, "P03")
    rows = samples[samples["patient_id"] == "P03"]
    marks = _by_gid(fig, "discordance_flow")
    # CD19-CD20+ events exist from the return on day 112 (40% of B cells).
    assert _offset_days(marks) == sorted(rows.loc[rows["cd19neg_cd20pos"] > 0, "day"])
    assert _offset_days(marks) == [d for d in DAYS if d >= 112]
    assert "possible CD19 loss/masking" in _by_gid(fig, "discordance_note").get_text()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("CD19−CD20+" in t for t in legend)
    for patient in ("P01", "P05"):
        other = figures.plot_patient(samples, kinetics, patient)
        gids = {a.get_gid() for a in other.findobj()}
        assert not {"discordance_flow", "discordance_note"} & gids, patient


def test_swimmer_bars_equal_aplasia_days(tables):
    samples, kinetics, _ = tables
    fig = figures.plot_swimmer(samples, kinetics)
    for patient, (_, back, _, _) in PATIENTS.items():
        bar = _by_gid(fig, f"aplasia_{patient}")
        expected = (back if back is not None else 365) - 3
        assert bar.get_width() == pytest.approx(expected)
        assert bar.get_x() == pytest.approx(3)
        censored = [a for a in fig.findobj() if a.get_gid() == f"censored_{patient}"]
        marker = [a for a in fig.findobj() if a.get_gid() == f"reconstitution_{patient}"]
        assert bool(censored) == (back is None)
        assert bool(marker) == (back is not None)


def test_kaplan_meier_matches_hand_computation():
    # Reconstitution at 84, 112, 112, 150; one censored at 365 (product-limit by hand).
    samples = pd.DataFrame({"patient_id": ["A", "B", "C", "D", "E"], "modality": "flow",
                            "day": [-5] * 5})
    kinetics = pd.DataFrame({
        "patient_id": ["A", "B", "C", "D", "E"], "modality": "flow", "measure": "b",
        "depletion_day": [3] * 5, "reconstitution_day": [84, 112, 112, 150, np.nan],
        "aplasia_days": [81, 109, 109, 147, 362], "censored": [False] * 4 + [True],
        "last_day": [365] * 5})
    fig = figures.plot_kaplan_meier(samples, kinetics)
    line = _by_gid(fig, "km")
    times, survival = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())

    def at(day: float) -> float:
        return survival[np.searchsorted(times, day, side="right") - 1]

    assert at(0) == pytest.approx(1.0)
    assert at(84) == pytest.approx(4 / 5)
    assert at(112) == pytest.approx(4 / 5 * 2 / 4)
    assert at(150) == pytest.approx(4 / 5 * 2 / 4 * 1 / 2)
    assert at(365) == pytest.approx(0.2)
    ticks = _by_gid(fig, "censor_ticks")
    assert list(ticks.get_xdata()) == [365]


def test_cohort_trajectories_one_line_per_patient(tables):
    samples, kinetics, _ = tables
    fig = figures.plot_cohort_trajectories(samples, kinetics)
    for patient in PATIENTS:
        line = _by_gid(fig, f"trajectory_{patient}")
        rows = samples[samples["patient_id"] == patient].sort_values("day")
        assert line.get_ydata()[0] == pytest.approx(rows["b_per_ul"].iloc[0], rel=1e-9)
        # Aplastic visits (0 events) are upper bounds at the LLOQ, never joined by the line.
        aplastic = set(rows.loc[rows["b_cells"] == 0, "day"].astype(float))
        assert aplastic and set(_offset_days(_by_gid(fig, f"below_lloq_{patient}"))) == aplastic
        assert not [p for p in _joined_pairs(line) if set(p) & aplastic]
        assert np.isnan(np.asarray(line.get_ydata(), float)[rows["b_cells"].to_numpy() == 0]).all()
        assert _marker_is(_by_gid(fig, f"below_lloq_{patient}"), "v")
    # One patient alone still draws; P05 never returns: only its baseline is measured.
    single = figures.plot_cohort_trajectories(samples[samples["patient_id"] == "P05"], kinetics)
    line = _by_gid(single, "trajectory_P05")
    assert line.get_ydata().size == len(DAYS)
    assert _joined_pairs(line) == []
    assert _offset_days(_by_gid(single, "measured_P05")) == [-5.0]


def test_cohort_trajectories_loq_and_ci():
    samples, kinetics = _quantified_patient()
    fig = figures.plot_cohort_trajectories(samples, kinetics)
    assert _offset_days(_by_gid(fig, "below_loq_Q1")) == [60.0, 90.0]
    assert _offset_days(_by_gid(fig, "below_lloq_Q1")) == [7.0, 14.0, 28.0]
    assert _joined_pairs(_by_gid(fig, "trajectory_Q1")) == [(60.0, 90.0), (90.0, 120.0)]
    segments = {float(s[0, 0]): float(s[1, 1]) for s in _by_gid(fig, "ci_Q1").get_segments()}
    assert segments[120.0] == pytest.approx(400 / 20000 * 1000 * 2 + 0.01 * 130)
    # The same table without below_loq, loq_* and CI columns (an older table) still draws.
    old = samples.drop(columns=[c for c in samples.columns
                                if "ci_" in c or "loq_" in c and not c.startswith("lloq")
                                or c == "below_loq"])
    fig = figures.plot_cohort_trajectories(old, kinetics)
    assert len(_by_gid(fig, "below_loq_Q1").get_offsets()) == 0
    assert _offset_days(_by_gid(fig, "measured_Q1")) == [-5.0, 60.0, 90.0, 120.0]
    assert "ci_Q1" not in {a.get_gid() for a in fig.findobj()}


def test_composition_visits_heights_and_hatching(tables):
    samples, _, _ = tables
    fig = figures.plot_composition_visits(samples, min_b_events=50)
    baseline = _by_gid(fig, "P01_d-5:naive")
    assert baseline.get_height() == pytest.approx(65.0)
    assert baseline.get_y() == pytest.approx(4.0)  # stacked on transitional
    assert not baseline.get_hatch()
    # P04 returns at 25 B/µL: 25/1020 * 26000 events ≈ 637 B events -> not hatched; make a
    # low-count visit by hand.
    few = samples.copy()
    few.loc[few["sample_id"] == "P01_d84", "b_cells"] = 30
    fig = figures.plot_composition_visits(few, min_b_events=50)
    assert _by_gid(fig, "P01_d84:naive").get_hatch()
    assert _by_gid(fig, "P01_d84:n_b_events").get_text() == "n = 30 B events"
    assert _by_gid(fig, "P01_d7:no_b_events").get_hatch()
    assert _by_gid(fig, "P01_d7:n_b_events").get_text() == "n = 0 B events"
    # Visits with enough B events carry no count label.
    gids = {a.get_gid() for a in fig.findobj()}
    assert "P01_d-5:n_b_events" not in gids and "P01_d112:n_b_events" not in gids


def test_composition_one_plasmablast_event_is_not_a_composition(tables):
    samples, _, _ = tables
    aplastic = samples.copy()
    row = aplastic["sample_id"] == "P02_d28"
    aplastic.loc[row, ["b_cells", "plasmablast_count"]] = 1
    for subset in SUBSETS:
        aplastic.loc[row, f"{subset}_pct_b"] = 100.0 if subset == "plasmablast" else 0.0
    fig = figures.plot_composition_visits(aplastic, min_b_events=50)
    bar = _by_gid(fig, "P02_d28:plasmablast")
    assert bar.get_height() == pytest.approx(100.0)
    assert bar.get_hatch() and bar.get_alpha() < 0.5  # hatched and pale, not a solid bar
    label = _by_gid(fig, "P02_d28:n_b_events")
    assert label.get_text() == "n = 1 B event"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("< 50 B events" in t for t in legend)


def test_composition_baseline_vs_reconstitution_means(tables):
    samples, kinetics, _ = tables
    fig = figures.plot_composition_baseline_vs_reconstitution(samples, kinetics)
    for subset in SUBSETS:
        assert _by_gid(fig, f"mean_baseline_{subset}").get_height() == pytest.approx(
            BASELINE_MIX[subset])
        points = _by_gid(fig, f"points_baseline_{subset}").get_offsets()
        assert len(points) == 5
        if RETURN_MIX[subset] > 0:
            assert _by_gid(fig, f"mean_reconstitution_{subset}").get_height() == pytest.approx(
                RETURN_MIX[subset])
        # P05 never reconstitutes: four patients at reconstitution.
        assert len(_by_gid(fig, f"points_reconstitution_{subset}").get_offsets()) == 4
    assert "few_events_note" not in {a.get_gid() for a in fig.findobj()}


def test_composition_baseline_vs_reconstitution_few_events_not_averaged(tables):
    samples, kinetics, _ = tables
    few = samples.copy()
    # P04 reconstitutes on day 150 with 12 B events, all switched memory.
    row = few["sample_id"] == "P04_d150"
    few.loc[row, "b_cells"] = 12
    for subset in SUBSETS:
        few.loc[row, f"{subset}_pct_b"] = 100.0 if subset == "switched_memory" else 0.0
    fig = figures.plot_composition_baseline_vs_reconstitution(few, kinetics, min_b_events=50)
    # Mean over P01-P03 only (P04 has too few events): unchanged return mix.
    assert _by_gid(fig, "mean_reconstitution_switched_memory").get_height() == pytest.approx(
        RETURN_MIX["switched_memory"])
    assert len(_by_gid(fig, "points_reconstitution_naive").get_offsets()) == 3
    shown = np.asarray(_by_gid(fig, "few_reconstitution_switched_memory").get_offsets())
    assert shown[:, 1].tolist() == [100.0]
    note = _by_gid(fig, "few_events_note").get_text()
    assert "P04 reconstitution: n = 12 B events" in note
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("reconstitution (n = 3 patients") for t in legend)


def test_cluster_heatmap_medians_and_labels(tmp_path):
    paths = [tmp_path / "S1.h5ad", tmp_path / "S2.h5ad"]
    data = [annotated_h5ad(paths[0], sample_id="S1", n_events=300, seed=1),
            annotated_h5ad(paths[1], sample_id="S2", n_events=200, seed=2)]
    pooled = figures.pool_annotated(paths, markers=list(MARKERS), events_per_sample=10_000,
                                    seed=0)
    assert len(pooled) == 500
    fig = figures.plot_cluster_heatmap(pooled)
    image = _by_gid(fig, "medians").get_array()
    x = np.vstack([d.X[:, 1:] for d in data])
    metacluster = np.concatenate([d.obs["metacluster"].to_numpy() for d in data])
    for row in range(3):
        np.testing.assert_allclose(image[row], np.median(x[metacluster == row], axis=0),
                                   rtol=1e-5)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("0: T")
    assert labels[1].startswith("1: B (naive)")
    assert labels[2].startswith("2: B (switched memory)")
    # Bounded, seeded subsample: the cap holds and the same seed draws the same events.
    capped = figures.pool_annotated(paths, markers=list(MARKERS), events_per_sample=50, seed=3)
    again = figures.pool_annotated(paths[::-1], markers=list(MARKERS), events_per_sample=50,
                                   seed=3)
    assert len(capped) == 100
    pd.testing.assert_frame_equal(capped, again)


def test_embedding_colours_every_event_by_label(tmp_path):
    path = tmp_path / "S1.h5ad"
    adata = annotated_h5ad(path, sample_id="S1", n_events=300, seed=4)
    pooled = figures.pool_annotated([path], markers=list(MARKERS), events_per_sample=1000,
                                    seed=0)
    fig = figures.plot_embedding(pooled, max_events=1000, seed=0)
    n_b = int((adata.obs["cell_type"] == "B").sum())
    assert len(_by_gid(fig, "celltype_B").get_offsets()) == n_b
    assert len(_by_gid(fig, "celltype_T").get_offsets()) == 300 - n_b
    n_naive = int((adata.obs["b_subset"] == "naive").sum())
    assert len(_by_gid(fig, "subset_naive").get_offsets()) == n_naive
    # The two metacluster groups of B cells (naive IgD+ vs switched IgD-) separate in UMAP.
    naive = np.asarray(_by_gid(fig, "subset_naive").get_offsets())
    switched = np.asarray(_by_gid(fig, "subset_switched_memory").get_offsets())
    gap = np.linalg.norm(naive.mean(0) - switched.mean(0))
    assert gap > 2 * max(naive.std(0).mean(), switched.std(0).mean())
    capped = figures.plot_embedding(pooled, max_events=100, seed=0)
    total = sum(len(_by_gid(capped, f"celltype_{t}").get_offsets()) for t in ("B", "T"))
    assert total == 100


def test_qc_removed_bar_widths(tables):
    _, _, qc = tables
    fig = figures.plot_qc_removed(qc)
    sample_id = qc["sample_id"].iloc[0]
    rows = qc[qc["sample_id"] == sample_id]
    total = rows["events_in"].iloc[0]
    left = 0.0
    for step, removed in zip(rows["step"], rows["events_removed"], strict=True):
        bar = _by_gid(fig, f"{sample_id}:{step}")
        assert bar.get_width() == pytest.approx(100 * removed / total)
        assert bar.get_x() == pytest.approx(left)
        left += 100 * removed / total
    assert len(fig.axes[0].get_yticklabels()) == qc["sample_id"].nunique()


def test_edge_cases_do_not_crash(tmp_path):
    # One patient, never depleted and no absolute counts; empty QC table; no annotated data.
    rows = [_sample_row("X1", day, b_per_ul=150.0, cd19_negative_share=0.0,
                        lymphocytes_per_ul=1000.0, lymphocyte_events=10000, absolute=False,
                        mix=BASELINE_MIX) for day in (-2, 10, 30)]
    samples = pd.DataFrame(rows)
    kinetics = pd.DataFrame([{"patient_id": "X1", "modality": "flow", "measure": "b",
                              "depletion_day": np.nan, "reconstitution_day": np.nan,
                              "aplasia_days": np.nan, "censored": False, "last_day": 30}])
    qc = pd.DataFrame(columns=["sample_id", "step", "events_in", "events_removed",
                               "events_out", "detail"])
    paths = _write_inputs(tmp_path, samples, kinetics, qc)
    outdir = tmp_path / "out"
    assert _report(paths, [], outdir) == 0
    assert (outdir / "patient_X1.png").stat().st_size > 0
    assert (outdir / "kaplan_meier.svg").stat().st_size > 0
    assert (outdir / "embedding.png").stat().st_size > 0
    assert math.isnan(float("nan"))


def _labelled_figure():
    """Long titles and labels, so that constrained layout moves every axes."""
    fig, axes = matplotlib.pyplot.subplots(2, 2, figsize=(4, 3), layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.plot([0, 1000], [0, 10 ** i])
        ax.set_title(f"panel {i}\nover two lines")
        ax.set_ylabel("a long axis label")
    return fig


def _svg_without_date(path: Path) -> str:
    text = path.read_text()
    start, end = text.find("<dc:date>"), text.find("</dc:date>")
    return text[:start] + text[end:] if start >= 0 else text


@pytest.mark.parametrize("constrained_rc", [False, True])
def test_save_figure_svg_keeps_the_png_layout(tmp_path, constrained_rc):
    # The SVG must carry the layout the PNG was drawn with: the reference freezes it with
    # matplotlib's documented set_layout_engine("none") after the PNG. A user's matplotlibrc
    # asking for constrained layout by default must not lay the figure out again.
    rc = {"svg.hashsalt": "bcellmap-test", "figure.constrained_layout.use": constrained_rc}
    with matplotlib.pyplot.rc_context(rc):
        saved = _labelled_figure()
        written = figures.save_figure(saved, tmp_path, "saved", dpi=50)
        reference = _labelled_figure()
        reference.savefig(tmp_path / "reference.png", format="png", dpi=50)
        default_position = matplotlib.figure.SubplotParams().left
        assert reference.axes[0].get_position().x0 > default_position + 0.02  # it moved
        reference.set_layout_engine("none")
        reference.savefig(tmp_path / "reference.svg", format="svg", dpi=50)
        matplotlib.pyplot.close(reference)
    assert [p.name for p in written] == ["saved.png", "saved.svg"]
    assert (imread(tmp_path / "saved.png") == imread(tmp_path / "reference.png")).all()
    assert _svg_without_date(tmp_path / "saved.svg") == _svg_without_date(
        tmp_path / "reference.svg")
    assert not matplotlib.pyplot.fignum_exists(saved.number)  # closed


def test_bad_input_raises_and_writes_nothing(tmp_path, tables, capsys):
    samples, kinetics, qc = tables
    paths = _write_inputs(tmp_path, samples.drop(columns=["lloq_pct_lymphocytes"]), kinetics,
                          qc)
    outdir = tmp_path / "out"
    assert _report(paths, [], outdir) == 1
    error = capsys.readouterr().err
    assert "lloq_pct_lymphocytes" in error and str(paths["samples"]) in error
    with pytest.raises(InputError, match="lloq_pct_lymphocytes"):
        figures.read_report_tables(paths["samples"], paths["kinetics"], paths["qc"])
    assert not outdir.exists() or not any(outdir.iterdir())


# ---------------------------------------------------------------------------------------------
# Gate figures (per patient, one row per flow visit)

GATE_MARKERS = ("CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24")
GATES = {  # (marker, level) -> (threshold, parent)
    ("CD19", "pos"): (1.6, "cd3neg_lymphocytes"),
    ("CD20", "pos"): (1.9, "cd3neg_lymphocytes"),
    ("IgD", "pos"): (1.5, "b_cells"),
    ("CD27", "pos"): (1.4, "b_cells"),
    ("CD24", "hi"): (2.6, "b_cells"),
    ("CD38", "hi"): (2.4, "b_cells"),
    ("CD27", "hi"): (3.2, "b_cells"),
}
# B subset -> (IgD, CD27, CD38, CD24) means; "" = B cell without a subset
SUBSET_CENTRES = {
    "naive": (3.0, 0.4, 1.5, 1.8), "unswitched_memory": (3.0, 2.5, 1.0, 1.8),
    "switched_memory": (0.4, 2.5, 1.0, 1.5), "double_negative": (0.4, 0.4, 1.0, 1.2),
    "transitional": (3.0, 0.4, 3.3, 3.4), "plasmablast": (0.3, 4.0, 4.2, 0.5),
    "": (1.5, 1.5, 1.5, 1.5)}


def gated_h5ad(path: Path | None, *, sample_id: str, patient_id: str = "G1", day: int | None = 0,
               n_t: int = 3000, n_nk: int = 500, n_other: int = 800,
               b_mix: dict[str, int] | None = None, flags: dict[str, str] | None = None,
               drop_markers: tuple[str, ...] = (), seed: int = 0):
    """A synthetic annotated flow AnnData following the annotate contract (gates in uns).

    The stored calls (cd19_pos, cd20_pos) are derived from the values but some are flipped on
    purpose, so the figure can only match them by reading obs, not by re-gating.
    """
    import anndata

    rng = np.random.default_rng(seed)
    b_mix = {"naive": 300, "switched_memory": 90, "unswitched_memory": 50,
             "double_negative": 30, "transitional": 25, "plasmablast": 5} if b_mix is None \
        else b_mix
    rows, cell_type, b_subset = [], [], []

    def add(kind, subset, n, centre):
        if n:
            rows.append(rng.normal(centre, 0.35, (n, len(GATE_MARKERS))))
            cell_type.extend([kind] * n)
            b_subset.extend([subset] * n)

    add("T", "", n_t, [4.0, 0.3, 0.5, 0.5, 1.5, 1.0, 0.3])
    add("NK", "", n_nk, [0.3, 0.3, 0.6, 0.3, 0.3, 1.5, 0.3])
    add("other", "", n_other, [0.3, 0.3, 0.3, 0.3, 0.3, 0.5, 0.5])
    for subset, n in b_mix.items():
        igd, cd27, cd38, cd24 = SUBSET_CENTRES[subset]
        cd20 = 0.5 if subset == "plasmablast" else 3.2
        add("B", subset, n, [0.3, 3.0, cd20, igd, cd27, cd38, cd24])
    x = np.vstack(rows).astype(np.float32)
    n = x.shape[0]
    cell_type = np.array(cell_type)
    cd19_pos = x[:, 1] > GATES[("CD19", "pos")][0]
    cd20_pos = x[:, 2] > GATES[("CD20", "pos")][0]
    flip = rng.random(n) < 0.05
    cd19_pos = cd19_pos ^ flip
    keep = [i for i, m in enumerate(GATE_MARKERS) if m not in drop_markers]
    gates = pd.DataFrame([
        {"marker": marker, "level": level, "threshold": threshold, "parent": parent,
         "method": "valley", "n_events": 1000, "flag": (flags or {}).get(marker, "")}
        for (marker, level), (threshold, parent) in GATES.items() if marker not in drop_markers])
    adata = anndata.AnnData(
        X=x[:, keep],
        obs=pd.DataFrame({
            "event_index": np.arange(n), "cell_type": cell_type,
            "metacluster": pd.factorize(pd.Series(cell_type) + np.array(b_subset))[0],
            "lymphocyte": np.isin(cell_type, ["T", "B", "NK"]),
            "b_subset": np.array(b_subset), "cd19_pos": cd19_pos, "cd20_pos": cd20_pos,
        }, index=[str(i) for i in range(n)]),
        var=pd.DataFrame({"canonical": [GATE_MARKERS[i] for i in keep]},
                         index=[f"ch{i}" for i in keep]),
    )
    adata.uns["gates"] = gates
    sample = {"sample_id": sample_id, "patient_id": patient_id, "modality": "flow"}
    if day is not None:
        sample["day"] = day
    adata.uns["sample"] = sample
    if path is not None:
        adata.write_h5ad(path)
    return adata


def _texts(fig) -> dict[str, str]:
    """Every text artist with a gid, by gid."""
    return {t.get_gid(): t.get_text() for t in fig.findobj(matplotlib.text.Text)
            if t.get_gid()}


def _percent(text: str) -> float:
    return float(text.split("\n")[-1].strip().removesuffix("%"))


def _hand_percentages(adata) -> dict[str, float]:
    """Quadrant and subset percentages computed with numpy from the stored calls."""
    obs = adata.obs
    cd3neg = obs["lymphocyte"].to_numpy(bool) & (obs["cell_type"].to_numpy(str) != "T")
    cd19 = obs["cd19_pos"].to_numpy(bool)[cd3neg]
    cd20 = obs["cd20_pos"].to_numpy(bool)[cd3neg]
    n = cd3neg.sum()
    result = {
        "CD19+CD20+": 100 * np.sum(cd19 & cd20) / n, "CD19-CD20+": 100 * np.sum(~cd19 & cd20) / n,
        "CD19+CD20-": 100 * np.sum(cd19 & ~cd20) / n, "CD19-CD20-": 100 * np.sum(~cd19 & ~cd20) / n,
    }
    subsets = obs.loc[obs["cell_type"] == "B", "b_subset"].to_numpy(str)
    for subset in SUBSETS:
        result[subset] = 100 * np.sum(subsets == subset) / subsets.size
    return result


def test_gates_percentages_equal_the_stored_calls(tmp_path):
    adatas, visits = [], []
    for i, day in enumerate((120, -5)):
        path = tmp_path / f"G1_d{day}.h5ad"
        adatas.append(gated_h5ad(path, sample_id=f"G1_d{day}", day=day, seed=i))
        visits.append(figures.read_gate_visit(path, seed=3))
    fig = figures.plot_gates(visits, "G1")
    texts = _texts(fig)
    for adata in adatas:
        sid = adata.uns["sample"]["sample_id"]
        expected = _hand_percentages(adata)
        keys = ["CD19+CD20+", "CD19-CD20+", "CD19+CD20-", "CD19-CD20-", "naive",
                "unswitched_memory", "switched_memory", "double_negative", "transitional",
                "plasmablast"]
        for key in keys:
            assert _percent(texts[f"pct:{sid}:{key}"]) == pytest.approx(expected[key], abs=0.051)
        n_b = int((adata.obs["cell_type"] == "B").sum())
        assert texts[f"pct:{sid}:b_count"].strip() == f"B cells: {n_b:,}"
        # The stored calls were flipped for some events: a re-gate would not match them.
        cd3neg = adata.obs["lymphocyte"].to_numpy(bool) & (adata.obs["cell_type"] != "T")
        regated = np.mean(adata.X[cd3neg.to_numpy(), 1] > GATES[("CD19", "pos")][0])
        assert abs(100 * regated - expected["CD19+CD20+"] - expected["CD19+CD20-"]) > 0.5
    # Rows in day order: day -5 first; labels "day N · sample_id".
    titles = [ax.get_title(loc="left") for ax in fig.axes[::3]]
    assert titles[0].startswith("day -5 · G1_d-5") and titles[1].startswith("day 120 · G1_d120")


def test_gates_lines_at_thresholds_flagged_dashed(tmp_path):
    adata = gated_h5ad(None, sample_id="G2_d7", patient_id="G2", day=7,
                       flags={"CD19": "CD19:upper_tail", "CD38": "insufficient_events"})
    visit = figures.read_gate_visit(adata)
    fig = figures.plot_gates([visit], "G2")
    for (marker, _level), (threshold, _parent) in GATES.items():
        if (marker, _level) == ("CD27", "hi"):
            continue  # plasmablast gate: not drawn on these axes
        panel = {"CD19": "cd19_cd20", "CD20": "cd19_cd20", "IgD": "igd_cd27",
                 "CD27": "igd_cd27", "CD24": "cd24_cd38", "CD38": "cd24_cd38"}[marker]
        line = _by_gid(fig, f"gate:G2_d7:{panel}:{marker}")
        vertical = marker in {"CD19", "IgD", "CD24"}
        coordinates = np.asarray(line.get_xdata() if vertical else line.get_ydata(), float)
        assert np.allclose(coordinates, threshold), marker
        flagged = marker in {"CD19", "CD38"}
        assert (line.get_linestyle() == "--") is flagged, marker
        assert matplotlib.colors.to_hex(line.get_color()).lower() == (
            "#d55e00" if flagged else "#000000")
    texts = _texts(fig)
    assert texts["flag:G2_d7:cd19_cd20:CD19"] == "CD19+ gate flagged: upper_tail"
    assert "insufficient_events" in texts["flag:G2_d7:cd24_cd38:CD38"]
    assert not any(k.startswith("flag:G2_d7:igd_cd27") for k in texts)
    # Transitional box: the CD24 line starts at the CD38 threshold and goes up.
    cd24 = _by_gid(fig, "gate:G2_d7:cd24_cd38:CD24")
    assert min(cd24.get_ydata()) == pytest.approx(GATES[("CD38", "hi")][0])


def test_gate_density_image_counts_every_event_in_its_bin():
    """The density of a gate panel: events counted per square bin, hand-placed."""
    x = np.r_[np.full(150, 1.02), np.full(60, 3.01), [4.99], [np.nan, 2.0], [7.0]]
    y = np.r_[np.full(150, 1.02), np.full(60, 4.03), [0.01], [2.0, np.nan], [1.0]]
    fig, ax = matplotlib.pyplot.subplots()
    figures._density(ax, x, y, (0.0, 5.0, 0.0, 5.0), gid="density:test")
    image = _by_gid(fig, "density:test")
    assert tuple(image.get_extent()) == (0.0, 5.0, 0.0, 5.0)
    counts = np.ma.filled(image.get_array(), 0)
    width = 5.0 / figures._DENSITY_BINS
    # Rows are y, columns x, row 0 at the bottom; NaN and out-of-range events are dropped.
    assert counts.sum() == 150 + 60 + 1
    assert counts[int(1.02 / width), int(1.02 / width)] == 150
    assert counts[int(4.03 / width), int(3.01 / width)] == 60
    assert counts[0, figures._DENSITY_BINS - 1] == 1
    assert np.ma.count_masked(image.get_array()) == counts.size - 3  # empty bins blank
    assert image.norm.vmin == 1 and image.norm.vmax == 150
    matplotlib.pyplot.close(fig)


def test_gates_too_few_b_events_and_missing_marker(tmp_path):
    few = gated_h5ad(None, sample_id="G3_d30", patient_id="G3", day=30,
                     b_mix={"naive": 12, "transitional": 3})
    no_cd24 = gated_h5ad(None, sample_id="G3_d200", patient_id="G3", day=200,
                         drop_markers=("CD24",), seed=1)
    visits = [figures.read_gate_visit(a) for a in (few, no_cd24)]
    fig = figures.plot_gates(visits, "G3", min_b_events=50)
    texts = _texts(fig)
    for panel in ("igd_cd27", "cd24_cd38"):
        assert texts[f"message:G3_d30:{panel}"].replace("\n", " ") == (
            "n = 15 B events: too few to read subsets")
    for subset in ("naive", "transitional", "switched_memory"):
        assert f"pct:G3_d30:{subset}" not in texts
    # CD19/CD20 of CD3- lymphocytes are still read at that visit; its B events are drawn.
    assert "pct:G3_d30:CD19+CD20+" in texts
    assert len(_by_gid(fig, "density:G3_d30:igd_cd27").get_offsets()) == 15
    assert texts["message:G3_d200:cd24_cd38"] == "CD24 not in panel"
    assert "pct:G3_d200:naive" in texts  # the IgD x CD27 panel is unaffected
    # The marker that is there is still shown: a CD38 histogram of the B cells, CD38hi gate.
    hist = fig.axes[5]
    assert hist.get_gid() == "histogram" and hist.get_xlabel() == "CD38 (transformed)"
    outline = _by_gid(fig, "hist:G3_d200:cd24_cd38").get_xy()
    assert outline[:, 1].max() > 0  # a drawn distribution, not an empty frame
    gate = _by_gid(fig, "gate:G3_d200:cd24_cd38:CD38")
    stored = visits[1].gates
    cd38_hi = stored[(stored["marker"] == "CD38") & (stored["level"] == "hi")]["threshold"]
    assert gate.get_xdata()[0] == pytest.approx(float(cd38_hi.iloc[0]))


def test_gates_subsample_bounded_and_seeded(tmp_path):
    path = tmp_path / "big.h5ad"
    adata = gated_h5ad(path, sample_id="G4_d0", patient_id="G4",
                       b_mix={"naive": 3000, "switched_memory": 1000}, seed=5)
    a = figures.read_gate_visit(path, max_events=500, seed=1)
    b = figures.read_gate_visit(path, max_events=500, seed=1)
    c = figures.read_gate_visit(path, max_events=500, seed=2)
    assert len(a.cd3neg_events) == 500 and len(a.b_events) == 500
    pd.testing.assert_frame_equal(a.b_events, b.b_events)
    assert not a.b_events.equals(c.b_events)
    # The drawn events are B cells' own values (IgD of naive ~3, switched ~0.4).
    b_values = adata.X[(adata.obs["cell_type"] == "B").to_numpy(), 3]
    assert np.isin(a.b_events["IgD"].to_numpy(np.float32), b_values).all()
    # Counts are over every event, not the subsample.
    assert a.n_b == 4000
    assert a.subsets["naive"] == 3000


def test_gates_day_from_samples_table_and_missing_calls(tmp_path):
    path = tmp_path / "G5_d14.h5ad"
    gated_h5ad(path, sample_id="G5_d14", patient_id="G5", day=None)
    samples = pd.DataFrame({"sample_id": ["G5_d14"], "patient_id": ["G5"], "day": [14],
                            "modality": ["flow"]})
    visit = figures.read_gate_visit(path, samples=samples)
    assert visit.day == 14
    empty = figures.plot_gates([], "G9")
    assert "No annotated flow samples" in empty.axes[0].texts[0].get_text()


def test_cli_report_writes_gate_figures(tmp_path, tables):
    samples, kinetics, qc = tables
    samples = samples[samples["patient_id"].isin(["P01", "P02"])].copy()
    samples.loc[samples["patient_id"] == "P02", "modality"] = "scrna"
    kinetics = kinetics[kinetics["patient_id"].isin(["P01", "P02"])]
    qc = qc[qc["sample_id"].isin(samples["sample_id"])]
    paths = _write_inputs(tmp_path, samples, kinetics, qc)
    annotated = []
    for i, day in enumerate((-5, 112)):
        annotated.append(tmp_path / f"P01_d{day}.h5ad")
        gated_h5ad(annotated[-1], sample_id=f"P01_d{day}", patient_id="P01", day=day, seed=i)
    config = tmp_path / "config.yaml"
    config.write_text("report:\n  embedding_events: 300\n")
    outdir = tmp_path / "report"
    assert _report(paths, annotated, outdir, config) == 0
    for extension in ("png", "svg"):
        assert (outdir / f"gates_P01.{extension}").stat().st_size > 0
    assert not (outdir / "gates_P02.png").exists()  # scRNA only: no gates
    png = imread(outdir / "gates_P01.png")
    assert png.shape[0] > 800 and png[..., :3].std() > 0.01  # two visit rows
    root = ElementTree.parse(outdir / "gates_P01.svg").getroot()
    assert float(root.get("width").removesuffix("pt")) <= 7 * 72 + 1
    svg = (outdir / "gates_P01.svg").read_text()
    assert "day -5 · P01_d-5" in svg and "day 112 · P01_d112" in svg


def test_cli_report_figure_groups_write_only_their_figures(tmp_path, tables, capsys):
    """The workflow's report jobs: tables, clusters, and one patient's gates from the sheet."""
    from bcellmap.cli import main

    samples, kinetics, qc = tables
    paths = _write_inputs(tmp_path, samples, kinetics, qc)
    annotated = tmp_path / "P01_d14.h5ad"
    # No day in the file: the gate figure takes it from the sample sheet.
    gated_h5ad(annotated, sample_id="P01_d14", patient_id="P01", day=None, seed=3)
    sheet = tmp_path / "sheet.tsv"
    pd.DataFrame({"sample_id": ["P01_d14", "P02_sc"], "patient_id": ["P01", "P02"],
                  "day": [14, 28], "modality": ["flow", "scrna"],
                  "path": ["a.fcs", "b.h5ad"]}).to_csv(sheet, sep="\t", index=False)
    config = tmp_path / "config.yaml"
    config.write_text("report:\n  embedding_events: 300\n")
    common = ["--config", str(config)]

    def written(outdir: Path) -> set[str]:
        return {p.name for p in outdir.iterdir()} if outdir.exists() else set()

    gates = tmp_path / "gates"
    assert main(["report", "--figures", "gates", "--samples", str(sheet), "--patients", "P01",
                 "--annotated", str(annotated), "--outdir", str(gates), *common]) == 0
    assert written(gates) == {"gates_P01.png", "gates_P01.svg"}
    assert "day 14 · P01_d14" in (gates / "gates_P01.svg").read_text()

    clusters = tmp_path / "clusters"
    assert main(["report", "--figures", "clusters", "--annotated", str(annotated),
                 "--outdir", str(clusters), *common]) == 0
    assert written(clusters) == {"cluster_heatmap.png", "cluster_heatmap.svg",
                                 "embedding.png", "embedding.svg"}

    table_dir = tmp_path / "tables"
    assert main(["report", "--figures", "tables", "--samples-table", str(paths["samples"]),
                 "--kinetics", str(paths["kinetics"]), "--qc", str(paths["qc"]),
                 "--outdir", str(table_dir), *common]) == 0
    assert written(table_dir) == {f"{stem}.{ext}" for ext in ("png", "svg") for stem in [
        *(f"patient_{p}" for p in PATIENTS), "cohort_trajectories", "swimmer", "kaplan_meier",
        "composition_visits", "composition_baseline_vs_reconstitution", "qc_removed", "flags"]}

    # Missing inputs and a patient without flow samples: an error, and nothing written.
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["report", "--figures", "tables", "--samples-table", str(paths["samples"]),
                 "--outdir", str(refused)]) == 1
    assert "--kinetics, --qc" in capsys.readouterr().err
    assert main(["report", "--figures", "gates", "--samples", str(sheet), "--patients", "P02",
                 "--annotated", str(annotated), "--outdir", str(refused)]) == 1
    assert "no flow samples for patient(s) P02" in capsys.readouterr().err
    assert written(refused) == set()


def test_flags_figure_lists_every_flagged_sample_gate_and_patient():
    from bcellmap.report.figures import flag_rows, plot_flags

    samples = pd.DataFrame({
        "sample_id": ["a", "b", "c"], "patient_id": ["P1", "P1", "P2"], "day": [-3, 30, -1],
        "modality": ["flow"] * 3,
        "sample_flags": ["few_t_cells_at_baseline", "", ""],
        "gate_flags": ["", "CD38:few_events;CD24:few_events", ""]})
    kinetics = pd.DataFrame({
        "patient_id": ["P1", "P2", "P2"], "modality": ["flow"] * 3,
        "measure": ["b", "b", "cd19"],
        "flags": ["below_lloq", "not_evaluable;below_lloq", "not_measured"]})
    rows = flag_rows(samples, kinetics)
    # Sample a's result flag, sample b's gate flags, P2's kinetics flag (below_lloq and
    # other measures left out); sample c and P1's informational flag are not listed.
    assert list(rows["kind"]) == ["result", "gate", "kinetics"]
    assert rows.iloc[1]["flags"] == "CD38:few_events; CD24:few_events"
    assert rows.iloc[2]["flags"] == "not_evaluable"
    fig = plot_flags(samples, kinetics)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "result: few_t_cells_at_baseline" in texts
    assert "kinetics: not_evaluable" in texts
    matplotlib.pyplot.close(fig)
    empty = plot_flags(samples.assign(sample_flags="", gate_flags=""),
                       kinetics.assign(flags=""))
    assert any("Nothing flagged" in t.get_text() for t in empty.axes[0].texts)
    matplotlib.pyplot.close(empty)


def test_gates_show_separation_and_what_is_not_evaluable():
    adata = gated_h5ad(None, sample_id="G7_d0", patient_id="G7")
    gates = adata.uns["gates"]
    gates["reference"] = "negative: T cells (CD3+)"
    gates["negative_above_pct"] = 0.8
    gates["positive_below_pct"] = 2.5
    gates["reliability"] = "ok"
    gates["reliability_detail"] = ""
    cd19 = (gates["marker"] == "CD19") & (gates["level"] == "pos")
    gates.loc[cd19, "reliability"] = "nonspecific"
    gates.loc[cd19, "reliability_detail"] = "CD19 stains its negative reference"
    adata.uns["gates"] = gates
    visit = figures.read_gate_visit(adata)
    # The T cells are read as the negative reference and drawn.
    assert len(visit.t_events) == min(figures._REFERENCE_EVENTS, 3000)
    fig = figures.plot_gates([visit], "G7")
    texts = _texts(fig)
    # Beside every gate, its two numbers.
    assert texts["separation:gate:G7_d0:igd_cd27:IgD"].strip() == (
        "neg ref above 0.8% · gated below 2.5%")
    # The nonspecific CD19 gate: dash-dot dark red, named under the panel, and every panel
    # that rests on it says "not evaluable" instead of percentages.
    line = _by_gid(fig, "gate:G7_d0:cd19_cd20:CD19")
    assert line.get_linestyle() == "-." and line.get_color() == figures._UNRELIABLE_COLOUR
    assert "nonspecific: not evaluable" in texts["flag:G7_d0:cd19_cd20:CD19"]
    for panel in ("cd19_cd20", "igd_cd27", "cd24_cd38"):
        assert f"not_evaluable:G7_d0:{panel}" in texts, panel
    assert "pct:G7_d0:naive" not in texts and "pct:G7_d0:CD19+CD20+" not in texts
    assert texts["pct:G7_d0:b_count"].startswith("B cells: not evaluable")
    assert _by_gid(fig, "reference:G7_d0:cd19_cd20") is not None
    # A sound gate stays solid black.
    assert _by_gid(fig, "gate:G7_d0:igd_cd27:IgD").get_linestyle() == "-"
    matplotlib.pyplot.close(fig)
