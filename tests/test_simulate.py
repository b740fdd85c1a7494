"""The demo cohort simulator: its files, its truth, and the biology it promises.

Every check recomputes what it asserts from the written files (FCS read back with flowio,
compensation with flowutils, counts from the per-event codes, kinetics days by a loop
written here), never from the simulator's own summaries alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import flowio
import numpy as np
import pandas as pd
import pytest
from flowutils import compensate

from bcellmap.cli import main
from bcellmap.demo import simulate
from bcellmap.io.samplesheet import read_sample_sheet

EVENTS = 3000
SUBSETS = ("transitional", "naive", "unswitched_memory", "switched_memory",
           "double_negative", "plasmablast")
CATEGORIES = ("debris", "doublets", "dead", "margin", "myeloid", "t_cells", "nk_cells",
              "b_cells")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "cohort"
    sheet = simulate.simulate_cohort(folder, seed=7, events_per_file=EVENTS)
    assert sheet == folder / "samples.tsv"
    return folder


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Path:
    """The workflow's demo cohort: fixture preset (20,000 events per file), default seed."""
    folder = tmp_path_factory.mktemp("demo") / "fixture"
    simulate.simulate_cohort(folder, seed=simulate.DEFAULT_SEED, scrna=False)
    return folder


@pytest.fixture(scope="module")
def truth(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "truth_samples.tsv", sep="\t")


@pytest.fixture(scope="module")
def patients(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "truth_patients.tsv", sep="\t")


@pytest.fixture(scope="module")
def codes(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "truth_codes.tsv", sep="\t")


def _read_fcs(path: Path) -> tuple[flowio.FlowData, np.ndarray]:
    fcs = flowio.FlowData(str(path))
    return fcs, np.reshape(np.asarray(fcs.events, dtype=np.float64), (-1, fcs.channel_count))


def _event_categories(cohort: Path, codes: pd.DataFrame, sample_id: str) -> np.ndarray:
    return codes["category"].to_numpy()[np.load(cohort / "truth_events" / f"{sample_id}.npy")]


def test_sample_sheet_follows_the_contract(cohort):
    sheet = read_sample_sheet(cohort / "samples.tsv")
    raw = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(raw.columns) == ["sample_id", "patient_id", "day", "modality", "path",
                                 "lymphocytes_per_ul", "disease", "batch", "panel"]
    assert set(raw["modality"]) == {"flow", "scrna"} and (raw["panel"] == "").all()
    assert all(not Path(p).is_absolute() and (cohort / p).is_file() for p in raw["path"])
    # scRNA: four visits of P01 and P03, each on a flow visit's day with its clinical count.
    scrna = sheet[sheet["modality"] == "scrna"]
    assert scrna.groupby("patient_id").size().to_dict() == {"P01": 4, "P03": 4}
    sheet = sheet[sheet["modality"] == "flow"]
    paired = scrna.merge(sheet, on=["patient_id", "day"], suffixes=("_scrna", "_flow"))
    assert len(paired) == 4 * 2
    assert (paired["lymphocytes_per_ul_scrna"] == paired["lymphocytes_per_ul_flow"]).all()
    assert sheet["patient_id"].nunique() == 5
    diseases = sheet.groupby("patient_id")["disease"].first().value_counts().to_dict()
    assert diseases == {"SLE": 3, "systemic sclerosis": 1, "myositis": 1}
    for _, visits in sheet.groupby("patient_id"):
        days = visits["day"].sort_values().to_numpy()
        assert (days < 0).sum() == 1 and (days > 0).sum() == 10
        assert days.max() >= 360
    baseline = sheet[sheet["day"] < 0]["lymphocytes_per_ul"]
    early = sheet[(sheet["day"] > 0) & (sheet["day"] <= 14)]["lymphocytes_per_ul"]
    assert baseline.between(1000, 1500).all()
    assert early.between(200, 600).all()


