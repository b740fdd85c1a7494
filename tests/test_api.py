"""The public Python API (``bcellmap.flow``, ``tl``, ``cohort``, ``pl``).

The tutorial (``docs/tutorial.py``) runs as written on a small simulated cohort; its results
are checked against the simulator's truth (not against bcellmap itself), and every step is
checked against the workflow's command for that step (``bcellmap.cli.main``) on the same
data: the API must give what the workflow gives.
"""

from __future__ import annotations

import logging
import runpy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bcellmap as bl
from bcellmap.cli import main
from bcellmap.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ("transitional", "naive", "unswitched_memory", "switched_memory", "double_negative",
           "plasmablast")
ANNOTATION = ("cell_type", "lymphocyte", "b_subset", "cd19_pos", "cd20_pos",
              "metacluster_cell_type")


@pytest.fixture(scope="module")
def tutorial():
    """The tutorial's namespace after running it (simulation included)."""
    logger = logging.getLogger("bcellmap")
    level = logger.level
    namespace = runpy.run_path(str(ROOT / "docs" / "tutorial.py"), run_name="tutorial")
    logger.setLevel(level)  # the tutorial quiets bcellmap's log; give it back
    yield namespace
    import matplotlib.pyplot as plt

    plt.close("all")
    shutil.rmtree(namespace["workdir"], ignore_errors=True)


@pytest.fixture(scope="module")
def truth(tutorial):
    demo = tutorial["workdir"] / "demo"
    return (pd.read_csv(demo / "truth_samples.tsv", sep="\t").set_index("sample_id"),
            pd.read_csv(demo / "truth_patients.tsv", sep="\t").set_index("patient_id"))


def _cli(*argv: object) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def _text(series: pd.Series) -> np.ndarray:
    return series.astype(object).where(series.notna(), "").astype(str).to_numpy()


def _assert_tables_equal(got: pd.DataFrame, want: pd.DataFrame, *, rtol: float = 0.0) -> None:
    """Same columns and rows; numbers equal (within ``rtol``), text equal (empty = missing)."""
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for column in want.columns:
        a, b = got[column], want[column]
        a_num, b_num = pd.to_numeric(a, errors="coerce"), pd.to_numeric(b, errors="coerce")
        numeric = (a_num.notna() | a.isna()).all() and (b_num.notna() | b.isna()).all() \
            and not (a.dtype == bool or b.dtype == bool)
        if numeric and (a_num.notna().any() or b_num.notna().any()):
            np.testing.assert_allclose(a_num.to_numpy(float), b_num.to_numpy(float), rtol=rtol,
                                       equal_nan=True, err_msg=column)
        else:
            assert list(_text(a)) == list(_text(b)), column


# --------------------------------------------------------------------------- against the truth


def test_depletion_and_reconstitution_days_equal_truth(tutorial, truth):
    _, patients = truth
    kinetics = tutorial["kinetics"]
    b = kinetics[(kinetics["measure"] == "b") & (kinetics["modality"] == "flow")]
    b = b.set_index("patient_id")
    assert sorted(b.index) == sorted(patients.index)
    for patient, expected in patients.iterrows():
        got = b.loc[patient]
        assert got["depletion_day"] == expected["depletion_day"], patient
        if bool(expected["censored"]):
            assert bool(got["censored"]) and pd.isna(got["reconstitution_day"]), patient
        else:
            assert not bool(got["censored"]), patient
            assert got["reconstitution_day"] == expected["reconstitution_day"], patient


def test_b_cell_frequencies_near_truth(tutorial, truth):
    samples_truth, _ = truth
    table = tutorial["samples"].set_index("sample_id")
    assert sorted(table.index) == sorted(samples_truth.index)
    for sample_id, expected in samples_truth.iterrows():
        got, want = table.loc[sample_id, "b_pct_lymphocytes"], expected["b_pct_lymphocytes"]
        if want < 0.5:  # a handful of events in a 5,000-event file
            assert abs(got - want) <= 0.15, (sample_id, got, want)
        else:
            assert abs(got - want) <= 0.10 * want, (sample_id, got, want)


