"""scRNA ingest: readers, refusal of non-count input, CITE-seq CLR, QC against the truth."""

from __future__ import annotations

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from bcellmap.cli import main
from bcellmap.config import load_config
from bcellmap.errors import InputError
from bcellmap.ingest_scrna import clr_normalise, ingest_scrna, read_scrna, run_qc
from bcellmap.simulate_scrna import simulate_scrna_visits


@pytest.fixture(scope="module")
def visits(tmp_path_factory):
    out = tmp_path_factory.mktemp("scrna_ingest")
    rows = simulate_scrna_visits(out, patients=["P01"], seed=11, cells_per_sample=1200,
                                 n_genes=800, days=(-7, 150))
    return out, rows


def _truth(out, row):
    return pd.read_csv(out / f"{row['sample_id']}.truth.tsv", sep="\t", keep_default_na=False)


def test_clr_matches_hand_computed_seurat_values():
    # Cell [1, 3]: geometric term exp((log 2 + log 4) / 2) = sqrt(8).
    clr = clr_normalise(np.array([[1.0, 3.0], [0.0, 4.0]]), margin="cell")
    expected_first = np.log1p(np.array([1.0, 3.0]) / np.sqrt(8.0))
    np.testing.assert_allclose(clr[0], expected_first, rtol=1e-6)
    # Cell [0, 4]: zeros count in the length but not in the sum: exp(log 5 / 2) = sqrt(5).
    np.testing.assert_allclose(clr[1], np.log1p(np.array([0.0, 4.0]) / np.sqrt(5.0)), rtol=1e-6)
    per_feature = clr_normalise(np.array([[1.0, 3.0], [0.0, 4.0]]), margin="feature")
    np.testing.assert_allclose(per_feature[:, 0], np.log1p(np.array([1.0, 0.0]) / np.sqrt(2.0)),
                               rtol=1e-6)


def test_qc_metrics_and_table_on_a_hand_made_matrix():
    counts = np.array([[300, 200, 100, 0], [10, 5, 0, 0], [100, 0, 0, 400]], dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts),
                       var=pd.DataFrame(index=["A", "B", "C", "MT-CO1"]))
    config = load_config()
    config["scrna"]["qc"].update(min_counts=100, min_genes=2, max_mito_pct=50.0)
    table = run_qc(adata, config=config, sample_id="s1")
    np.testing.assert_allclose(adata.obs["n_counts"], [600, 15, 500])
    np.testing.assert_allclose(adata.obs["pct_mito"], [0.0, 0.0, 80.0])
    assert list(table["step"]) == ["min_counts", "min_genes", "mito", "doublets"]
    assert list(table["events_removed"]) == [1, 0, 1, 0]
    assert list(table["events_out"]) == [2, 2, 1, 1]
    assert "skipped" in table["detail"].iloc[3]  # 1 cell < doublets.min_cells
    assert list(adata.obs["qc_pass"]) == [True, False, False]
    assert list(adata.obs["qc_reason"]) == ["pass", "min_counts", "mito"]


def test_qc_removes_low_quality_cells_and_keeps_singlets(visits):
    out, rows = visits
    row = rows[1]
    adata, table = ingest_scrna(out / row["path"], config=load_config(), sample=row)
    truth = _truth(out, row)
    passed = adata.obs["qc_pass"].to_numpy()
    low = truth["cell_type"].eq("low_quality").to_numpy()
    singlet = ~truth["cell_type"].isin(["low_quality", "doublet"]).to_numpy()
    doublet = truth["cell_type"].eq("doublet").to_numpy()
    assert (~passed[low]).mean() >= 0.95
    assert passed[singlet].mean() >= 0.97
    scores = adata.obs["doublet_score"].to_numpy()
    assert np.nanmean(scores[doublet]) > 2 * np.nanmean(scores[singlet])
    assert table["events_out"].iloc[-1] == passed.sum()
    assert (table["events_in"] - table["events_removed"] == table["events_out"]).all()
    # Raw counts kept, X log-normalised to 10,000 per cell.
    raw = adata.layers["counts"]
    original = ad.read_h5ad(out / row["path"]).X
    assert (raw != original).nnz == 0
    cell = np.flatnonzero(passed)[0]
    np.testing.assert_allclose(np.expm1(adata.X[cell].toarray()).sum(), 1e4, rtol=1e-3)
    assert adata.var["highly_variable"].sum() > 0