def test_counts_add_up_and_match_the_event_codes(cohort, truth, codes):
    for row in truth.itertuples(index=False):
        per_event = _event_categories(cohort, codes, row.sample_id)
        _, events = _read_fcs(cohort / f"{row.sample_id}.fcs")
        assert len(per_event) == len(events) == row.events_total == EVENTS
        for category in CATEGORIES:
            assert getattr(row, category) == int((per_event == category).sum()), category
        assert sum(getattr(row, c) for c in CATEGORIES) == row.events_total
        assert row.lymphocytes == row.t_cells + row.nk_cells + row.b_cells
        assert sum(getattr(row, f"{s}_count") for s in SUBSETS) == row.b_cells
        assert row.b_pct_lymphocytes == pytest.approx(100 * row.b_cells / row.lymphocytes)
        assert row.b_per_ul == pytest.approx(row.b_pct_lymphocytes / 100
                                             * row.lymphocytes_per_ul)
        # Plasmablasts are CD20-negative; masked B cells are CD19-negative.
        assert row.cd20_pos == row.b_cells - row.plasmablast_count
        assert row.cd19_pos == row.b_cells - row.cd19neg_cd20pos


def test_fcs_files_read_back_with_keywords_and_spillover(cohort, truth, codes):
    row = truth.iloc[0]
    fcs, events = _read_fcs(cohort / f"{row.sample_id}.fcs")
    assert fcs.version == "3.1"
    assert fcs.event_count == row.events_total
    assert fcs.text["datatype"] == "F"
    names = [fcs.text[f"p{i + 1}n"] for i in range(fcs.channel_count)]
    markers = [fcs.text.get(f"p{i + 1}s", "") for i in range(fcs.channel_count)]
    assert names[:3] == ["FSC-A", "FSC-H", "SSC-A"] and names[-1] == "Time"
    assert sorted(m for m in markers if m) == sorted(
        ["Live/Dead", "CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24"])
    assert all(fcs.text[f"p{i + 1}r"] == "262144" for i in range(fcs.channel_count))
    for keyword in ("cyt", "date", "timestep"):
        assert fcs.text[keyword]
    assert float(fcs.text["timestep"]) == pytest.approx(0.01)
    # $SPILLOVER: n, the n detector names (fluorescence channels), then an n x n matrix.
    fields = fcs.text["spillover"].split(",")
    n = int(fields[0])
    detectors = fields[1:n + 1]
    matrix = np.array(fields[n + 1:], dtype=float).reshape(n, n)
    assert detectors == [nm for nm, mk in zip(names, markers, strict=True) if mk]
    assert np.allclose(np.diag(matrix), 1.0) and (matrix >= 0).all() and matrix.max() <= 1
    assert (matrix - np.eye(n)).max() > 0.05          # a realistic, not an identity, matrix
    assert np.all(np.diff(events[:, -1]) >= 0)
    # Margin events, and only they, carry a scatter value at $PnR - 1; a saturated
    # fluorescence detector is the cell's brightest and the cell keeps its category.
    saturated = (events[:, :3] >= 262143).any(axis=1)
    categories = _event_categories(cohort, codes, row.sample_id)
    assert np.array_equal(saturated, categories == "margin")
    assert saturated.sum() > 0
    fluorescence = events[:, 3:-1]
    bright = (fluorescence >= 262143).any(axis=1) & ~saturated
    assert bright.sum() > 0 and (categories[bright] != "margin").all()
    assert (fluorescence[bright].argmax(axis=1) == np.argmax(
        fluorescence[bright] >= 262143, axis=1)).all()