def test_subset_frequencies_near_truth_where_b_cells_suffice(tutorial, truth):
    samples_truth, _ = truth
    table = tutorial["samples"].set_index("sample_id")
    enough = samples_truth[samples_truth["b_cells"] >= 200]
    assert len(enough) >= 10
    for sample_id, expected in enough.iterrows():
        for subset in SUBSETS:
            got, want = table.loc[sample_id, f"{subset}_pct_b"], expected[f"{subset}_pct_b"]
            assert abs(got - want) <= 5.0, (sample_id, subset, got, want)


def test_only_the_masking_patient_is_flagged_for_cd19_cd20_discordance(tutorial, truth):
    _, patients = truth
    kinetics = tutorial["kinetics"]
    flagged = {p for p, f in zip(kinetics["patient_id"], kinetics["flags"].fillna(""),
                                 strict=True) if "cd19_cd20_discordance" in f.split(";")}
    assert flagged == set(patients.index[patients["masking"].astype(bool)])


def test_cohort_summary_counts_every_patient(tutorial, truth):
    _, patients = truth
    summary = tutorial["summary"]
    rows = summary[(summary["statistic"] == "patients") & (summary["measure"] == "b")]
    assert int(rows["value"].sum()) == len(patients)


# --------------------------------------------------------------------------- against the workflow


@pytest.fixture(scope="module")
def workflow(tutorial, tmp_path_factory):
    """The workflow's cohort-wide commands on the tutorial's samples: ``train-flow`` on the
    ingested samples, ``thresholds`` on their QC-passed events (the mapped files)."""
    folder = tmp_path_factory.mktemp("workflow")
    (folder / "flow").mkdir()
    (folder / "mapped").mkdir()
    flow_paths, mapped_paths = [], []
    for sample_id, adata in tutorial["adatas"].items():
        flow_paths.append(folder / "flow" / f"{sample_id}.h5ad")
        adata.write_h5ad(flow_paths[-1])
        mapped_paths.append(folder / "mapped" / f"{sample_id}.h5ad")
        adata[adata.obs["qc_pass"].to_numpy()].copy().write_h5ad(mapped_paths[-1])
    _cli("train-flow", "--inputs", *flow_paths, "--model", folder / "som.npz",
         "--info", folder / "som.json")
    _cli("thresholds", "--samples", tutorial["sheet_path"], "--inputs", *mapped_paths,
         "--out", folder / "thresholds.tsv", "--gates", folder / "gates.tsv")
    return folder


def _some_samples(tutorial) -> list[str]:
    """A baseline, an aplastic and a reconstituted visit."""
    sheet = tutorial["sheet"]
    return [sheet.index[0], "P01_v04_d28", "P02_v08_d150"]


def test_ingest_steps_equal_ingest_and_the_ingest_flow_command(tutorial, tmp_path):
    sample_id = tutorial["sheet"].index[1]
    path = tutorial["sheet"].loc[sample_id, "path"]
    api = tutorial["adatas"][sample_id]
    steps = bl.flow.read_fcs(path, sample_id=sample_id)
    bl.flow.compensate(steps)
    bl.flow.transform(steps)
    bl.flow.qc(steps)
    _cli("ingest-flow", "--samples", tutorial["sheet_path"], "--sample-id", sample_id,
         "--out", tmp_path / "flow.h5ad", "--qc", tmp_path / "qc.tsv")
    import anndata as ad

    command = ad.read_h5ad(tmp_path / "flow.h5ad")
    qc_columns = [c for c in command.obs.columns if c.startswith("qc_") or c == "event_index"]
    for other in (api, steps):
        np.testing.assert_array_equal(other.X, command.X)
        assert other.X.dtype == command.X.dtype
        if "compensated" in command.layers:
            np.testing.assert_array_equal(other.layers["compensated"],
                                          command.layers["compensated"])
        pd.testing.assert_frame_equal(other.obs[qc_columns], command.obs[qc_columns])
        columns = list(command.var.columns)
        pd.testing.assert_frame_equal(other.var[columns].astype(str), command.var.astype(str))
        assert other.uns["qc"]["table"]["events_out"] == list(command.uns["qc"]["table"]
                                                               ["events_out"])
        assert other.uns["compensation"]["channels"] == list(
            command.uns["compensation"]["channels"])
        assert list(other.uns["transform"]["parameters"]) == list(
            command.uns["transform"]["parameters"])
    qc = pd.read_csv(tmp_path / "qc.tsv", sep="\t")
    assert qc["events_removed"].tolist() == list(api.uns["qc"]["table"]["events_removed"])


