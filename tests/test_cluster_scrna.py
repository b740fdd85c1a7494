"""scRNA clustering: parity with scanpy on the same data, bounded training, label transfer,
cohort protein gates."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

from bcellmap.cli import main
from bcellmap.config import load_config
from bcellmap.demo.simulate_scrna import simulate_scrna_visits
from bcellmap.kernels.backend import get_backend
from bcellmap.scrna.annotate import PROTEIN_THRESHOLD_COLUMNS, read_protein_thresholds
from bcellmap.scrna.cluster import cluster_scaled, learn_scrna_protein_thresholds, map_scrna
from bcellmap.scrna.ingest import ingest_scrna


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    out = tmp_path_factory.mktemp("scrna_cluster")
    rows = simulate_scrna_visits(out, patients=["P01"], seed=5, cells_per_sample=1000,
                                 n_genes=700, days=(-7, 150), write_10x_h5=False)
    config = load_config()
    paths = []
    for row in rows:
        adata, _ = ingest_scrna(out / row["path"], config=config, sample=row)
        path = out / f"{row['sample_id']}.ingested.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return out, rows, paths


def test_pca_and_leiden_agree_with_scanpy_on_the_same_data(ingested):
    _, _, paths = ingested
    adata = ad.read_h5ad(paths[0])
    adata = adata[adata.obs["qc_pass"].to_numpy()].copy()
    sc.pp.scale(adata)
    scaled = np.asarray(adata.X, dtype=np.float64)
    backend = get_backend(device="cpu")
    # Resolution 0.5: at 1.0 Leiden splits the homogeneous simulated T cells arbitrarily and
    # scanpy disagrees with itself across seeds (ARI ~0.65-0.92), which is no test of parity.
    fitted, labels = cluster_scaled(scaled, n_pcs=30, k=15, resolution=0.5, seed=0,
                                    backend=backend)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    sc.pp.neighbors(adata, n_neighbors=15, n_pcs=30, random_state=0)
    sc.tl.leiden(adata, resolution=0.5, flavor="igraph", n_iterations=-1, directed=False,
                 random_state=0)
    ours = fitted.explained_variance_ratio.sum()
    theirs = adata.uns["pca"]["variance_ratio"].sum()
    assert abs(ours - theirs) <= 0.01 * theirs
    assert adjusted_rand_score(adata.obs["leiden"], labels) >= 0.9


def _purity(clusters: np.ndarray, truth: np.ndarray) -> float:
    """Share of cells whose cluster's majority truth label is their own."""
    frame = pd.DataFrame({"c": clusters, "t": truth})
    majority = frame.groupby("c")["t"].agg(lambda s: s.value_counts().index[0])
    return float((majority.reindex(frame["c"]).to_numpy() == frame["t"].to_numpy()).mean())


def test_cli_train_is_bounded_and_map_labels_every_cell_by_type(ingested, tmp_path):
    out, rows, paths = ingested
    config = tmp_path / "config.yaml"
    config.write_text("device: cpu\nscrna:\n  cluster:\n    cells_per_sample: 400\n")
    model, info = tmp_path / "model.npz", tmp_path / "model.json"
    gates = tmp_path / "gates.tsv"
    assert main(["train-scrna", "--config", str(config), "--inputs", *map(str, paths),
                 "--model", str(model), "--info", str(info), "--protein-thresholds",
                 str(gates)]) == 0
    summary = json.loads(info.read_text())
    assert all(n <= 400 for n in summary["samples"].values())
    assert summary["cells"] == sum(summary["samples"].values())
    # No CITE-seq sample: an empty gates table (annotate then has nothing to gate).
    table = read_protein_thresholds(gates)
    assert table.empty and list(table.columns) == list(PROTEIN_THRESHOLD_COLUMNS)
    assert summary["protein_gates"] == {} and summary["protein_gate_flags"] == []
    for row, path in zip(rows, paths, strict=True):
        mapped_path = tmp_path / f"{row['sample_id']}.mapped.h5ad"
        assert main(["map-scrna", "--config", str(config), "--input", str(path),
                     "--model", str(model), "--out", str(mapped_path)]) == 0
        mapped = ad.read_h5ad(mapped_path)
        source = ad.read_h5ad(path)
        assert mapped.n_obs == source.obs["qc_pass"].sum()  # every QC-passed cell, not a sample
        truth = pd.read_csv(out / f"{row['sample_id']}.truth.tsv", sep="\t",
                            keep_default_na=False)["cell_type"].to_numpy()
        truth = truth[mapped.obs["event_index"].to_numpy()]
        singlet = ~np.isin(truth, ["doublet", "low_quality"])
        assert _purity(mapped.obs["leiden"].to_numpy()[singlet], truth[singlet]) >= 0.97


def test_sample_without_qc_passed_cells_maps_to_an_empty_anndata(ingested):
    _, _, paths = ingested
    adata = ad.read_h5ad(paths[0])
    config = load_config()
    config["scrna"]["cluster"]["cells_per_sample"] = 200
    from bcellmap.scrna.cluster import train_scrna

    backend = get_backend(device="cpu")
    model, _ = train_scrna(paths[:1], config=config, backend=backend)
    adata.obs["qc_pass"] = False
    mapped = map_scrna(adata, model, config=config, backend=backend)
    assert mapped.n_obs == 0 and "leiden" in mapped.obs