def test_kinetics_days_follow_from_true_counts(truth, patients):
    for patient in patients.itertuples(index=False):
        visits = truth[truth["patient_id"] == patient.patient_id].sort_values("day")
        post = visits[visits["day"] > 0]
        for measure, prefix in (("b", ""), ("cd19", "cd19_"), ("cd20", "cd20_")):
            days = post["day"].tolist()
            values = post[f"{measure}_per_ul"].tolist()
            depleted = None
            for i, value in enumerate(values):
                if value < 1:
                    depleted = i
                    break
            reconstituted = None
            for i in range(depleted + 1, len(values) - 1):
                if values[i] >= 10 and values[i + 1] >= 10:
                    reconstituted = days[i]
                    break
            assert getattr(patient, f"{prefix}depletion_day") == days[depleted]
            recorded = getattr(patient, f"{prefix}reconstitution_day")
            if reconstituted is None:
                assert pd.isna(recorded) and getattr(patient, f"{prefix}censored")
            else:
                assert recorded == reconstituted
                assert not getattr(patient, f"{prefix}censored")
            # No unconfirmed return: a last visit at or above 10/uL follows another one.
            if values[-1] >= 10:
                assert values[-2] >= 10
        assert patient.last_day == visits["day"].max()
        assert patient.depletion_day <= 7
    assert patients["censored"].sum() == 1
    returned = patients["reconstitution_day"].dropna()
    assert len(returned) == 4 and returned.between(50, 150).all()
    assert 80 <= returned.mean() <= 140


def _outside(values: pd.Series, bands) -> bool:
    return bool(np.all([~values.between(low, high) for low, high in bands]))


@pytest.mark.parametrize("which", ["cohort", "full_size"])
def test_truth_is_never_within_25_percent_of_a_threshold(which, request):
    folder = request.getfixturevalue(which)
    truth = pd.read_csv(folder / "truth_samples.tsv", sep="\t")
    codes = pd.read_csv(folder / "truth_codes.tsv", sep="\t")
    for row in truth.itertuples(index=False):
        # Recount from the per-event codes: B cells, CD19+ (not masked), CD20+ (not PB).
        per_event = np.load(folder / "truth_events" / f"{row.sample_id}.npy")
        category = codes["category"].to_numpy()[per_event]
        b = category == "b_cells"
        lymphocytes = np.isin(category, ["t_cells", "nk_cells", "b_cells"]).sum()
        counts = {"b": b.sum(), "cd19": (b & ~codes["cd19_negative"].to_numpy()[per_event]).sum(),
                  "cd20": (b & (codes["b_subset"].to_numpy()[per_event] != "plasmablast")).sum()}
        for measure, n in counts.items():
            pct = pd.Series([100.0 * n / lymphocytes])
            per_ul = pct / 100 * row.lymphocytes_per_ul
            assert _outside(per_ul, [(0.75, 1.33), (7.5, 13.3)]), (row.sample_id, measure)
            assert _outside(pct, [(0.075, 0.133), (0.75, 1.33)]), (row.sample_id, measure)


def test_some_visits_sit_close_to_the_thresholds(full_size):
    truth = pd.read_csv(full_size / "truth_samples.tsv", sep="\t")
    post = truth[truth["day"] > 0]
    per_ul = post["b_per_ul"]
    # Just above and below 1/uL, just above and below 10/uL (outside the +-25% bands).
    for low, high in ((1.33, 2.0), (0.5, 0.75), (13.3, 16.5), (5.5, 7.5)):
        assert per_ul.between(low, high, inclusive="neither").any(), (low, high)
    near = post[per_ul.between(0.5, 2.0) | per_ul.between(5.5, 16.5)]
    assert len(near) >= 5
    # They carry more than the aplasia's plasmablasts: CD20+ B cells (residual or returning).
    assert (near["cd20_pos"] >= 5).all()
    # ... and the truth table marks them.
    assert set(near["sample_id"]) == set(truth.loc[truth["near_threshold"].notna(),
                                                     "sample_id"])


def test_one_patient_masks_cd19_and_no_other_does(truth, patients):
    masking = patients[patients["masking"]]
    assert len(masking) == 1
    masked_id = masking["patient_id"].iloc[0]
    share = truth["cd19neg_cd20pos"] / truth["b_cells"].where(truth["b_cells"] > 0)
    masked_visits = truth[(truth["patient_id"] == masked_id) & (share > 0.005)]
    assert len(masked_visits) >= 2
    assert share[masked_visits.index].between(0.4, 0.7).all()
    others = truth[truth["patient_id"] != masked_id]
    assert (others["cd19neg_cd20pos"] == 0).all()