def test_compensate_with_the_files_matrix_given_equals_the_keyword(tutorial):
    path = tutorial["sheet"]["path"].iloc[0]
    keyword = bl.flow.read_fcs(path)
    given = bl.flow.read_fcs(path)
    spillover = given.uns["spillover"]
    matrix = pd.DataFrame(spillover["matrix"], columns=spillover["channels"])
    bl.flow.compensate(keyword)
    bl.flow.compensate(given, spillover=matrix)
    np.testing.assert_allclose(given.X, keyword.X, rtol=1e-12)
    assert given.uns["compensation"]["source"] == "given"
    assert given.uns["bcellmap"]["compensate"]["params"]["spillover_given"] is True


def test_train_som_equals_the_train_flow_command(tutorial, workflow):
    from bcellmap.flow.cluster import load_model

    command = load_model(workflow / "som.npz")
    model = tutorial["model"]
    assert model["markers"] == command["markers"]
    np.testing.assert_array_equal(model["codes"], command["codes"])
    np.testing.assert_array_equal(model["node_metacluster"], command["node_metacluster"])
    for adata in tutorial["adatas"].values():
        assert adata.uns["som"] is model


def test_map_som_equals_the_map_flow_command(tutorial, workflow, tmp_path):
    import anndata as ad

    for sample_id in _some_samples(tutorial):
        _cli("map-flow", "--input", workflow / "flow" / f"{sample_id}.h5ad", "--model",
             workflow / "som.npz", "--out", tmp_path / f"{sample_id}.h5ad")
        command = ad.read_h5ad(tmp_path / f"{sample_id}.h5ad")
        adata = tutorial["adatas"][sample_id]
        passed = adata.obs["qc_pass"].to_numpy()
        for column in ("som_node", "metacluster"):
            np.testing.assert_array_equal(adata.obs[column].to_numpy()[passed],
                                          command.obs[column].to_numpy())
            assert (adata.obs[column].to_numpy()[~passed] == -1).all()
        # From the NPZ the workflow wrote, too.
        again = bl.tl.map_som(adata, model=workflow / "som.npz", copy=True)
        np.testing.assert_array_equal(again.obs["som_node"], adata.obs["som_node"])


def test_gate_equals_the_thresholds_command(tutorial, workflow):
    from bcellmap.flow.thresholds import read_thresholds

    thresholds, gates = tutorial["thresholds"], tutorial["gates"]
    # The TSVs hold the decimals pandas writes (about 15 places): equal to those.
    _assert_tables_equal(thresholds, read_thresholds(workflow / "thresholds.tsv"), rtol=1e-11)
    _assert_tables_equal(gates, read_thresholds(
        workflow / "gates.tsv", required=("sample_id", "marker", "level", "threshold")),
        rtol=1e-11)


def test_annotate_equals_the_annotate_command(tutorial, workflow, tmp_path):
    import anndata as ad

    for sample_id in _some_samples(tutorial):
        _cli("annotate", "--samples", tutorial["sheet_path"], "--sample-id", sample_id,
             "--input", workflow / "mapped" / f"{sample_id}.h5ad",
             "--thresholds", workflow / "thresholds.tsv", "--gates", workflow / "gates.tsv",
             "--out", tmp_path / f"{sample_id}.h5ad", "--counts", tmp_path / f"{sample_id}.tsv",
             "--lineage-qc", tmp_path / f"{sample_id}.lineage.tsv")
        command = ad.read_h5ad(tmp_path / f"{sample_id}.h5ad")
        adata = tutorial["adatas"][sample_id]
        passed = adata.obs["qc_pass"].to_numpy()
        for column in ANNOTATION:
            assert list(adata.obs[column].to_numpy()[passed]) == list(
                command.obs[column].to_numpy()), (sample_id, column)
        assert set(adata.obs.loc[~passed, "cell_type"]) <= {""}
        counts = pd.read_csv(tmp_path / f"{sample_id}.tsv", sep="\t")
        _assert_tables_equal(pd.DataFrame([adata.uns["counts"]])[counts.columns], counts,
                             rtol=1e-11)
        lineage = pd.read_csv(tmp_path / f"{sample_id}.lineage.tsv", sep="\t")
        _assert_tables_equal(pd.DataFrame([adata.uns["lineage_qc"]])[lineage.columns], lineage,
                             rtol=1e-5)
        _assert_tables_equal(adata.uns["metacluster_phenotypes"],
                             command.uns["metacluster_phenotypes"])


