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

from bcellmap import simulate
from bcellmap.cli import main
from bcellmap.samplesheet import read_sample_sheet

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
    # Margin events, and only they, carry a value at $PnR - 1.
    saturated = (events[:, :-1] >= 262143).any(axis=1)
    categories = _event_categories(cohort, codes, row.sample_id)
    assert np.array_equal(saturated, categories == "margin")
    assert saturated.sum() > 0


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


def test_truth_is_never_near_a_kinetics_threshold(truth):
    for measure in ("b", "cd19", "cd20"):
        per_ul = truth[f"{measure}_per_ul"]
        pct = truth[f"{measure}_pct_lymphocytes"]
        assert ((per_ul < 0.3) | (per_ul > 25)).all(), measure
        assert ((pct < 0.03) | (pct > 2.5)).all(), measure


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
    # During aplasia the only B-lineage events are a handful of plasmablasts.
    aplasia = truth[truth["b_per_ul"] < 1]
    assert (aplasia["b_cells"] == aplasia["plasmablast_count"]).all()
    assert (aplasia["b_cells"] <= 3).all()


def test_populations_separate_after_compensation_and_arcsinh(cohort, truth, codes):
    # Levels are the same in every file: pool a baseline and a first-return visit of P01
    # (memory-rich and transitional-rich), compensated with the file's own $SPILLOVER.
    p01 = truth[truth["patient_id"] == "P01"]
    sample_ids = [p01[p01["day"] < 0]["sample_id"].iloc[0],
                  p01[p01["b_per_ul"] > 1]["sample_id"].iloc[1]]
    read = [_read_fcs(cohort / f"{sid}.fcs") for sid in sample_ids]
    fcs = read[0][0]
    events = np.concatenate([e for _, e in read])
    fields = fcs.text["spillover"].split(",")
    n = int(fields[0])
    spill = np.array(fields[n + 1:], dtype=float).reshape(n, n)
    names = [fcs.text[f"p{i + 1}n"] for i in range(fcs.channel_count)]
    markers = {fcs.text.get(f"p{i + 1}s", ""): i for i in range(fcs.channel_count)}
    fluoro = [names.index(d) for d in fields[1:n + 1]]
    compensated = compensate.compensate(events, spill, fluoro)
    x = np.arcsinh(compensated / 150.0)
    labels = codes["label"].to_numpy()[np.concatenate(
        [np.load(cohort / "truth_events" / f"{sid}.npy") for sid in sample_ids])]

    def separation(marker: str, positive: list[str], negative: list[str]) -> float:
        values = x[:, markers[marker]]
        pos, neg = values[np.isin(labels, positive)], values[np.isin(labels, negative)]
        assert len(pos) >= 10 and len(neg) >= 10
        return (pos.mean() - neg.mean()) / np.sqrt((pos.var() + neg.var()) / 2)

    b = ["b_transitional", "b_naive", "b_unswitched_memory", "b_switched_memory",
         "b_double_negative"]
    assert separation("CD3", ["t_cell"], ["nk_cell", *b]) >= 4
    assert separation("CD19", b, ["t_cell", "nk_cell"]) >= 4
    assert separation("CD20", b, ["t_cell", "nk_cell"]) >= 4
    assert separation("IgD", ["b_naive", "b_unswitched_memory"],
                      ["b_switched_memory", "b_double_negative"]) >= 4
    assert separation("CD27", ["b_unswitched_memory", "b_switched_memory"],
                      ["b_naive", "b_double_negative"]) >= 4
    # The "hi" levels: transitional CD24hi CD38hi well above naive CD24int CD38int.
    assert separation("CD24", ["b_transitional"], ["b_naive"]) >= 4
    assert separation("CD38", ["b_transitional"], ["b_naive"]) >= 4
    # Negative populations sit around 0 after compensation and spread below it.
    t_cd19 = compensated[labels == "t_cell", markers["CD19"]]
    assert abs(np.median(t_cd19)) < 150 and (t_cd19 < 0).mean() > 0.2
    # Doublets: FSC-A/FSC-H well above the singlets'; dead cells: viability bright.
    ratio = events[:, names.index("FSC-A")] / events[:, names.index("FSC-H")]
    singlets = np.isin(labels, ["t_cell", "nk_cell", *b, "monocyte"])
    assert np.median(ratio[labels == "doublet"]) > 1.4 * np.median(ratio[singlets])
    live = x[:, markers["Live/Dead"]]
    assert np.median(live[labels == "dead"]) > np.median(live[singlets]) + 3


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    def digests(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    simulate.simulate_cohort(tmp_path / "a", seed=11, events_per_file=1000, scrna=False)
    simulate.simulate_cohort(tmp_path / "b", seed=11, events_per_file=1000, scrna=False)
    simulate.simulate_cohort(tmp_path / "c", seed=12, events_per_file=1000, scrna=False)
    first, second, third = (digests(tmp_path / name) for name in "abc")
    assert first == second
    assert len(first) == 55 * 2 + 4
    fcs = [name for name in first if name.endswith(".fcs")]
    assert all(first[name] != third[name] for name in fcs)


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