def test_protein_gates_fall_back_to_the_rna_b_call_without_cd19_cd20_protein(ingested,
                                                                              tmp_path):
    """A panel without CD19/CD20 protein: the subset gates are learned on RNA-called B cells."""
    out, rows, paths = ingested
    adata = ad.read_h5ad(paths[0])
    truth = pd.read_csv(out / f"{rows[0]['sample_id']}.truth.tsv", sep="\t",
                        keep_default_na=False)
    rng = np.random.default_rng(0)
    is_t = truth["cell_type"].eq("T").to_numpy()
    igd_pos = truth["b_subset"].isin(["transitional", "naive", "unswitched_memory"]).to_numpy()
    noise = rng.normal(0, 0.15, size=(adata.n_obs, 2))
    adata.obsm["protein"] = np.column_stack([np.where(is_t, 2.0, 0.3),
                                             np.where(igd_pos, 1.6, 0.3)]) + noise
    adata.uns["protein_names"] = ["CD3", "IgD"]
    path = tmp_path / "cd3_igd_only.h5ad"
    adata.write_h5ad(path)
    config = load_config()
    config["scrna"]["protein"]["cells_per_sample"] = 600
    gates = learn_scrna_protein_thresholds([path], config=config).set_index("marker")
    assert gates.loc["CD3", "n_events"] == 600 and gates.loc["CD3", "method"] == "valley"
    igd = gates.loc["IgD"]
    assert igd["parent"] == "CD20+ B" and igd["method"] == "valley" and igd["flag"] == ""
    assert 0.6 < igd["threshold"] < 1.3
    # The parent is the RNA B call of the pooled cells: about the B share of 600 cells.
    share_b = truth["cell_type"].eq("B").to_numpy()[adata.obs["qc_pass"].to_numpy()].mean()
    assert abs(igd["n_events"] - share_b * 600) <= 0.1 * share_b * 600


def test_alignment_and_scaling_of_sample_blocks_against_dense_truth():
    import scipy.sparse as sp

    from bcellmap.scrna.cluster import _align, _mean_scale, _scale_columns_inplace

    rng = np.random.default_rng(3)
    genes = np.array(["g0", "g1", "g2", "g3", "g4"], dtype=object)
    # Sample A holds the genes in another order plus one the model lacks; sample B lacks g2.
    a_genes = np.array(["g3", "x", "g0", "g4", "g2", "g1"], dtype=object)
    b_genes = np.array(["g0", "g1", "g3", "g4"], dtype=object)
    a_dense = rng.poisson(1.0, (7, 6)).astype(np.float32)
    b_dense = rng.poisson(1.0, (4, 4)).astype(np.float32)
    expected_a = np.zeros((7, 5), dtype=np.float32)
    for j, g in enumerate(a_genes):
        if g in genes:
            expected_a[:, list(genes).index(g)] = a_dense[:, j]
    expected_b = np.zeros((4, 5), dtype=np.float32)
    for j, g in enumerate(b_genes):
        expected_b[:, list(genes).index(g)] = b_dense[:, j]
    aligned = [_align(sp.csr_matrix(a_dense), a_genes, genes),
               _align(sp.csr_matrix(b_dense), b_genes, genes)]
    np.testing.assert_array_equal(aligned[0].toarray(), expected_a)
    np.testing.assert_array_equal(aligned[1].toarray(), expected_b)
    assert aligned[0].has_sorted_indices
    same = sp.csr_matrix(expected_a)
    assert _align(same, genes, genes) is same

    stacked = np.vstack([expected_a, expected_b]).astype(np.float64)
    mean, scale = _mean_scale(aligned)
    np.testing.assert_allclose(mean, stacked.mean(axis=0), rtol=1e-12)
    truth_scale = stacked.std(axis=0, ddof=1)
    truth_scale[truth_scale == 0] = 1.0
    np.testing.assert_allclose(scale, truth_scale, rtol=1e-12)
    for block in aligned:
        _scale_columns_inplace(block, 1.0 / scale)
    np.testing.assert_allclose(sp.vstack(aligned).toarray(), stacked / truth_scale, rtol=1e-6)


def test_training_refuses_files_that_are_not_ingested_samples(ingested, tmp_path):
    from bcellmap.errors import InputError
    from bcellmap.scrna.cluster import train_scrna

    _, _, paths = ingested
    config = load_config()
    backend = get_backend(device="cpu")
    raw = ad.read_h5ad(paths[0])
    del raw.obs["qc_pass"]
    no_qc = tmp_path / "no_qc.h5ad"
    raw.write_h5ad(no_qc)
    with pytest.raises(InputError, match="qc_pass") as refused:
        train_scrna([paths[1], no_qc], config=config, backend=backend)
    assert "no_qc.h5ad" in str(refused.value)
    not_h5 = tmp_path / "notes.h5ad"
    not_h5.write_text("not an HDF5 file")
    with pytest.raises(InputError, match="cannot be read") as unreadable:
        train_scrna([not_h5], config=config, backend=backend)
    assert "notes.h5ad" in str(unreadable.value)
    missing_x = tmp_path / "no_x.h5ad"
    import h5py
    raw.obs["qc_pass"] = True
    raw.write_h5ad(missing_x)
    with h5py.File(missing_x, "a") as handle:
        del handle["X"]
    with pytest.raises(InputError, match="ingested scRNA sample") as broken:
        train_scrna([missing_x], config=config, backend=backend)
    assert "no_x.h5ad" in str(broken.value)