def test_quantify_and_kinetics_equal_the_commands(tutorial, tmp_path):
    counts = []
    for sample_id, adata in tutorial["adatas"].items():
        counts.append(tmp_path / f"{sample_id}.tsv")
        pd.DataFrame([adata.uns["counts"]]).to_csv(counts[-1], sep="\t", index=False)
    _cli("quantify", "--samples", tutorial["sheet_path"], "--inputs", *counts,
         "--out", tmp_path / "samples.tsv")
    _cli("kinetics", "--table", tmp_path / "samples.tsv", "--out", tmp_path / "kinetics.tsv",
         "--cohort", tmp_path / "cohort.tsv")
    samples = pd.read_csv(tmp_path / "samples.tsv", sep="\t")
    _assert_tables_equal(tutorial["samples"], samples, rtol=1e-9)
    kinetics = pd.read_csv(tmp_path / "kinetics.tsv", sep="\t")
    _assert_tables_equal(tutorial["kinetics"], kinetics, rtol=1e-8)
    cohort = pd.read_csv(tmp_path / "cohort.tsv", sep="\t")
    _assert_tables_equal(tutorial["summary"], cohort, rtol=1e-8)
    # The API reads the samples.tsv the workflow wrote, too.
    _assert_tables_equal(bl.cohort.kinetics(tmp_path / "samples.tsv"), kinetics, rtol=1e-8)


def test_quantify_without_a_sheet_reads_the_samples_metadata(tutorial):
    _assert_tables_equal(bl.cohort.quantify(tutorial["adatas"]), tutorial["samples"],
                         rtol=1e-12)


# --------------------------------------------------------------------------- AnnData conventions


def test_annotated_sample_round_trips_through_h5ad_and_reannotates(tutorial, tmp_path):
    import anndata as ad

    sample_id = _some_samples(tutorial)[2]
    adata = tutorial["adatas"][sample_id]
    adata.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    again = bl.tl.annotate(back, copy=True)  # the gates stored by gate() in uns
    for column in ANNOTATION:
        assert list(again.obs[column]) == list(adata.obs[column]), column
    ledger = back.uns["bcellmap"]
    assert {"ingest", "train_som", "map_som", "gate", "annotate"} <= set(ledger)
    assert all(entry["version"] == bl.__version__ for entry in ledger.values())
    assert "obs" not in str(back.uns["bcellmap"]["annotate"]["params"])  # settings, not data


def test_copy_leaves_the_input_alone(tutorial):
    path = tutorial["sheet"]["path"].iloc[0]
    adata = bl.flow.read_fcs(path)
    before = adata.X.copy()
    assert bl.flow.compensate(adata) is None
    transformed = bl.flow.transform(adata, copy=True)
    assert transformed is not adata and "transform" in transformed.uns
    assert "transform" not in adata.uns
    assert not np.array_equal(adata.X, before)  # compensated in place
    with pytest.raises(InputError, match="already transformed"):
        bl.flow.transform(transformed)
    transformed_qc = bl.flow.qc(transformed, copy=True)
    assert "qc_pass" in transformed_qc.obs and "qc_pass" not in transformed.obs


def test_keyword_settings_override_the_defaults_and_are_recorded(tutorial):
    path = tutorial["sheet"]["path"].iloc[0]
    adata = bl.flow.read_fcs(path)
    bl.flow.transform(adata, cofactor=500.0)
    parameters = adata.uns["transform"]["parameters"]
    assert any('"cofactor": 500.0' in p for p in parameters)
    assert adata.uns["bcellmap"]["transform"]["params"]["settings"]["cofactor"] == 500.0
    with pytest.raises(InputError, match="cofactor"):
        bl.flow.transform(bl.flow.read_fcs(path), cofactor=-1.0)


