"""Per-event cell types and B-cell subsets against a labelled synthetic sample."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bcellmap.cli import main
from bcellmap.config import load_config
from bcellmap.errors import ConfigError
from bcellmap.flow.annotate import (
    COUNT_COLUMNS,
    SUBSETS,
    SubsetRule,
    annotate_sample,
    call_events,
    load_subset_rules,
)
from bcellmap.flow.gating import GatingSettings, gates_for_sample, learn_gates
from bcellmap.flow.subsets import builtin_subsets_text, subsets_path, subsets_source

ROOT = Path(__file__).resolve().parents[1]

MARKERS = ["CD3", "CD19", "CD20", "IgD", "CD27", "CD38", "CD24"]
LEVEL_MEAN = {"-": 0.5, "+": 3.5, "h": 6.0}   # negative, positive, bright (transformed)
# Known phenotypes (CD3 CD19 CD20 IgD CD27 CD38 CD24) and event counts per population.
POPULATIONS = {
    "T": ("+---+--", 2000),   # most blood T cells are CD27+
    "other": ("-------", 1000),
    "naive": ("-+++-++", 1500),
    "transitional": ("-+++-hh", 300),
    "unswitched_memory": ("-++++-h", 300),
    "switched_memory": ("-++-+-h", 400),
    "double_negative": ("-++---+", 300),
    "plasmablast": ("-+--hh-", 200),
}


def _labelled_sample(rng: np.random.Generator, *, scale: float = 1.0) -> ad.AnnData:
    """Events drawn around known levels; obs['truth'] is the population label."""
    blocks, labels = [], []
    for label, (pattern, n) in POPULATIONS.items():
        n = int(n * scale)
        means = np.array([LEVEL_MEAN[c] for c in pattern])
        blocks.append(rng.normal(means, 0.35, size=(n, len(MARKERS))))
        labels += [label] * n
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32),
                       var=pd.DataFrame({"canonical": MARKERS}, index=MARKERS))
    adata.obs["truth"] = labels
    codes = {name: i for i, name in enumerate(POPULATIONS)}
    adata.obs["metacluster"] = [codes[x] for x in labels]
    adata.obs["event_index"] = np.arange(adata.n_obs)
    adata.uns["source"] = {"n_events": adata.n_obs + 123}
    return adata


@pytest.fixture(scope="module")
def learned():
    rng = np.random.default_rng(21)
    config = load_config()
    cohort = {f"s{i}": _labelled_sample(rng) for i in range(3)}
    cohort["x"] = _labelled_sample(rng)
    rules = load_subset_rules(config)
    _, gates = learn_gates(cohort, pos_markers=MARKERS, hi_markers=["CD27", "CD38", "CD24"],
                           settings=GatingSettings.from_config(config), seed=0)
    return gates_for_sample(gates, "x")[0], rules, cohort["x"]


def test_subset_calls_reach_95_percent_per_subset(learned):
    thresholds, rules, sample = learned
    annotated, counts = annotate_sample(sample, thresholds, rules, sample_id="x")
    truth = sample.obs["truth"].to_numpy()
    called_type = annotated.obs["cell_type"].to_numpy()
    called_subset = annotated.obs["b_subset"].to_numpy()
    for subset in SUBSETS:
        rows = truth == subset
        assert (called_type[rows] == "B").mean() >= 0.95, subset
        assert (called_subset[rows] == subset).mean() >= 0.95, subset
        precision = (truth[called_subset == subset] == subset).mean()
        assert precision >= 0.95, subset
    assert (called_type[truth == "T"] == "T").mean() >= 0.99
    # No scatter channels: lineage-negative events are NK (the lymphocyte core needs scatter).
    assert (called_type[truth == "other"] == "NK").mean() >= 0.99
    assert (called_subset[~np.isin(truth, SUBSETS)] == "").all()
    # Counts table: the contract's columns, events_total from uns['source'].
    assert list(counts.columns) == list(COUNT_COLUMNS)
    row = counts.iloc[0]
    assert row["events_total"] == sample.n_obs + 123
    assert row["events_qc_pass"] == row["lymphocytes"] == sample.n_obs
    assert abs(row["b_cells"] - 3000) <= 30
    assert abs(row["cd19neg_cd20pos"]) <= 5 and abs(row["cd20_pos"] - 2800) <= 30
    assert row["subsets_not_called"] == ""
    assert list(annotated.obs["event_index"]) == list(range(sample.n_obs))


def test_precedence_plasmablast_and_transitional_first():
    cut = {"pos": 2.0, "hi": 4.75}
    thresholds = {m: dict(cut) for m in MARKERS}
    rules = load_subset_rules(load_config())
    # transitional: IgD+ CD27- (naive by quadrants) but CD24hi CD38hi;
    # plasmablast: CD3- CD19+ CD20- IgD- CD27hi CD38hi (B lineage, would be switched memory).
    events = {"CD3": [0.5, 0.5], "CD19": [3.5, 3.0], "CD20": [3.5, 0.5], "IgD": [3.5, 0.5],
              "CD27": [0.5, 6.0], "CD38": [6.0, 6.0], "CD24": [6.0, 0.5]}
    calls, _ = call_events({k: np.array(v) for k, v in events.items()}, thresholds, rules)
    assert list(calls["cell_type"]) == ["B", "B"]
    assert list(calls["b_subset"]) == ["transitional", "plasmablast"]
    # With the quadrant rules alone, the same events are naive and switched memory.
    quadrants = [r for r in rules if r.name not in ("transitional", "plasmablast")]
    calls, _ = call_events({k: np.array(v) for k, v in events.items()}, thresholds, quadrants)
    assert list(calls["b_subset"]) == ["naive", "switched_memory"]


def test_missing_subset_markers_leave_subsets_empty_and_say_so(learned, caplog):
    thresholds, rules, sample = learned
    full, _ = annotate_sample(sample, thresholds, rules, sample_id="x")
    keep = [m != "CD24" for m in sample.var["canonical"]]
    reduced = sample[:, keep].copy()
    with caplog.at_level(logging.WARNING, logger="bcellmap.flow.annotate"):
        annotated, counts = annotate_sample(reduced, thresholds, rules, sample_id="x")
    assert "transitional" in caplog.text
    row = counts.iloc[0]
    assert row["subsets_not_called"] == "transitional"
    assert pd.isna(row["transitional_count"])
    assert "transitional" not in set(annotated.obs["b_subset"])
    assert annotated.uns["annotate"]["subsets_not_called"] == "transitional"
    # B calls do not depend on the subset markers.
    assert (annotated.obs["cell_type"].to_numpy() == full.obs["cell_type"].to_numpy()).all()
    # Without IgD and CD27 only the CD24/CD38 rule remains.
    lineage_only = sample[:, [m not in ("IgD", "CD27") for m in sample.var["canonical"]]].copy()
    _, counts = annotate_sample(lineage_only, thresholds, rules, sample_id="x")
    assert counts.iloc[0]["subsets_not_called"].split(";") == [
        s for s in SUBSETS if s != "transitional"]
    assert abs(counts.iloc[0]["b_cells"] - 3000) <= 30


def test_cluster_discordant_events_are_counted(learned):
    thresholds, rules, sample = learned
    sample = sample.copy()
    truth = sample.obs["truth"].to_numpy()
    naive_code = list(POPULATIONS).index("naive")
    moved = np.flatnonzero(truth == "T")[:7]
    codes = sample.obs["metacluster"].to_numpy().copy()
    codes[moved] = naive_code  # seven T events placed in the naive B metacluster
    sample.obs["metacluster"] = codes
    annotated, counts = annotate_sample(sample, thresholds, rules, sample_id="x")
    own_vs_truth_errors = int((annotated.obs["cell_type"].to_numpy()
                               != np.where(np.isin(truth, SUBSETS), "B", truth)).sum())
    assert abs(counts.iloc[0]["cluster_discordant_events"] - 7) <= own_vs_truth_errors
    table = annotated.uns["metacluster_phenotypes"].set_index("metacluster")
    assert table.loc[naive_code, "cell_type"] == "B"
    assert table.loc[naive_code, "b_subset"] == "naive"
    assert (annotated.obs["metacluster_cell_type"].to_numpy()[moved] == "B").all()


def test_the_built_in_subset_table_is_read_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the repository: the package's own copy is used
    config = load_config()
    assert config["annotate"]["subsets"] is None and subsets_path(config) is None
    label, text = subsets_source(config)
    assert "built-in" in label
    assert text == resources.files("bcellmap").joinpath("subsets.yaml").read_text()
    rules = load_subset_rules(config)
    assert [r.name for r in rules][:2] == ["plasmablast", "transitional"]
    assert isinstance(rules[0], SubsetRule)
    assert not (ROOT / "config" / "subsets.yaml").exists()  # one copy of the default table


def test_a_user_subset_table_overrides_the_built_in_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(
        "subsets:\n  - name: naive\n    rule: {IgD: pos, CD27: neg}\n")
    config = load_config(overrides={"annotate": {"subsets": "mine.yaml"}})
    assert subsets_path(config) == tmp_path / "mine.yaml"  # relative to the working directory
    assert [(r.name, r.levels) for r in load_subset_rules(config)] == [
        ("naive", {"IgD": "pos", "CD27": "neg"})]


def test_a_missing_user_subset_table_is_a_config_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides={"annotate": {"subsets": "config/subsets.yaml"}})
    with pytest.raises(ConfigError, match=r"annotate\.subsets: .*config/subsets\.yaml does not "
                                          r"exist .*annotate\.subsets: null"):
        load_subset_rules(config)
    adata = _labelled_sample(np.random.default_rng(1), scale=0.1)
    mapped, sheet, thresholds = _write_inputs(tmp_path, adata)
    out = tmp_path / "out.h5ad"
    assert main(["annotate", "--config-json", json.dumps({"annotate": {"subsets": "gone.yaml"}}),
                 "--samples", str(sheet), "--sample-id", "S1", "--input", str(mapped),
                 "--thresholds", str(thresholds), "--gates", str(tmp_path / "gates.tsv"),
                 "--out", str(out), "--counts", str(tmp_path / "counts.tsv")]) == 1
    assert "gone.yaml does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_bcellmap_subsets_prints_the_built_in_table_for_users_to_copy(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["subsets"]) == 0
    assert capsys.readouterr().out == builtin_subsets_text()
    assert main(["subsets", "--out", "my_subsets.yaml"]) == 0
    # The copy, named in the config, gives the built-in rules.
    config = load_config(overrides={"annotate": {"subsets": "my_subsets.yaml"}})
    assert subsets_path(config) == tmp_path / "my_subsets.yaml"
    assert load_subset_rules(config) == load_subset_rules(load_config())


def test_a_user_subset_table_changes_the_annotate_command_calls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "naive_only.yaml").write_text(
        "subsets:\n  - name: naive\n    rule: {IgD: pos, CD27: neg}\n")
    adata = _labelled_sample(np.random.default_rng(1), scale=0.2)
    mapped, sheet, thresholds = _write_inputs(tmp_path, adata)
    counts = tmp_path / "counts.tsv"
    assert main(["annotate", "--config-json",
                 json.dumps({"annotate": {"subsets": "naive_only.yaml"}}),
                 "--samples", str(sheet), "--sample-id", "S1", "--input", str(mapped),
                 "--thresholds", str(thresholds), "--gates", str(tmp_path / "gates.tsv"),
                 "--out", str(tmp_path / "out.h5ad"), "--counts", str(counts)]) == 0
    row = pd.read_csv(counts, sep="\t").iloc[0]
    assert row["naive_count"] > 0 and pd.isna(row["plasmablast_count"])
    assert set(str(row["subsets_not_called"]).split(";")) == set(SUBSETS) - {"naive"}
    assert set(ad.read_h5ad(tmp_path / "out.h5ad").obs["b_subset"]) <= {"", "naive"}


def _write_inputs(tmp_path, adata):
    mapped = tmp_path / "mapped.h5ad"
    adata.write_h5ad(mapped)
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{"sample_id": "S1", "patient_id": "P1", "day": 30, "modality": "flow",
                   "path": "x.fcs"}]).to_csv(sheet, sep="\t", index=False)
    table = pd.DataFrame([("all", m, lv, t, "fixed") for m in MARKERS
                          for lv, t in (("pos", 2.0), ("hi", 4.75))],
                         columns=["group", "marker", "level", "threshold", "method"])
    thresholds = tmp_path / "thresholds.tsv"
    table.to_csv(thresholds, sep="\t", index=False)
    gates = table.drop(columns="group").assign(sample_id="S1", parent="", n_events=0, flag="")
    gates.to_csv(tmp_path / "gates.tsv", sep="\t", index=False)
    return mapped, sheet, thresholds


def test_cli_annotate_writes_h5ad_and_counts(tmp_path):
    adata = _labelled_sample(np.random.default_rng(1), scale=0.2)
    mapped, sheet, thresholds = _write_inputs(tmp_path, adata)
    out, counts = tmp_path / "out.h5ad", tmp_path / "counts.tsv"
    args = ["annotate", "--samples", str(sheet), "--sample-id", "S1", "--input", str(mapped),
            "--thresholds", str(thresholds), "--gates", str(tmp_path / "gates.tsv"),
            "--out", str(out), "--counts", str(counts)]
    assert main(args) == 0
    annotated = ad.read_h5ad(out)
    assert {"cell_type", "b_subset", "metacluster", "metacluster_cell_type"} <= set(
        annotated.obs.columns)
    assert set(annotated.uns["thresholds"]["marker"]) == set(MARKERS)
    table = pd.read_csv(counts, sep="\t")
    assert table.loc[0, "b_cells"] == (annotated.obs["cell_type"] == "B").sum()
    assert abs(table.loc[0, "plasmablast_count"] - 40) <= 2  # 200 x 0.2 simulated


def test_cli_annotate_without_cd3_calls_b_cells_and_flags_the_panel(tmp_path):
    # A B-cell panel without CD3: B cells are CD19+ or CD20+; T and NK are not told apart.
    adata = _labelled_sample(np.random.default_rng(1), scale=0.2)
    truth = adata.obs["truth"].to_numpy()
    adata = adata[:, [m != "CD3" for m in adata.var["canonical"]]].copy()
    mapped, sheet, thresholds = _write_inputs(tmp_path, adata)
    out, counts = tmp_path / "out.h5ad", tmp_path / "counts.tsv"
    args = ["annotate", "--samples", str(sheet), "--sample-id", "S1", "--input", str(mapped),
            "--thresholds", str(thresholds), "--gates", str(tmp_path / "gates.tsv"),
            "--out", str(out), "--counts", str(counts)]
    assert main(args) == 0
    row = pd.read_csv(counts, sep="\t").iloc[0]
    assert abs(row["b_cells"] - np.isin(truth, SUBSETS).sum()) <= 3
    assert pd.isna(row["t_cells"]) and pd.isna(row["nk_cells"])
    assert "no_cd3_in_panel" in row["sample_flags"].split(";")
    called = ad.read_h5ad(out).obs["cell_type"].to_numpy()
    assert set(called[truth == "T"]) == {"lymphocyte_unresolved"}


def test_cli_annotate_without_cd19_and_cd20_fails_and_writes_nothing(tmp_path):
    adata = _labelled_sample(np.random.default_rng(1), scale=0.1)
    adata = adata[:, [m not in ("CD19", "CD20") for m in adata.var["canonical"]]].copy()
    mapped, sheet, thresholds = _write_inputs(tmp_path, adata)
    out, counts = tmp_path / "out.h5ad", tmp_path / "counts.tsv"
    args = ["annotate", "--samples", str(sheet), "--sample-id", "S1", "--input", str(mapped),
            "--thresholds", str(thresholds), "--gates", str(tmp_path / "gates.tsv"),
            "--out", str(out), "--counts", str(counts)]
    assert main(args) == 1
    assert not out.exists() and not counts.exists()


def test_empty_sample_is_valid():
    adata = _labelled_sample(np.random.default_rng(1), scale=0.1)[:0].copy()
    thresholds = {m: {"pos": 2.0, "hi": 4.75} for m in MARKERS}
    annotated, counts = annotate_sample(adata, thresholds, load_subset_rules(load_config()),
                                        sample_id="e")
    assert annotated.n_obs == 0
    assert counts.iloc[0]["b_cells"] == 0 and counts.iloc[0]["lymphocytes"] == 0


def test_a_marker_without_a_threshold_is_not_measured_rather_than_zero(learned):
    # CD19 on the panel but no usable threshold (too few events to learn one): B cells are
    # still called from CD20, and CD19 counts are empty, never a false "all CD19-negative"
    # that would fake CD19 loss.
    thresholds, rules, sample = learned
    without_cd19 = {m: dict(levels) for m, levels in thresholds.items()}
    without_cd19["CD19"]["pos"] = float("nan")
    _, counts = annotate_sample(sample, without_cd19, rules, sample_id="x")
    row = counts.iloc[0]
    assert row["b_cells"] > 0
    assert pd.isna(row["cd19_pos"]) and pd.isna(row["cd19neg_cd20pos"])
    assert row["cd20_pos"] > 0


def test_implausible_results_are_flagged_in_the_counts(learned):
    thresholds, rules, sample = learned
    _, counts = annotate_sample(sample, thresholds, rules, sample_id="x", day=-3)
    assert counts.iloc[0]["sample_flags"] == ""  # a healthy-looking baseline
    # Values compensated and transformed twice: every lineage marker squashed near 0.
    squashed = sample.copy()
    squashed.X = squashed.X * 0.01
    _, counts = annotate_sample(squashed, thresholds, rules, sample_id="x", day=-3)
    flags = counts.iloc[0]["sample_flags"].split(";")
    assert "compressed_values" in flags
    # A baseline whose CD3 gate finds no T cells, and one without B cells.
    no_t = sample[sample.obs["truth"] != "T"].copy()
    _, counts = annotate_sample(no_t, thresholds, rules, sample_id="x", day=-3)
    assert "few_t_cells_at_baseline" in counts.iloc[0]["sample_flags"].split(";")
    no_b = sample[~sample.obs["truth"].isin(SUBSETS)].copy()
    _, counts = annotate_sample(no_b, thresholds, rules, sample_id="x", day=-3)
    assert "few_b_cells_at_baseline" in counts.iloc[0]["sample_flags"].split(";")
    # The same sample after infusion (day 30) is aplasia, not implausible.
    _, counts = annotate_sample(no_b, thresholds, rules, sample_id="x", day=30)
    assert counts.iloc[0]["sample_flags"] == ""