def test_subset_composition_matches_the_biology(truth, patients):
    baseline = truth[truth["day"] < 0]
    assert baseline["naive_pct_b"].between(55, 70).all()
    memory = baseline["unswitched_memory_pct_b"] + baseline["switched_memory_pct_b"]
    assert memory.between(22, 38).all()
    assert baseline["transitional_pct_b"].between(1.5, 6).all()
    assert baseline["plasmablast_pct_b"].between(0.5, 4).all()
    assert baseline["double_negative_pct_b"].between(2, 10).all()
    t_share = 100 * baseline["t_cells"] / baseline["lymphocytes"]
    assert t_share.between(65, 75).all()
    for patient in patients.dropna(subset=["reconstitution_day"]).itertuples():
        first = truth[(truth["patient_id"] == patient.patient_id)
                      & (truth["day"] == patient.reconstitution_day)].iloc[0]
        assert 15 <= first.transitional_pct_b <= 32
        assert 60 <= first.naive_pct_b <= 80
        assert first.unswitched_memory_pct_b + first.switched_memory_pct_b < 10
    # During aplasia the only B-lineage events are a handful of plasmablasts (a residual
    # visit below 1/uL keeps a few B cells of every subset).
    aplasia = truth[(truth["b_per_ul"] < 1) & (truth["phase"] == "aplasia")]
    assert len(aplasia) >= 20
    assert (aplasia["b_cells"] == aplasia["plasmablast_count"]).all()
    assert (aplasia["b_cells"] <= 3).all()


def _compensated(folder: Path, codes: pd.DataFrame, sample_id: str):
    """Events, compensated values (file's own $SPILLOVER, flowutils), markers, labels."""
    fcs, events = _read_fcs(folder / f"{sample_id}.fcs")
    fields = fcs.text["spillover"].split(",")
    n = int(fields[0])
    spill = np.array(fields[n + 1:], dtype=float).reshape(n, n)
    names = [fcs.text[f"p{i + 1}n"] for i in range(fcs.channel_count)]
    markers = {fcs.text.get(f"p{i + 1}s", ""): i for i in range(fcs.channel_count)}
    fluoro = [names.index(d) for d in fields[1:n + 1]]
    compensated = compensate.compensate(events, spill, fluoro)
    labels = codes["label"].to_numpy()[np.load(folder / "truth_events" / f"{sample_id}.npy")]
    return events, compensated, markers, names, labels


B_LABELS = ["b_transitional", "b_naive", "b_unswitched_memory", "b_switched_memory",
            "b_double_negative"]


def test_populations_separate_after_compensation_and_arcsinh(cohort, truth, codes):
    # A baseline and a first-return visit of P01 (memory-rich and transitional-rich), each
    # compensated with its own $SPILLOVER (visits drift, so each is judged on its own).
    p01 = truth[truth["patient_id"] == "P01"]
    sample_ids = [p01[p01["day"] < 0]["sample_id"].iloc[0],
                  p01[p01["phase"] == "return"]["sample_id"].iloc[0]]
    for sample_id in sample_ids:
        events, compensated, markers, names, labels = _compensated(cohort, codes, sample_id)
        x = np.arcsinh(compensated / 150.0)

        def separation(marker: str, positive: list[str], negative: list[str],
                       x=x, markers=markers, labels=labels) -> float:
            values = x[:, markers[marker]]
            pos, neg = values[np.isin(labels, positive)], values[np.isin(labels, negative)]
            assert len(pos) >= 10 and len(neg) >= 10
            return (pos.mean() - neg.mean()) / np.sqrt((pos.var() + neg.var()) / 2)

        b = B_LABELS
        assert separation("CD3", ["t_cell"], ["nk_cell", *b]) >= 4
        assert separation("CD19", b, ["t_cell", "nk_cell"]) >= 4
        assert separation("CD20", b, ["t_cell", "nk_cell"]) >= 4
        if sample_id == sample_ids[0]:
            # Baseline (memory-rich): IgD and CD27 quadrants; memory CD38 dim/low below naive.
            assert separation("IgD", ["b_naive", "b_unswitched_memory"],
                              ["b_switched_memory", "b_double_negative"]) >= 3
            assert separation("CD27", ["b_unswitched_memory", "b_switched_memory"],
                              ["b_naive", "b_double_negative"]) >= 3
            assert separation("CD38", ["b_naive"], ["b_switched_memory",
                                                    "b_unswitched_memory"]) >= 1.5
        else:
            # First return (transitional-rich): CD24 and CD38 put transitional cells on the
            # upper tail of a naive continuum, above naive on average but no separate island.
            for marker in ("CD24", "CD38"):
                assert 2 <= separation(marker, ["b_transitional"], ["b_naive"]) <= 5, marker
        # Negative populations sit around 0 after compensation and spread below it.
        t_cd19 = compensated[labels == "t_cell", markers["CD19"]]
        assert abs(np.median(t_cd19)) < 150 and (t_cd19 < 0).mean() > 0.2
        # Doublets: FSC-A/FSC-H well above the singlets'; dead cells: viability bright.
        ratio = events[:, names.index("FSC-A")] / events[:, names.index("FSC-H")]
        singlets = np.isin(labels, ["t_cell", "nk_cell", *b, "monocyte"])
        assert np.median(ratio[labels == "doublet"]) > 1.4 * np.median(ratio[singlets])
        live = x[:, markers["Live/Dead"]]
        assert np.median(live[labels == "dead"]) > np.median(live[singlets]) + 3


