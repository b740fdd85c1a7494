"""The scRNA demo simulator: files, truth and the properties the generative model promises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bcellmap.demo.simulate_scrna import simulate_scrna_visits


@pytest.fixture(scope="module")
def visits(tmp_path_factory):
    out = tmp_path_factory.mktemp("scrna_sim")
    rows = simulate_scrna_visits(out, patients=["P01"], seed=7, cells_per_sample=1200,
                                 n_genes=800, days=(-7, 28, 150))
    return out, rows


def test_rows_follow_the_sample_sheet_contract(visits):
    out, rows = visits
    assert [r["day"] for r in rows] == [-7, 28, 150]
    for row in rows:
        assert set(row) == {"sample_id", "patient_id", "day", "modality", "path",
                            "lymphocytes_per_ul"}
        assert row["modality"] == "scrna"
        assert (out / row["path"]).exists()
        assert (out / f"{row['sample_id']}.truth.tsv").exists()
    assert rows[0]["path"].endswith(".h5") and rows[1]["path"].endswith(".h5ad")


def test_10x_h5_reads_with_scanpy_and_carries_antibody_capture(visits):
    import scanpy as sc

    out, rows = visits
    adata = sc.read_10x_h5(out / rows[0]["path"], gex_only=False)
    types = adata.var["feature_types"].value_counts()
    assert types["Antibody Capture"] == 7
    assert adata.n_obs == 1200
    truth = pd.read_csv(out / f"{rows[0]['sample_id']}.truth.tsv", sep="\t")
    assert list(adata.obs_names) == list(truth["barcode"])
    counts = adata.X.toarray()
    assert np.all(counts == np.round(counts)) and counts.min() >= 0


def test_truth_follows_the_car_t_course(visits):
    out, rows = visits
    summary = pd.read_csv(out / "truth_scrna_samples.tsv", sep="\t").set_index("phase")
    assert summary.loc["baseline", "b_cells"] > 100
    assert summary.loc["aplasia", "b_cells"] == 0
    assert summary.loc["aplasia", "car_t"] > 0 and summary.loc["baseline", "car_t"] == 0
    recon = summary.loc["reconstitution"]
    naive_like = recon["naive_count"] + recon["transitional_count"]
    # Returning B cells are naive/transitional, not class-switched.
    assert naive_like / recon["b_cells"] > 0.8


def test_library_sizes_are_log_normal_with_the_model_median(visits):
    import anndata as ad

    out, rows = visits
    adata = ad.read_h5ad(out / rows[1]["path"])
    truth = pd.read_csv(out / f"{rows[1]['sample_id']}.truth.tsv", sep="\t")
    singlets = ~truth["cell_type"].isin(["doublet", "low_quality"]).to_numpy()
    library = np.asarray(adata.X.sum(axis=1)).ravel()[singlets]
    # Median library of the model is exp(log 3500) (monocytes x1.5): within 20%.
    assert 3500 * 0.8 < np.median(library) < 3500 * 1.5
    assert 0.25 < np.std(np.log(library)) < 0.6


def test_same_seed_same_files(tmp_path):
    import anndata as ad

    a = simulate_scrna_visits(tmp_path / "a", patients=["P09"], seed=3, cells_per_sample=200,
                              n_genes=300, days=(150,), write_10x_h5=False)
    b = simulate_scrna_visits(tmp_path / "b", patients=["P09"], seed=3, cells_per_sample=200,
                              n_genes=300, days=(150,), write_10x_h5=False)
    assert a == b
    xa = ad.read_h5ad(tmp_path / "a" / a[0]["path"]).X
    xb = ad.read_h5ad(tmp_path / "b" / b[0]["path"]).X
    assert (xa != xb).nnz == 0