def test_cite_seq_protein_is_kept_with_canonical_names(visits):
    out, rows = visits
    adata, _ = ingest_scrna(out / rows[0]["path"], config=load_config(), sample=rows[0])
    assert adata.uns["protein_names"] == ["CD3", "CD19", "CD20", "CD27", "IgD", "CD38", "CD24"]
    assert adata.obsm["protein"].shape == (adata.n_obs, 7)
    assert not adata.var["feature_types"].eq("Antibody Capture").any()
    truth = _truth(out, rows[0])
    is_t = truth["cell_type"].eq("T").to_numpy()
    cd3 = adata.obsm["protein"][:, 0]
    assert cd3[is_t].mean() > cd3[~is_t].mean() + 1.0


def test_mtx_folder_reads_the_same_counts(visits, tmp_path):
    out, rows = visits
    source = ad.read_h5ad(out / rows[1]["path"])
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.csr_matrix(source.X).T.astype(np.int64))
    with gzip.open(folder / "features.tsv.gz", "wt") as handle:
        for gene, gene_id in zip(source.var_names, source.var["gene_ids"], strict=True):
            handle.write(f"{gene_id}\t{gene}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as handle:
        handle.write("\n".join(source.obs_names) + "\n")
    adata = read_scrna(folder)
    assert list(adata.var_names) == list(source.var_names)
    assert (adata.X != source.X).nnz == 0


def test_log_normalised_h5ad_is_refused_unless_configured(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(50, 30)).astype(np.float32)
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    path = tmp_path / "lognorm.h5ad"
    ad.AnnData(sp.csr_matrix(logged)).write_h5ad(path)
    with pytest.raises(InputError, match="log-normalised"):
        read_scrna(path, sample_id="s")
    accepted = read_scrna(path, sample_id="s", input_normalised=True)
    assert accepted.uns["input_normalised"]
    # Counts in layers["counts"] are preferred over a normalised X.
    both = ad.AnnData(sp.csr_matrix(logged), layers={"counts": sp.csr_matrix(counts)})
    both.write_h5ad(tmp_path / "both.h5ad")
    assert (read_scrna(tmp_path / "both.h5ad").X != sp.csr_matrix(counts)).nnz == 0


def test_h5ad_without_counts_is_an_input_error(tmp_path):
    path = tmp_path / "nocounts.h5ad"
    ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]),
               var=pd.DataFrame(index=["A", "B"])).write_h5ad(path)
    with pytest.raises(InputError, match="no count matrix"):
        read_scrna(path, sample_id="s")


def _sheet(tmp_path, row, out):
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{**row, "path": str(out / row["path"])}]).to_csv(sheet, sep="\t", index=False)
    return sheet


def test_cli_writes_h5ad_and_qc_table(visits, tmp_path):
    out, rows = visits
    sheet = _sheet(tmp_path, rows[1], out)
    status = main(["ingest-scrna", "--samples", str(sheet), "--sample-id", rows[1]["sample_id"],
                   "--out", str(tmp_path / "s.h5ad"), "--qc", str(tmp_path / "qc.tsv")])
    assert status == 0
    qc = pd.read_csv(tmp_path / "qc.tsv", sep="\t")
    assert list(qc.columns) == ["sample_id", "step", "events_in", "events_removed",
                                "events_out", "detail"]
    written = ad.read_h5ad(tmp_path / "s.h5ad")
    assert written.obs["qc_pass"].sum() == qc["events_out"].iloc[-1]
    np.testing.assert_array_equal(written.obs["event_index"], np.arange(written.n_obs))


def test_sample_with_no_cell_after_qc_is_valid_and_empty(visits, tmp_path):
    out, rows = visits
    sheet = _sheet(tmp_path, rows[1], out)
    config = tmp_path / "config.yaml"
    config.write_text("scrna:\n  qc:\n    min_genes: 100000\n")
    status = main(["ingest-scrna", "--config", str(config), "--samples", str(sheet),
                   "--sample-id", rows[1]["sample_id"], "--out", str(tmp_path / "s.h5ad"),
                   "--qc", str(tmp_path / "qc.tsv")])
    assert status == 0
    qc = pd.read_csv(tmp_path / "qc.tsv", sep="\t")
    assert qc["events_out"].iloc[-1] == 0
    assert ad.read_h5ad(tmp_path / "s.h5ad").obs["qc_pass"].sum() == 0


def test_unreadable_file_exits_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    row = {"sample_id": "S1", "patient_id": "P", "day": 0, "modality": "scrna",
           "path": str(bad)}
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([row]).to_csv(sheet, sep="\t", index=False)
    status = main(["ingest-scrna", "--samples", str(sheet), "--sample-id", "S1",
                   "--out", str(tmp_path / "o.h5ad"), "--qc", str(tmp_path / "qc.tsv")])
    assert status == 1
    assert "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists() and not (tmp_path / "qc.tsv").exists()