def _oracle_gate_errors(x: dict[str, np.ndarray], subset: np.ndarray) -> tuple[dict, float]:
    """Best axis-aligned gates (subsets.yaml precedence) for the true B cells of one visit.

    Thresholds on IgD, CD27, CD27hi, CD24hi, CD38hi, CD20 are tuned by coordinate descent
    to misclassify the fewest events; returns each subset's gated minus true % of B cells
    and the misclassified share.
    """
    order = ["plasmablast", "transitional", "naive", "unswitched_memory", "switched_memory",
             "double_negative"]
    truth = np.array([order.index(s) for s in subset])

    def gate(t):
        igd, cd27 = x["IgD"] >= t[0], x["CD27"] >= t[1]
        out = np.where(igd, np.where(cd27, 3, 2), np.where(cd27, 4, 5))
        out[(x["CD24"] >= t[3]) & (x["CD38"] >= t[4])] = 1
        out[(x["CD27"] >= t[2]) & (x["CD38"] >= t[4]) & (x["CD20"] < t[5])] = 0
        return out

    t = [3.0, 2.0, 5.5, 5.0, 4.5, 3.0]
    best = (gate(t) != truth).sum()
    grid = np.arange(0.0, 7.5, 0.04)
    for _ in range(3):
        for k in range(len(t)):
            for value in grid:
                trial = [*t[:k], value, *t[k + 1:]]
                wrong = (gate(trial) != truth).sum()
                if wrong < best:
                    best, t = wrong, trial
    gated = gate(t)
    errors = {s: 100 * ((gated == i).sum() - (truth == i).sum()) / len(truth)
              for i, s in enumerate(order)}
    return errors, best / len(truth)