# --------------------------------------------------------------------------- the kernels


@pytest.fixture(scope="module")
def blobs():
    import anndata as ad

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=6.0, size=(4, 6))
    values = np.concatenate([c + rng.normal(size=(150, 6)) for c in centres])
    return ad.AnnData(values.astype(np.float32))


def test_neighbors_and_leiden_equal_the_kernel(blobs):
    from bcellmap.kernels.backend import get_backend
    from bcellmap.kernels.leiden import cluster_leiden

    adata = blobs.copy()
    bl.tl.neighbors(adata, n_neighbors=10, seed=3, device="cpu")
    bl.tl.leiden(adata, resolution=0.5, seed=3)
    labels = cluster_leiden(blobs.X, k=10, resolution=0.5, seed=3,
                            backend=get_backend(device="cpu"))
    assert adata.obs["leiden"].astype(int).tolist() == labels.tolist()
    assert adata.obsp["connectivities"].shape == (600, 600)
    assert adata.obsp["distances"].nnz == 600 * 9
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 10


def test_kmeans_and_pca_equal_the_kernels(blobs):
    from bcellmap.kernels.backend import get_backend
    from bcellmap.kernels.kmeans import kmeans
    from bcellmap.kernels.pca import pca

    backend = get_backend(device="cpu")
    adata = bl.tl.kmeans(blobs, n_clusters=4, seed=5, device="cpu", use_rep="X", copy=True)
    result = kmeans(blobs.X, n_clusters=4, seed=5, backend=backend)
    assert adata.obs["kmeans"].astype(int).tolist() == result.labels.tolist()
    assert adata.uns["kmeans"]["inertia"] == pytest.approx(result.inertia)
    bl.tl.pca(adata, n_comps=3, device="cpu")
    np.testing.assert_allclose(adata.obsm["X_pca"],
                               pca(blobs.X, n_components=3, backend=backend).scores)


# --------------------------------------------------------------------------- figures


def test_every_figure_draws_from_the_api_objects(tutorial):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    samples, kinetics, adatas = tutorial["samples"], tutorial["kinetics"], tutorial["adatas"]
    assert isinstance(tutorial["figure"], Figure)
    figures = [
        bl.pl.cohort_trajectories(samples, kinetics=kinetics),
        bl.pl.swimmer(samples, kinetics=kinetics),
        bl.pl.kaplan_meier(samples, kinetics=kinetics),
        bl.pl.composition_visits(samples),
        bl.pl.composition_baseline_vs_reconstitution(samples, kinetics=kinetics),
        bl.pl.flags(samples, kinetics=kinetics),
        bl.pl.qc_removed(adatas),
        bl.pl.gates(adatas, patient_id="P02"),
        bl.pl.cluster_heatmap(adatas),
    ]
    try:
        for figure in figures:
            assert isinstance(figure, Figure) and figure.axes
        gates = figures[7]
        assert any(str(a.get_gid()).startswith("gate:P02_") for ax in gates.axes
                   for a in ax.get_children())
    finally:
        for figure in figures:
            plt.close(figure)


def test_config_mappings_files_and_keywords_agree(tutorial, tmp_path):
    from bcellmap.errors import ConfigError

    samples = tutorial["samples"]
    by_keyword = bl.cohort.kinetics(samples, reconstitution_per_ul=20.0)
    by_mapping = bl.cohort.kinetics(samples, config={"kinetics": {"reconstitution":
                                                                  {"per_ul": 20.0}}})
    (tmp_path / "my.yaml").write_text("kinetics:\n  reconstitution:\n    per_ul: 20.0\n")
    by_file = bl.cohort.kinetics(samples, config=tmp_path / "my.yaml")
    _assert_tables_equal(by_mapping, by_keyword)
    _assert_tables_equal(by_file, by_keyword)
    assert (by_keyword["reconstitution_threshold"][by_keyword["unit"] == "cells_per_ul"]
            == 20.0).all()
    with pytest.raises(ConfigError, match="did you mean"):
        bl.cohort.kinetics(samples, config={"kinetcs": {}})
    with pytest.raises(ConfigError, match="rlen"):
        bl.tl.train_som(tutorial["adatas"], rlen="ten")
