"""Hierarchical gates, registration between visits, naive-referenced hi gates, flags and
lymphocytes by markers, against populations whose membership is known."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bcellmap.config import load_config
from bcellmap.flow.annotate import annotate_sample, lineage_qc_row, load_subset_rules
from bcellmap.flow.gating import (
    GatingSettings,
    find_landmarks,
    gates_for_sample,
    learn_gates,
    lymphocyte_gate,
    naive_referenced_gates,
)
from bcellmap.kernels.density import learn_marker_threshold

MARKERS = ["CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24"]
SETTINGS = GatingSettings.defaults()


def _adata(columns: dict[str, np.ndarray], labels: np.ndarray) -> ad.AnnData:
    names = list(columns)
    x = np.column_stack([columns[m] for m in names]).astype(np.float32)
    adata = ad.AnnData(x, var=pd.DataFrame({"canonical": names}, index=names))
    adata.obs["truth"] = labels
    return adata


def _blood(rng: np.random.Generator, *, n: int = 8000, b_share: float = 0.1,
           memory_share: float = 0.3, shift: float = 0.0, stretch: float = 1.0,
           igd_t_split: bool = False) -> ad.AnnData:
    """T, NK and B cells (naive IgD+ CD27-, memory IgD- CD27+) with one visit's drift.

    ``shift`` moves every negative peak (instrument gain/offset), ``stretch`` scales the
    distance of every positive peak from its negative one (staining brightness).
    """
    n_b = int(round(b_share * n))
    n_t = int(round(0.7 * (n - n_b)))
    n_nk = n - n_b - n_t
    n_mem = int(round(memory_share * n_b))
    labels = np.array(["T"] * n_t + ["NK"] * n_nk + ["memory"] * n_mem
                      + ["naive"] * (n_b - n_mem))

    def level(positive: np.ndarray, *, neg: float = 0.5, pos: float = 3.5,
              sd: float = 0.35) -> np.ndarray:
        centre = np.where(positive, neg + shift + (pos - neg) * stretch, neg + shift)
        return centre + rng.normal(0.0, sd, n)

    t, b = labels == "T", np.isin(labels, ["naive", "memory"])
    memory = labels == "memory"
    columns = {"CD3": level(t), "CD19": level(b), "CD20": level(b),
               "IgD": level(b & ~memory), "CD27": level(memory | t, pos=2.6),
               "CD38": level(np.zeros(n, bool)), "CD24": level(np.zeros(n, bool))}
    if igd_t_split:
        # A real quirk: the T cells' IgD-negative events form two close peaks (spread after
        # compensation), so a valley learned on all events falls between them.
        columns["IgD"][t] = np.where(rng.random(t.sum()) < 0.5, -1.2, 0.5) + rng.normal(
            0.0, 0.22, t.sum())
        naive = b & ~memory
        columns["IgD"][naive] = 3.5 + rng.normal(0.0, 0.6, naive.sum())  # broad IgD+
    return _adata(columns, labels)


def _gates(cohort: dict[str, ad.AnnData], **kwargs) -> pd.DataFrame:
    _, gates = learn_gates(cohort, pos_markers=kwargs.pop("pos", MARKERS[:5]),
                           hi_markers=kwargs.pop("hi", []), settings=kwargs.pop(
                               "settings", SETTINGS), seed=0, **kwargs)
    return gates


def _cut(gates: pd.DataFrame, sample_id: str) -> dict[str, dict[str, float]]:
    return gates_for_sample(gates, sample_id)[0]


def test_landmarks_find_both_peaks_or_one():
    rng = np.random.default_rng(1)
    both = find_landmarks(np.r_[rng.normal(0.5, 0.3, 7000), rng.normal(3.8, 0.4, 3000)])
    assert abs(both.low - 0.5) < 0.15 and abs(both.high - 3.8) < 0.2
    assert abs(both.high_share - 0.3) < 0.02
    single = find_landmarks(rng.normal(0.5, 0.3, 10000))
    assert single.high is None and abs(single.low - 0.5) < 0.1
    # A handful of positives (below min_positive_events) is no second population.
    few = find_landmarks(np.r_[rng.normal(0.5, 0.3, 10000), rng.normal(4.0, 0.3, 10)])
    assert few.high is None
    assert find_landmarks(rng.normal(0.5, 0.3, 40)) is None


def test_igd_gate_learned_on_b_cells_calls_memory_that_an_all_event_gate_misses():
    rng = np.random.default_rng(2)
    cohort = {f"v{i}": _blood(rng, b_share=0.04, igd_t_split=True) for i in range(4)}
    # The flaw this replaces: on all events the deepest valley is inside the T cells.
    pooled = np.concatenate([a[:, "IgD"].X.ravel() for a in cohort.values()])
    flat = learn_marker_threshold(pooled)
    assert flat.threshold < 0.0
    gates = _gates(cohort)
    for sample_id, adata in cohort.items():
        cut = _cut(gates, sample_id)
        igd = adata[:, "IgD"].X.ravel()
        memory = adata.obs["truth"].to_numpy() == "memory"
        b_cells = np.isin(adata.obs["truth"], ["naive", "memory"])
        assert 1.2 < cut["IgD"]["pos"] < 2.8
        called_negative = (igd[b_cells] < cut["IgD"]["pos"]).mean()
        assert abs(called_negative - memory.sum() / b_cells.sum()) < 0.01
        # The all-event gate calls (almost) every B cell IgD+.
        assert (igd[b_cells] < flat.threshold).mean() < 0.01
    row = gates[(gates["marker"] == "IgD")].iloc[0]
    assert row["parent"] == "b_cells" and row["method"].startswith("valley")


def test_registration_keeps_gates_on_drifted_visits():
    rng = np.random.default_rng(3)
    drift = [(0.0, 1.0), (0.0, 1.0), (0.1, 1.0), (-0.1, 1.0), (0.9, 0.7), (-0.4, 1.35)]
    cohort = {f"v{i}": _blood(rng, shift=s, stretch=k, memory_share=0.25)
              for i, (s, k) in enumerate(drift)}
    gates = _gates(cohort)
    pooled = np.concatenate([a[:, "CD27"].X.ravel()[np.isin(a.obs["truth"], ["naive", "memory"])]
                             for a in cohort.values()])
    unregistered = learn_marker_threshold(pooled).threshold
    errors, unregistered_errors = [], []
    for sample_id, adata in cohort.items():
        cut = _cut(gates, sample_id)
        b_cells = np.isin(adata.obs["truth"], ["naive", "memory"])
        memory = (adata.obs["truth"].to_numpy() == "memory")[b_cells]
        cd27 = adata[:, "CD27"].X.ravel()[b_cells]
        errors.append(((cd27 >= cut["CD27"]["pos"]) != memory).mean())
        unregistered_errors.append(((cd27 >= unregistered) != memory).mean())
    # Registered: each visit's memory share within 2 points; the dim, shifted visit (v4)
    # is misread by a single cohort threshold.
    assert max(errors) < 0.02
    assert unregistered_errors[4] > max(0.03, 3 * errors[4])
    # Every visit shows both populations: each is gated at its own valley (registration
    # places the gates of visits that show one population: see the aplastic test below).
    methods = gates[gates["marker"] == "CD27"].set_index("sample_id")["method"]
    assert (methods == "valley/own").all()


def test_aplastic_visit_with_a_shifted_negative_peak_gains_no_b_cells():
    rng = np.random.default_rng(4)
    cohort = {f"v{i}": _blood(rng) for i in range(4)}
    # Aplastic visit, acquired with a higher gain: its negative CD19/CD20 peak sits 0.6
    # higher. A gate placed on this sample's own events would split that peak.
    cohort["aplastic"] = _blood(rng, b_share=0.0, shift=0.6)
    gates = _gates(cohort)
    cut = _cut(gates, "aplastic")
    reference = _cut(gates, "v0")
    for marker in ("CD19", "CD20"):
        assert cut[marker]["pos"] == pytest.approx(reference[marker]["pos"] + 0.6, abs=0.15)
    row = gates[(gates["sample_id"] == "aplastic") & (gates["marker"] == "CD19")].iloc[0]
    assert row["method"] == "valley/aligned1"
    _, counts = annotate_sample(cohort["aplastic"], cut, load_subset_rules(load_config()),
                                sample_id="aplastic")
    assert counts.iloc[0]["b_cells"] <= 3


@pytest.mark.parametrize("seed", range(3))
def test_an_aplastic_visit_gated_alone_gains_no_b_cells(seed):
    # A cohort of one aplastic visit: no B peak anywhere, no valley. The CD19 and CD20 gates
    # go where the T cells' density has all but ended: phantom B cells (NK cells' tail) stay
    # below three quarters of the depletion threshold (0.1% of lymphocytes).
    rng = np.random.default_rng(seed)
    adata = _blood(rng, n=20_000, b_share=0.0)
    gates = _gates({"alone": adata})
    for marker in ("CD19", "CD20"):
        row = gates[gates["marker"] == marker].iloc[0]
        assert row["method"].startswith("reference_tail") and row["reliability"] == "ok"
    _, counts = annotate_sample(adata, _cut(gates, "alone"), load_subset_rules(load_config()),
                                sample_id="alone")
    row = counts.iloc[0]
    assert row["b_cells"] / row["lymphocytes"] < 0.00075


def _naive_and_transitional(rng: np.random.Generator, *, n: int, transitional: float,
                            shift: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """CD24/CD38 of IgD+ CD27- B cells: a correlated, left-skewed naive peak and
    transitional cells on its upper tail."""
    n_tr = int(round(transitional * n))
    n_naive = n - n_tr
    # Left-skewed naive peak (a long lower side, as arcsinh makes it): a mirrored softplus.
    base = rng.multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]], n_naive)
    naive = 4.0 - np.log1p(np.exp(-1.2 * base)) / 1.2 * 0.55
    tr = rng.multivariate_normal([4.9, 4.9], [[0.09, 0.03], [0.03, 0.09]], n_tr)
    values = np.vstack([naive, tr]) + shift
    return {"CD24": values[:, 0], "CD38": values[:, 1]}, np.r_[np.zeros(n_naive, bool),
                                                               np.ones(n_tr, bool)]


@pytest.mark.parametrize("transitional", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_naive_referenced_transitional_gate_counts_the_tail(transitional, shift):
    rng = np.random.default_rng(5)
    values, truth = _naive_and_transitional(rng, n=3000, transitional=transitional,
                                            shift=shift)
    gates = naive_referenced_gates(values, naive_sd=2.0)
    called = (values["CD24"] >= gates["CD24"]) & (values["CD38"] >= gates["CD38"])
    assert abs(called.mean() - truth.mean()) < 0.02
    assert (called == truth).mean() > 0.975
    # The gate follows the visit's drift (it is referenced to its own naive cells).
    unshifted, _ = _naive_and_transitional(np.random.default_rng(5), n=3000,
                                           transitional=transitional)
    reference = naive_referenced_gates(unshifted, naive_sd=2.0)
    assert gates["CD38"] - reference["CD38"] == pytest.approx(shift, abs=0.1)


def _b_panel(rng: np.random.Generator, *, n_b: int, transitional: float,
             cd27_unimodal: bool = False) -> ad.AnnData:
    """T cells plus B cells with CD24/CD38 (naive/transitional) and optional memory."""
    adata = _blood(rng, n=4000 + n_b, b_share=n_b / (4000 + n_b),
                   memory_share=0.0 if cd27_unimodal else 0.2)
    labels = adata.obs["truth"].to_numpy().astype(object)
    naive = labels == "naive"
    values, is_tr = _naive_and_transitional(rng, n=int(naive.sum()), transitional=transitional)
    x = adata.X.copy()
    for marker in ("CD24", "CD38"):
        column = list(adata.var_names).index(marker)
        x[naive, column] = values[marker]
    adata.X = x
    labels[np.flatnonzero(naive)[is_tr]] = "transitional"
    adata.obs["truth"] = labels
    return adata


def test_hi_gates_of_a_visit_do_not_depend_on_the_other_visits():
    rng = np.random.default_rng(6)
    visit = _b_panel(rng, n_b=1500, transitional=0.25)
    reset = {"r1": _b_panel(rng, n_b=1500, transitional=0.3),
             "r2": _b_panel(rng, n_b=1500, transitional=0.25)}
    steady = {"s1": _b_panel(rng, n_b=1500, transitional=0.02),
              "s2": _b_panel(rng, n_b=1500, transitional=0.03)}
    one = _gates({"x": visit, **reset}, hi=["CD24", "CD38"])
    other = _gates({"x": visit, **steady}, hi=["CD24", "CD38"])
    for marker in ("CD24", "CD38"):
        assert _cut(one, "x")[marker]["hi"] == pytest.approx(_cut(other, "x")[marker]["hi"],
                                                             abs=0.02)
    rules = load_subset_rules(load_config())
    _, counts = annotate_sample(visit, _cut(one, "x"), rules, sample_id="x")
    truth = visit.obs["truth"].to_numpy()
    b_true = np.isin(truth, ["naive", "transitional", "memory"]).sum()
    row = counts.iloc[0]
    assert abs(row["transitional_count"] / row["b_cells"]
               - (truth == "transitional").sum() / b_true) < 0.02


def test_single_populations_are_gated_from_their_references_and_few_events_are_flagged():
    rng = np.random.default_rng(7)
    # Every B cell is naive (a first return after CAR-T): IgD and CD27 each show one
    # population on B cells, the positive one for IgD, the negative one for CD27.
    cohort = {f"v{i}": _b_panel(rng, n_b=1200, transitional=0.05, cd27_unimodal=True)
              for i in range(3)}
    cohort["few"] = _b_panel(rng, n_b=60, transitional=0.05, cd27_unimodal=True)
    gates = _gates(cohort, hi=["CD24", "CD38"])
    for marker in ("IgD", "CD27"):
        rows = gates[(gates["marker"] == marker) & (gates["level"] == "pos")]
        big = rows[rows["sample_id"] != "few"]
        # Placed where the reference population ends (T cells' IgD: negative; naive B cells'
        # CD27), not on the upper tail of the single mode; a sound method: no flag.
        assert big["method"].str.startswith("reference_tail").all(), marker
        assert (big["flag"] == "").all() and (big["reliability"] == "ok").all(), marker
        assert (big["negative_above_pct"] <= 2.0).all(), marker
    for sample_id, adata in cohort.items():
        truth = adata.obs["truth"].to_numpy()
        b_cells = np.isin(truth, ["naive", "transitional"])
        igd = adata[:, "IgD"].X.ravel()
        cd27 = adata[:, "CD27"].X.ravel()
        cut = _cut(gates, sample_id)
        assert (igd[b_cells] >= cut["IgD"]["pos"]).mean() > 0.99
        assert (igd[truth == "T"] < cut["IgD"]["pos"]).mean() > 0.98
        assert (cd27[b_cells] < cut["CD27"]["pos"]).mean() > 0.98
    few = gates[(gates["sample_id"] == "few") & (gates["level"] == "hi")]
    assert set(few["flag"]) == {"CD24:few_events", "CD38:few_events"}
    cut, rows = gates_for_sample(gates, "few")
    _, counts = annotate_sample(cohort["few"], cut, load_subset_rules(load_config()),
                                sample_id="few", gate_table=rows)
    # 60 B cells: too few to register or to be their own reference; the cohort's gates,
    # flagged.
    assert set(counts.iloc[0]["gate_flags"].split(";")) == {
        "IgD:few_events", "CD27:few_events", "CD24:few_events", "CD38:few_events"}
    # A sound gate carries no flag.
    assert (gates[gates["marker"] == "CD19"]["flag"] == "").all()
    # Without its references, a single population cannot be placed: unreliable, never a
    # silent upper-tail gate.
    bare = dataclasses.replace(SETTINGS, references={})
    gates = _gates({"v0": cohort["v0"]}, settings=bare)
    row = gates[(gates["marker"] == "IgD")].iloc[0]
    assert row["method"].startswith("upper_tail") and row["reliability"] == "unreliable"
    assert "no reference" in row["reliability_detail"]


def test_fixed_gates_apply_as_given_to_every_visit():
    rng = np.random.default_rng(8)
    cohort = {"a": _blood(rng), "b": _blood(rng, shift=0.5)}
    settings = dataclasses.replace(SETTINGS, fixed={"CD19": 2.2}, fixed_hi={"CD38": 5.0})
    gates = _gates(cohort, hi=["CD38"], settings=settings)
    for sample_id in cohort:
        cut = _cut(gates, sample_id)
        assert cut["CD19"]["pos"] == 2.2 and cut["CD38"]["hi"] == 5.0
    assert set(gates.loc[gates["marker"].isin(["CD19", "CD38"]), "method"]) == {"fixed"}


def _lysed_whole_blood(rng: np.random.Generator, *, n_myeloid: int = 16000):
    """Lymphopenic lysed blood: few lymphocytes, many myeloid events, partly inside the
    scatter gate. Scatter in 0-10 units as ingest writes it."""
    counts = {"T": 1400, "B": 150, "NK": 450, "myeloid": n_myeloid}
    labels = np.concatenate([[k] * v for k, v in counts.items()])
    n = len(labels)
    lymph = labels != "myeloid"
    fsc = np.where(lymph, 2.3, 3.3) * rng.lognormal(0, np.where(lymph, 0.08, 0.12), n)
    ssc = np.where(lymph, 0.55, 1.6) * rng.lognormal(0, np.where(lymph, 0.18, 0.35), n)
    ssc[labels == "NK"] *= 1.2  # NK cells: large granular lymphocytes
    columns = {
        "CD3": np.where(labels == "T", 3.8, 0.4) + rng.normal(0, 0.35, n),
        "CD19": np.where(labels == "B", 3.8, 0.4) + rng.normal(0, 0.35, n),
        "CD20": np.where(labels == "B", 3.8, 0.4) + rng.normal(0, 0.35, n),
    }
    return columns, (fsc, ssc), labels


def test_lymphocytes_are_counted_by_markers_in_lysed_whole_blood():
    rng = np.random.default_rng(9)
    columns, scatter, labels = _lysed_whole_blood(rng)
    # The scatter gate that QC learned lets the myeloid events near the lymphocytes in.
    gate = (scatter[0] < 3.2) & (scatter[1] < 1.2)
    columns = {m: v[gate] for m, v in columns.items()}
    scatter = (scatter[0][gate], scatter[1][gate])
    labels = labels[gate]
    assert (labels == "myeloid").sum() > 0.2 * gate.sum()
    cut = {m: {"pos": 2.0} for m in columns}
    calls, info = lymphocyte_gate(columns, cut, scatter=scatter)
    true = labels != "myeloid"
    assert abs(calls["lymphocyte"].sum() / true.sum() - 1) < 0.03
    assert (calls["lymphocyte"] & ~true).sum() < 0.04 * true.sum()
    assert abs(calls["NK"].sum() - (labels == "NK").sum()) < 0.15 * (labels == "NK").sum()
    assert "Mahalanobis" in info["nk_rule"]
    # B share of lymphocytes right, where the scatter gate alone would be ~20% low.
    b_share = calls["B"].sum() / calls["lymphocyte"].sum()
    assert b_share == pytest.approx(150 / 2000, rel=0.05)
    assert calls["B"].sum() / gate.sum() < 0.85 * 150 / 2000
    # Without scatter the lymphocyte core cannot be placed, and the record says so.
    _, info = lymphocyte_gate(columns, cut, scatter=None)
    assert "no scatter" in info["nk_rule"]


def test_lineage_qc_row_reports_purity_and_shares():
    rng = np.random.default_rng(10)
    columns, scatter, labels = _lysed_whole_blood(rng, n_myeloid=4000)
    names = [*columns, "FSC-A", "SSC-A"]
    x = np.column_stack([*columns.values(), *scatter]).astype(np.float32)
    adata = ad.AnnData(x, var=pd.DataFrame({"canonical": names}, index=names))
    cut = {m: {"pos": 2.0} for m in columns}
    _, counts = annotate_sample(adata, cut, [], sample_id="lysed")
    row = lineage_qc_row(counts).iloc[0]
    assert row["step"] == "lineage_gate" and row["events_in"] == adata.n_obs
    assert row["events_out"] == counts.iloc[0]["lymphocytes"]
    assert row["lymphocyte_purity_pct"] == pytest.approx(100 * 2000 / adata.n_obs, abs=1.0)
    assert row["t_pct_lymphocytes"] == pytest.approx(70.0, abs=1.5)
    assert "purity" in row["detail"]


REALFCS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realfcs"


@pytest.mark.realfcs
@pytest.mark.skipif(not (REALFCS / "flowsom_ff.fcs").exists(), reason="realfcs folder absent")
def test_real_expert_gated_file_b_and_t_gates_and_a_b_depleted_copy():
    from bcellmap.config import merge
    from bcellmap.flow._ingest import ingest_flow

    config = merge(load_config(), {"panels": {"pre": {
        "channels": {}, "compensation": {"source": "none"}, "transform": {"method": "none"},
        "required_markers": []}}})
    adata = ingest_flow(REALFCS / "flowsom_ff.fcs", config=config, sample_id="ff",
                        panel="pre")
    adata = adata[adata.obs["qc_pass"].to_numpy()].copy()
    labels = pd.read_csv(REALFCS / "flowsom_ff_labels.csv")["label"].to_numpy()[
        adata.obs["event_index"].to_numpy()]
    # A B-cell-depleted copy of the same acquisition: the manually gated B cells removed.
    depleted = adata[labels != "B cells"].copy()
    cohort = {"ff": adata, "depleted": depleted}
    gates = _gates(cohort, pos=["CD3", "CD19", "CD45"])
    rules = load_subset_rules(config)
    annotated, _ = annotate_sample(adata, _cut(gates, "ff"), rules, sample_id="ff")
    called = annotated.obs["cell_type"].to_numpy()

    def f1(truth: np.ndarray, call: np.ndarray) -> float:
        return 2 * (truth & call).sum() / (truth.sum() + call.sum())

    assert f1(labels == "B cells", called == "B") > 0.95
    t_labels = np.isin(labels, ["CD4 T cells", "CD8 T cells", "gd T cells", "NK T cells"])
    assert f1(t_labels, called == "T") > 0.95
    _, counts = annotate_sample(depleted, _cut(gates, "depleted"), rules,
                                sample_id="depleted")
    # Unlabelled events the expert left out may hold a few CD19+ ones: 25 in the full file.
    assert counts.iloc[0]["b_cells"] <= 30
    own = gates[gates["marker"] == "CD19"].set_index("sample_id")["threshold"]
    assert own["depleted"] == pytest.approx(own["ff"], abs=0.3)