def test_subsets_overlap_yet_a_well_placed_gate_recovers_them(full_size, codes):
    truth = pd.read_csv(full_size / "truth_samples.tsv", sep="\t")
    # A memory-rich baseline and a transitional-rich first return, about 1,000 B cells each.
    picks = [truth[truth["phase"] == "baseline"].iloc[0],
             truth[(truth["phase"] == "return") & truth["b_cells"].between(600, 2000)
                   & (truth["transitional_pct_b"] > 15)].iloc[0]]
    for row in picks:
        _, compensated, markers, _, labels = _compensated(full_size, codes, row.sample_id)
        is_b = np.char.startswith(labels.astype(str), "b_")
        x = {m: np.arcsinh(compensated[is_b, markers[m]] / 150.0)
             for m in ("IgD", "CD27", "CD24", "CD38", "CD20")}
        subset = codes.set_index("label")["b_subset"].reindex(labels[is_b]).to_numpy()
        errors, misclassified = _oracle_gate_errors(x, subset)
        assert max(abs(e) for e in errors.values()) <= 1.5, (row.sample_id, errors)
        # Overlap is real: even the best gates misclassify some events ...
        assert misclassified > 0.003, row.sample_id
        # ... transitional cells are not an island: naive cells reach into their CD38 range,
        naive = labels[is_b] == "b_naive"
        transitional = labels[is_b] == "b_transitional"
        assert (x["CD38"][naive] > np.quantile(x["CD38"][transitional], 0.1)).mean() > 0.01
        # some memory cells are only 3-4x above the CD27-negative naive cells (linear),
        memory = np.isin(labels[is_b], ["b_switched_memory", "b_unswitched_memory"])
        cd27 = compensated[is_b, markers["CD27"]]
        dim = cd27[memory] < 5 * np.quantile(cd27[naive], 0.99)
        assert 0.002 <= dim.mean() <= 0.1, dim.mean()
        # and IgD on switched memory is negative with a tail above the negative T cells.
        switched = labels[is_b] == "b_switched_memory"
        t_igd = np.quantile(compensated[labels == "t_cell", markers["IgD"]], 0.95)
        switched_igd = compensated[is_b, markers["IgD"]][switched]
        assert np.median(switched_igd) < 3 * t_igd
        assert np.quantile(switched_igd, 0.95) > 2 * t_igd


def test_drift_is_applied_per_visit_and_the_spillover_compensates_it(full_size, codes):
    truth = pd.read_csv(full_size / "truth_samples.tsv", sep="\t")
    drift = pd.read_csv(full_size / "truth_drift.tsv", sep="\t")
    assert len(drift) == 8 * len(truth)
    assert drift["staining_factor"].between(0.7, 1.4).all()
    assert drift["detector_gain"].between(0.85, 1.18).all()
    assert drift["staining_factor"].std() > 0.1 and drift["detector_gain"].std() > 0.05
    factors = drift.set_index(["sample_id", "marker"])
    # Known positive populations: compensated medians scale by staining x gain, i.e. after
    # dividing by the recorded factors the same population agrees across visits.
    baselines = truth[truth["day"] < 0]["sample_id"].tolist()
    for marker, population in (("CD3", ["t_cell"]), ("CD38", ["nk_cell"]),
                               ("CD20", B_LABELS), ("Live/Dead", ["dead"])):
        scaled, raw = [], []
        for sample_id in baselines:
            _, compensated, markers, _, labels = _compensated(full_size, codes, sample_id)
            median = np.median(compensated[np.isin(labels, population), markers[marker]])
            f = factors.loc[(sample_id, marker)]
            raw.append(median)
            scaled.append(median / (f["staining_factor"] * f["detector_gain"]))
        scaled, raw = np.array(scaled), np.array(raw)
        assert scaled.max() / scaled.min() < 1.08, (marker, scaled)
        assert raw.max() / raw.min() > 1.2, (marker, raw)       # drift is visible
    # The file's $SPILLOVER is the one that compensates: negative populations stay at 0
    # even next to a bright spilling marker (CD3 -> CD19 detector on T cells).
    for sample_id in baselines:
        _, compensated, markers, _, labels = _compensated(full_size, codes, sample_id)
        t_cells = labels == "t_cell"
        assert abs(np.median(compensated[t_cells, markers["CD19"]])) < 40
        assert abs(np.median(compensated[t_cells, markers["CD24"]])) < 40
        fcs, _ = _read_fcs(full_size / f"{sample_id}.fcs")
        fields = fcs.text["spillover"].split(",")
        matrix = np.array(fields[9:], dtype=float).reshape(8, 8)
        gains = factors.xs(sample_id)["detector_gain"]
        names = [fcs.text[f"p{i + 1}n"] for i in range(fcs.channel_count)]
        gain = np.array([gains[fcs.text[f"p{names.index(d) + 1}s"]] for d in fields[1:9]])
        # Column j scaled by g_j, row i by 1/g_i: off-diagonal ratios to another visit's
        # matrix are the gain ratios, the diagonal stays 1.
        assert np.allclose(np.diag(matrix), 1.0, atol=1e-5)
        assert np.allclose(matrix * gain[:, None] / gain[None, :],
                           _nominal_spillover(full_size, truth), atol=2e-5)


