"""Cohort thresholds: valleys on skewed pools, no phantom positives in aplasia.

(The hierarchy and the registration between visits are tested in test_gating.py.)"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from bcellmap.cli import main
from bcellmap.config import load_config
from bcellmap.flow.annotate import annotate_sample, load_subset_rules
from bcellmap.flow.gating import GatingSettings, gates_for_sample, learn_gates
from bcellmap.flow.thresholds import thresholds_for
from bcellmap.kernels.density import learn_marker_threshold


def learn_thresholds(samples, *, markers, hi_markers, config):
    """The cohort table of ``learn_gates`` (reference-scale gates), as the CLI writes it."""
    cohort, _ = learn_gates(samples, pos_markers=markers, hi_markers=hi_markers,
                            settings=GatingSettings.from_config(config),
                            seed=int(config["seed"]))
    return cohort

MARKERS = ["CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24"]
NEG = (0.5, 0.5)   # mean, sd of the negative population (transformed units)
POS = (4.0, 0.6)


def _sample(rng: np.random.Generator, n: int, b_fraction: float) -> ad.AnnData:
    """All markers negative except CD19/CD20 on a fraction of B cells (CD3 negative)."""
    x = rng.normal(*NEG, size=(n, len(MARKERS)))
    n_b = int(round(n * b_fraction))
    x[:n_b, 1] = rng.normal(*POS, size=n_b)
    x[:n_b, 2] = rng.normal(*POS, size=n_b)
    x[n_b:n_b + n // 2, 0] = rng.normal(*POS, size=n // 2)  # T cells: CD3+
    adata = ad.AnnData(x.astype(np.float32),
                       var=pd.DataFrame({"canonical": MARKERS}, index=MARKERS))
    adata.obs["metacluster"] = 0
    return adata


def _true_valley(pos_share: float) -> float:
    """Density minimum of the known two-Gaussian mixture between its means."""
    grid = np.linspace(NEG[0], POS[0], 20001)
    density = (1 - pos_share) * norm.pdf(grid, *NEG) + pos_share * norm.pdf(grid, *POS)
    return float(grid[np.argmin(density)])


def test_pooled_threshold_lands_in_valley_when_half_the_cohort_is_aplastic():
    rng = np.random.default_rng(7)
    # Five aplastic samples (no CD19+ events at all) and five with 6% B cells.
    samples = {f"s{i}": _sample(rng, 4000, 0.0 if i < 5 else 0.06) for i in range(10)}
    table = learn_thresholds(samples, markers=["CD3", "CD19", "CD20"], hi_markers=[],
                             config=load_config())
    cut = thresholds_for(table, "all")["CD19"]["pos"]
    assert table.set_index("marker").loc["CD19", "method"] == "valley"
    assert abs(cut - _true_valley(0.03)) < 0.35
    assert NEG[0] + 3 * NEG[1] < cut < POS[0] - 2 * POS[1]


@pytest.mark.parametrize("share", [0.5, 0.05, 0.01])
def test_valley_on_skewed_pools(share):
    rng = np.random.default_rng(3)
    n = 30000
    k = int(n * share)
    values = np.concatenate([rng.normal(*NEG, n - k), rng.normal(*POS, k)])
    fit = learn_marker_threshold(values)
    assert fit.method == "valley"
    assert abs(fit.threshold - _true_valley(share)) < 0.35


def test_aplastic_sample_with_pooled_thresholds_has_at_most_a_handful_of_b_cells():
    rng = np.random.default_rng(11)
    cohort = {f"s{i}": _sample(rng, 4000, 0.0 if i < 4 else 0.08) for i in range(8)}
    config = load_config()
    table = learn_thresholds(cohort, markers=MARKERS, hi_markers=["CD27", "CD38", "CD24"],
                             config=config)
    aplastic = _sample(rng, 5000, 0.0)
    # A threshold fitted to this sample alone (2-component mixture or a median split) would
    # fall inside its single negative peak and call up to about half the events CD19+:
    # thousands of phantom B cells. The pooled valley sits above the negative peak.
    _, counts = annotate_sample(aplastic, thresholds_for(table, "all"),
                                load_subset_rules(config), sample_id="aplastic")
    assert counts["b_cells"].iloc[0] <= 5
    # Learned with the cohort, the aplastic sample's own (registered) gate does the same.
    _, gates = learn_gates({**cohort, "aplastic": aplastic}, pos_markers=MARKERS,
                           hi_markers=["CD27", "CD38", "CD24"],
                           settings=GatingSettings.from_config(config), seed=0)
    _, counts = annotate_sample(aplastic, gates_for_sample(gates, "aplastic")[0],
                                load_subset_rules(config), sample_id="aplastic")
    assert counts["b_cells"].iloc[0] <= 5


def test_unimodal_pool_uses_upper_tail_and_calls_almost_nothing_positive():
    rng = np.random.default_rng(5)
    values = rng.normal(*NEG, 50000)
    fit = learn_marker_threshold(values, fallback_sd=4.0)
    assert fit.method == "upper_tail"
    fresh = rng.normal(*NEG, 100000)
    assert (fresh >= fit.threshold).mean() < 1e-3


def test_fixed_thresholds_override_learning():
    rng = np.random.default_rng(2)
    config = load_config()
    config["annotate"]["thresholds"]["fixed"] = {"CD19": 1.25}
    table = learn_thresholds({"a": _sample(rng, 2000, 0.1)}, markers=["CD3", "CD19"],
                             hi_markers=[], config=config)
    row = table.set_index("marker").loc["CD19"]
    assert row["threshold"] == 1.25 and row["method"] == "fixed"


def test_subsample_is_seeded_and_order_independent():
    rng = np.random.default_rng(9)
    samples = {f"s{i}": _sample(rng, 6000, 0.05 * i) for i in range(3)}
    config = load_config()
    config["annotate"]["thresholds"]["events_per_sample"] = 1000
    first = learn_thresholds(samples, markers=["CD19"], hi_markers=[], config=config)
    reverse = dict(reversed(list(samples.items())))
    second = learn_thresholds(reverse, markers=["CD19"], hi_markers=[], config=config)
    pd.testing.assert_frame_equal(first, second)
    assert first["n_events"].iloc[0] == 3000


def test_cli_thresholds_per_batch(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    paths = []
    for i in range(4):
        adata = _sample(rng, 3000, 0.1)
        if i >= 2:
            adata.X[:, 1] += 1.0  # batch 2 is brighter on CD19: its threshold moves up
        path = tmp_path / f"s{i}.h5ad"
        adata.write_h5ad(path)
        paths.append(str(path))
        rows.append({"sample_id": f"s{i}", "patient_id": f"p{i}", "day": -1,
                     "modality": "flow", "path": str(path), "batch": f"b{i // 2}"})
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    config = tmp_path / "config.yaml"
    config.write_text("annotate:\n  thresholds:\n    method: batch\n")
    out = tmp_path / "thresholds.tsv"
    assert main(["thresholds", "--config", str(config), "--samples", str(sheet),
                 "--inputs", *paths, "--out", str(out),
                 "--gates", str(tmp_path / "gates.tsv")]) == 0
    table = pd.read_csv(out, sep="\t")
    cd19 = table[(table["marker"] == "CD19") & (table["level"] == "pos")].set_index("group")
    assert set(cd19.index) == {"b0", "b1"}
    assert 0.5 < cd19.loc["b1", "threshold"] - cd19.loc["b0", "threshold"] < 1.5
    # Every sample gets its own gate, on its own scale: the brighter batch's are higher.
    gates = pd.read_csv(tmp_path / "gates.tsv", sep="\t")
    own = gates[(gates["marker"] == "CD19") & (gates["level"] == "pos")].set_index("sample_id")
    assert set(own.index) == {"s0", "s1", "s2", "s3"}
    assert (own.loc[["s2", "s3"], "threshold"].min() - own.loc[["s0", "s1"], "threshold"].max()
            > 0.5)


def test_tied_pool_puts_the_threshold_above_the_tie():
    # An instrument that floors negative values at 0: almost every event sits exactly at 0.
    # "pos" means ">=", so a threshold on the tie would call every event positive.
    rng = np.random.default_rng(3)
    values = np.r_[np.zeros(9_990), rng.normal(3.0, 0.1, 10)]
    fit = learn_marker_threshold(values)
    assert fit.threshold > 0
    assert (values >= fit.threshold).sum() <= 10
    mostly_tied = np.r_[np.zeros(6_000), rng.normal(0.5, 0.2, 4_000)]
    fit = learn_marker_threshold(mostly_tied)
    assert (mostly_tied[:6_000] >= fit.threshold).sum() == 0


def test_panels_are_never_pooled_and_instrument_mixes_are_split():
    from bcellmap.flow.thresholds import split_instrument_mix, threshold_group

    assert threshold_group({"panel": "", "batch": "b1"}, "pooled") == "all"
    assert threshold_group({"panel": "cytof", "batch": "b1"}, "pooled") == "cytof"
    assert threshold_group({"panel": "", "batch": "b1"}, "batch") == "b1"
    assert threshold_group({"panel": "cytof", "batch": "b1"}, "batch") == "cytof:b1"
    groups = {"a": "all", "b": "all", "c": "all", "d": "lyo"}
    kinds = {"a": "fluorescence", "b": "mass_cytometry", "c": "fluorescence",
             "d": "fluorescence"}
    assert split_instrument_mix(groups, kinds) == {
        "a": "all:fluorescence", "b": "all:mass_cytometry", "c": "all:fluorescence",
        "d": "lyo"}
