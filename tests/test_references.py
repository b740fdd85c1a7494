"""Gates placed and checked against reference populations of the same sample, against
known answers: analytic tail positions, simulated real-blood visits with per-event truth, and
what rests on a gate that cannot be stood behind."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from bcellmap.config import load_config
from bcellmap.contracts import SUBSETS
from bcellmap.flow.annotate import annotate_sample, load_subset_rules
from bcellmap.flow.evaluability import not_evaluable
from bcellmap.flow.gating import GatingSettings, gates_for_sample, learn_gates
from bcellmap.flow.subsets import SubsetRule
from bcellmap.kernels.density import mirrored_share, tail_boundary

SETTINGS = GatingSettings.defaults()
LINEAGE = ["CD3", "CD19", "CD20"]


# --------------------------------------------------------------------------- the kernel


def _flowdensity_normal_z(alpha: float = 0.1) -> float:
    """Where flowDensity's tail rule ends a normal population (in SDs beyond its mode): the
    slope z exp(-z^2/2) falls to alpha of its maximum, exp(-1/2) at z = 1."""
    grid = np.linspace(1.0, 6.0, 500001)
    return float(grid[np.argmax(grid * np.exp(-grid ** 2 / 2) < alpha * np.exp(-0.5))])


@pytest.mark.parametrize("seed", range(5))
def test_tail_of_a_normal_population_is_where_flowdensity_puts_it(seed):
    values = np.random.default_rng(seed).normal(1.0, 0.5, 20_000)
    found = tail_boundary(values)
    assert found.kind == "tail"
    z = (found.boundary - 1.0) / 0.5
    assert z == pytest.approx(_flowdensity_normal_z(), abs=0.3)  # 2.75 SD
    # The robust SD of the inner side, about the estimated mode.
    assert found.spread == pytest.approx(0.5, rel=0.15)


def test_a_shoulder_ends_the_dominant_population():
    # 75% naive-like (0 +- 1) and a 25% memory-like shoulder at 2.5: no valley, a shoulder.
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0.0, 1.0, 15_000), rng.normal(2.5, 1.0, 5_000)])
    found = tail_boundary(values, max_tail_share=None)
    assert found.kind == "shoulder"
    assert 1.5 < found.boundary < 2.6
    # Far fewer of the dominant population lie above it than a tail rule on the whole mixture.
    assert np.mean(values[:15_000] >= found.boundary) < 0.07


def test_a_long_flat_tail_of_a_clean_population_leaves_at_most_its_share_above():
    # Zero-inflated counts (mass cytometry): the spike at 0 ends early, the population does not.
    rng = np.random.default_rng(5)
    values = np.arcsinh(rng.poisson(rng.gamma(0.3, 3.0, 8000)) / 5.0) - rng.uniform(0, .2, 8000)
    found = tail_boundary(values, max_tail_share=0.02, clean=True)
    assert found.kind == "quantile"
    assert np.mean(values >= found.boundary) == pytest.approx(0.02, abs=0.002)


def test_mirrored_share_of_a_normal_population_is_its_tail():
    values = np.random.default_rng(1).normal(0.0, 1.0, 200_000)
    for gate in (1.0, 2.0, 3.0):
        above = mirrored_share(values, mode=0.0, gate=gate, side="above")
        assert above == pytest.approx(norm.sf(gate), abs=0.003)
        assert mirrored_share(values, mode=0.0, gate=-gate, side="below") == pytest.approx(
            norm.cdf(-gate), abs=0.003)


# --------------------------------------------------------------------------- gates


def _panel(rng: np.random.Generator, *, n: int = 8000, b_share: float = 0.12,
           cd19_on_everything: float | None = None, cd3: bool = True) -> ad.AnnData:
    """T, NK and B cells (naive-dominated) with IgD and CD27 as real blood shows them.

    Within B cells IgD is one broad positive mode with a shoulder of IgD- memory at the
    T cells' level; CD27+ memory (25% of B cells) is a dim shoulder of the naive peak.
    ``cd19_on_everything``: a nonspecific CD19 channel staining every cell at that level.
    """
    n_b = int(b_share * n)
    n_t = int(0.75 * (n - n_b))
    labels = np.array(["T"] * n_t + ["NK"] * (n - n_b - n_t) + ["B"] * n_b, dtype=object)
    b = labels == "B"
    memory = b & (rng.random(n) < 0.25)
    switched = memory & (rng.random(n) < 0.6)
    labels[b & ~memory] = "naive"
    labels[memory & ~switched] = "unswitched_memory"
    labels[switched] = "switched_memory"

    def noise(sd: float = 0.3) -> np.ndarray:
        return rng.normal(0.0, sd, n)

    t = labels == "T"
    columns = {
        "CD3": np.where(t, 3.5, 0.3) + noise(),
        "CD19": np.where(b, 3.6, 0.3) + noise(),
        "CD20": np.where(b, 3.8, 0.3) + noise(),
        "IgD": np.where(labels == "naive", 3.0 + noise(0.7),
                        np.where(labels == "unswitched_memory", 2.4 + noise(0.5),
                                 0.3 + noise())),
        "CD27": np.where(memory, 1.9 + noise(0.45),
                         np.where(t, 2.8 + noise(0.4), 0.2 + noise())),
    }
    if cd19_on_everything is not None:
        columns["CD19"] = np.where(b, cd19_on_everything + 1.0, cd19_on_everything) + noise()
        # Other channels of the panel sit at their background, as a real panel's do.
        for marker in ("CD45RA", "CD7", "CD4"):
            columns[marker] = 0.2 + noise(0.2)
    if not cd3:
        del columns["CD3"]
    names = list(columns)
    x = np.column_stack([columns[m] for m in names]).astype(np.float32)
    adata = ad.AnnData(x, var=pd.DataFrame({"canonical": names, "kind": "fluorescence"},
                                           index=names))
    adata.obs["truth"] = labels
    return adata


def _learn(samples: dict[str, ad.AnnData], settings: GatingSettings = SETTINGS,
           pos=("CD3", "CD19", "CD20", "IgD", "CD27")) -> pd.DataFrame:
    _, gates = learn_gates(samples, pos_markers=[m for m in pos], hi_markers=[],
                           settings=settings, seed=0)
    return gates


def _quadrants(adata: ad.AnnData, gates: pd.DataFrame, sample_id: str) -> dict[str, float]:
    cut, rows = gates_for_sample(gates, sample_id)
    annotated, counts = annotate_sample(adata, cut, load_subset_rules(load_config()),
                                        sample_id=sample_id, gate_table=rows)
    return annotated, counts.iloc[0]


@pytest.mark.parametrize("cohort_size", [1, 4])
def test_naive_dominant_b_cells_keep_their_igd_and_cd27_calls(cohort_size):
    rng = np.random.default_rng(11)
    samples = {f"v{i}": _panel(rng) for i in range(cohort_size)}
    gates = _learn(samples)
    for sample_id, adata in samples.items():
        annotated, row = _quadrants(adata, gates, sample_id)
        truth = adata.obs["truth"].to_numpy()
        called = annotated.obs["b_subset"].to_numpy()
        for subset in ("naive", "unswitched_memory", "switched_memory"):
            true_pct = 100 * (truth == subset).sum() / np.isin(
                truth, ["naive", "unswitched_memory", "switched_memory"]).sum()
            got_pct = 100 * (called == subset).sum() / (annotated.obs["cell_type"] == "B").sum()
            assert got_pct == pytest.approx(true_pct, abs=2.0), (sample_id, subset)
        igd = gates[(gates["sample_id"] == sample_id) & (gates["marker"] == "IgD")].iloc[0]
        # The T cells say where IgD-negative ends; few of them lie above the gate.
        assert igd["reliability"] == "ok" and igd["negative_above_pct"] < 2.0
        assert row["not_evaluable"] == "" and row["unreliable_gates"] == ""


def test_a_channel_that_stains_its_negative_reference_makes_b_cells_not_evaluable():
    rng = np.random.default_rng(12)
    adata = _panel(rng, cd19_on_everything=4.5)
    gates = _learn({"cytof": adata})
    cd19 = gates[gates["marker"] == "CD19"].iloc[0]
    assert cd19["reliability"] == "nonspecific"
    assert "T cells" in cd19["reliability_detail"]
    _, row = _quadrants(adata, gates, "cytof")
    # Never a count, never 0: NA with the reason.
    for column in ("b_cells", "cd19_pos", "cd19neg_cd20pos", "naive_count"):
        assert pd.isna(row[column]), column
        assert column in row["not_evaluable"].split(";")
    assert row["cd20_pos"] > 0 and row["t_cells"] > 0
    assert "CD19:nonspecific" in row["unreliable_gates"]
    assert "nonspecific" in row["not_evaluable_reason"]
    # CD20 is sound: the lymphocytes are counted from it (T + CD20+ B + NK).
    assert row["lymphocytes"] == adata.n_obs


def test_a_single_population_without_a_reference_is_not_evaluable():
    # A CD3-less B-cell panel whose CD19 shows one population: nobody can say which side
    # of any gate it lies on.
    rng = np.random.default_rng(13)
    adata = _panel(rng, cd3=False, b_share=0.0)
    gates = _learn({"x": adata}, pos=("CD19", "CD20"))
    for marker in ("CD19", "CD20"):
        row = gates[gates["marker"] == marker].iloc[0]
        assert row["reliability"] == "unreliable", marker
        assert "no reference" in row["reliability_detail"]
    _, counts = _quadrants(adata, gates, "x")
    assert pd.isna(counts["b_cells"]) and pd.isna(counts["lymphocytes"])


def test_removing_the_references_turns_the_igd_gate_into_an_unreliable_one():
    rng = np.random.default_rng(14)
    adata = _panel(rng)
    bare = dataclasses.replace(SETTINGS, references={})
    gates = _learn({"x": adata}, settings=bare)
    igd = gates[gates["marker"] == "IgD"].iloc[0]
    with_references = _learn({"x": adata})
    assert with_references[with_references["marker"] == "IgD"].iloc[0]["reliability"] == "ok"
    # Without T cells to say where IgD-negative ends, the broad IgD+ mode is either split at
    # a shallow dip or taken for the only population: never a silent, confident gate.
    assert igd["method"].startswith(("upper_tail", "valley"))
    if igd["method"].startswith("upper_tail"):
        assert igd["reliability"] == "unreliable"


# --------------------------------------------------------------------------- evaluability


RULES = load_subset_rules(load_config())


@pytest.mark.parametrize(("unreliable", "expected"), [
    # IgD: the four quadrants rest on it; plasmablast and transitional do not.
    ({("IgD", "pos")}, {"naive_count", "unswitched_memory_count", "switched_memory_count",
                        "double_negative_count"}),
    # CD24 hi: transitional rests on it, and its events may fall to any quadrant.
    ({("CD24", "hi")}, {"transitional_count", "naive_count", "unswitched_memory_count",
                        "switched_memory_count", "double_negative_count"}),
    # CD27 hi: plasmablasts, whose events (CD27hi) may fall to transitional (no marker of
    # that rule excludes them) and so, through transitional, to every quadrant.
    ({("CD27", "hi")}, {f"{s}_count" for s in SUBSETS}),
    # CD38 hi ends the same way; IgD- and CD27- alone spare plasmablasts and transitional.
    ({("CD27", "pos")}, {"naive_count", "unswitched_memory_count", "switched_memory_count",
                         "double_negative_count"}),
    # CD3: everything but nothing else.
    ({("CD3", "pos")}, {"t_cells", "b_cells", "cd19_pos", "cd20_pos", "cd19neg_cd20pos",
                        "lymphocytes", "nk_cells", *(f"{s}_count" for s in SUBSETS)}),
    # CD20 alone: B cells (CD19+ or CD20+) and what needs CD20; the lymphocytes count from
    # CD19.
    ({("CD20", "pos")}, {"b_cells", "cd20_pos", "cd19neg_cd20pos", "plasmablast_count",
                         *(f"{s}_count" for s in SUBSETS)}),
])
def test_what_rests_on_an_unreliable_gate(unreliable, expected):
    present = ["CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24"]
    got = not_evaluable(present, {key: "unreliable: x" for key in unreliable}, RULES, [])
    assert set(got) == expected


def test_a_rule_the_panel_cannot_call_is_not_called_rather_than_not_evaluable():
    rules = [SubsetRule("transitional", {"CD24": "hi", "CD38": "hi"}),
             SubsetRule("naive", {"IgD": "pos", "CD27": "neg"})]
    got = not_evaluable(["CD3", "CD19", "IgD", "CD27"], {}, rules, ["transitional"])
    assert got == {}


def test_a_hi_gate_taken_from_an_unreliable_positive_gate_is_unreliable_too():
    # No CD27+ B cell and no reference for CD27: its positive gate is the upper tail of one
    # population (unreliable); the plasmablasts' CD27hi gate, taken from it for want of a
    # positive peak, is as unreliable, and the plasmablast count is not evaluable.
    rng = np.random.default_rng(15)
    adata = _panel(rng)
    b_cells = np.isin(adata.obs["truth"], ["naive", "unswitched_memory", "switched_memory"])
    x = adata.X.copy()
    x[b_cells, list(adata.var_names).index("CD27")] = rng.normal(0.2, 0.3, b_cells.sum())
    adata.X = x
    references = dict(SETTINGS.references)
    references.pop("CD27")
    settings = dataclasses.replace(SETTINGS, references=references)
    _, gates = learn_gates({"x": adata}, pos_markers=["CD3", "CD19", "CD20", "IgD", "CD27"],
                           hi_markers=["CD27"], settings=settings, seed=0)
    cd27 = gates[gates["marker"] == "CD27"].set_index("level")
    assert cd27.loc["pos", "reliability"] == "unreliable"
    assert cd27.loc["hi", "method"] == "positive_gate"
    assert cd27.loc["hi", "reliability"] == "unreliable"
    got = not_evaluable(list(adata.var["canonical"]),
                        {(m, lv): "unreliable: x" for m, lv in
                         gates.loc[gates["reliability"] == "unreliable", ["marker", "level"]]
                         .itertuples(index=False)}, RULES, [])
    assert "plasmablast_count" in got