def _nominal_spillover(folder: Path, truth: pd.DataFrame) -> np.ndarray:
    """The gain-free spillover: the last visit's matrix with its recorded gains divided out."""
    drift = pd.read_csv(folder / "truth_drift.tsv", sep="\t")
    sample_id = truth["sample_id"].iloc[-1]
    fcs, _ = _read_fcs(folder / f"{sample_id}.fcs")
    fields = fcs.text["spillover"].split(",")
    matrix = np.array(fields[9:], dtype=float).reshape(8, 8)
    names = [fcs.text[f"p{i + 1}n"] for i in range(fcs.channel_count)]
    gains = drift[drift["sample_id"] == sample_id].set_index("marker")["detector_gain"]
    gain = np.array([gains[fcs.text[f"p{names.index(d) + 1}s"]] for d in fields[1:9]])
    return matrix * gain[:, None] / gain[None, :]


def test_lymphopenic_visits_are_lysed_whole_blood(cohort, truth, codes):
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t")
    flow = sheet[sheet["modality"] == "flow"].set_index("sample_id")
    window = truth[truth["day"].between(7, 28)]
    assert len(window) == 3 * 5
    inside = outside = 0
    for row in truth.itertuples(index=False):
        category = _event_categories(cohort, codes, row.sample_id)
        labels = codes["label"].to_numpy()[
            np.load(cohort / "truth_events" / f"{row.sample_id}.npy")]
        share = {name: 100 * (labels == name).mean() for name in ("granulocyte", "monocyte")}
        lymphocytes = 100 * np.isin(category, ["t_cells", "nk_cells", "b_cells"]).mean()
        if 7 <= row.day <= 28:
            assert 8 <= lymphocytes <= 15, (row.sample_id, lymphocytes)
            assert 55 <= share["granulocyte"] <= 65, (row.sample_id, share)
            assert 7.5 <= share["monocyte"] <= 12.5, (row.sample_id, share)
            counts = pd.Series(category).value_counts()
            assert counts.idxmax() == "myeloid"
            assert 200 <= flow.loc[row.sample_id, "lymphocytes_per_ul"] <= 500
            assert row.lymphopenic
            # Some granulocytes reach into the lymphocytes' scatter gate (from true T cells).
            _, events = _read_fcs(cohort / f"{row.sample_id}.fcs")
            fsc, ssc = events[:, 0], events[:, 2]
            t = labels == "t_cell"
            gate = (fsc >= np.quantile(fsc[t], 0.01)) & (fsc <= np.quantile(fsc[t], 0.99)) & (
                ssc >= np.quantile(ssc[t], 0.01)) & (ssc <= np.quantile(ssc[t], 0.99))
            inside += (gate & (labels == "granulocyte")).sum()
            outside += (gate & (labels != "granulocyte")).sum()
        else:
            assert lymphocytes > 50 and not row.lymphopenic, row.sample_id
    assert inside >= 5 and inside < 0.05 * outside


def test_switches_off_restore_the_plain_cohort(tmp_path):
    simulate.simulate_cohort(tmp_path / "on", seed=11, events_per_file=1000, scrna=False)
    assert main(["simulate", "--out", str(tmp_path / "off"), "--events", "1000", "--seed", "11",
                 "--no-scrna", "--no-drift", "--no-lymphopenic"]) == 0
    off = tmp_path / "off"
    drift = pd.read_csv(off / "truth_drift.tsv", sep="\t")
    assert (drift["staining_factor"] == 1).all() and (drift["detector_gain"] == 1).all()
    truth = pd.read_csv(off / "truth_samples.tsv", sep="\t")
    assert not truth["lymphopenic"].any()
    assert (truth["lymphocytes"] / truth["events_total"] > 0.5).all()
    sheet = pd.read_csv(off / "samples.tsv", sep="\t")
    assert sheet.loc[sheet["day"].between(7, 28), "lymphocytes_per_ul"].between(300, 750).all()
    spillovers = {flowio.FlowData(str(p)).text["spillover"] for p in off.glob("*.fcs")}
    assert len(spillovers) == 1
    # Drift changes the signals, never the planted events: same codes where composition is
    # the same (outside the lymphopenic window).
    on = pd.read_csv(tmp_path / "on" / "truth_samples.tsv", sep="\t")
    assert on["lymphopenic"].sum() == 15
    assert len({flowio.FlowData(str(p)).text["spillover"]
                for p in (tmp_path / "on").glob("*.fcs")}) == len(on)
    for sample_id in truth.loc[~truth["day"].between(7, 28), "sample_id"]:
        assert np.array_equal(np.load(off / "truth_events" / f"{sample_id}.npy"),
                              np.load(tmp_path / "on" / "truth_events" / f"{sample_id}.npy"))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    def digests(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    simulate.simulate_cohort(tmp_path / "a", seed=11, events_per_file=1000, scrna=False)
    simulate.simulate_cohort(tmp_path / "b", seed=11, events_per_file=1000, scrna=False)
    simulate.simulate_cohort(tmp_path / "c", seed=12, events_per_file=1000, scrna=False)
    first, second, third = (digests(tmp_path / name) for name in "abc")
    assert first == second
    assert len(first) == 55 * 2 + 5
    fcs = [name for name in first if name.endswith(".fcs")]
    assert all(first[name] != third[name] for name in fcs)


def test_parallel_scrna_patients_write_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setitem(simulate.PRESET_SCRNA_CELLS, "fixture", 300)

    def digests(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    simulate.simulate_cohort(tmp_path / "serial", seed=11, events_per_file=1000, workers=1)
    simulate.simulate_cohort(tmp_path / "parallel", seed=11, events_per_file=1000, workers=2)
    serial, parallel = digests(tmp_path / "serial"), digests(tmp_path / "parallel")
    assert serial == parallel
    assert sum(name.startswith("scrna/") for name in serial) >= 2 * 4


def test_anomaly_window_arrives_faster(cohort, truth):
    with_anomaly = truth[truth["anomaly_events"] > 0]
    assert 0 < len(with_anomaly) < len(truth)
    row = with_anomaly.iloc[0]
    _, events = _read_fcs(cohort / f"{row.sample_id}.fcs")
    time = events[:, -1]
    inside = (time >= row.anomaly_time_start) & (time <= row.anomaly_time_end)
    assert inside.sum() == row.anomaly_events
    rate_inside = inside.sum() / (row.anomaly_time_end - row.anomaly_time_start)
    rate_overall = len(time) / (time[-1] - time[0])
    assert rate_inside > 3 * rate_overall


def test_interrupted_run_leaves_no_cohort(tmp_path, monkeypatch):
    real_write = simulate._write_fcs
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    monkeypatch.setattr(simulate, "_write_fcs", failing_write)
    with pytest.raises(OSError):
        simulate.simulate_cohort(tmp_path / "new", events_per_file=1000, scrna=False)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(simulate, "_write_fcs", real_write)
    simulate.simulate_cohort(tmp_path / "old", seed=1, events_per_file=1000, scrna=False)
    before = (tmp_path / "old" / "samples.tsv").read_bytes()
    calls.clear()
    monkeypatch.setattr(simulate, "_write_fcs", failing_write)
    with pytest.raises(OSError):
        simulate.simulate_cohort(tmp_path / "old", seed=2, events_per_file=1000, scrna=False)
    assert (tmp_path / "old" / "samples.tsv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]     # no staging folder left


def test_cli_writes_the_cohort_and_rejects_bad_sizes(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "demo"), "--events", "1000",
                 "--seed", "5", "--no-scrna"]) == 0
    sheet = read_sample_sheet(tmp_path / "demo" / "samples.tsv")
    assert len(sheet) == 55 and set(sheet["modality"]) == {"flow"}
    assert main(["simulate", "--out", str(tmp_path / "small"), "--events", "10"]) == 1
    assert "at least" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()
