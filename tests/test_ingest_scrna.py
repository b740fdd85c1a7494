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
from bcellmap.demo.simulate_scrna import simulate_scrna_visits
from bcellmap.errors import InputError
from bcellmap.scrna.ingest import (
    NO_MARKER_MATCH,
    adt_canonical,
    clr_normalise,
    ingest_scrna,
    match_protein_markers,
    read_scrna,
    run_qc,
)


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


# --- Real CITE-seq inputs: proteins in obsm, vendor ADT names, unmatched panels ---------------

_MARKERS = ["CD3", "CD19", "CD20", "CD27", "IgD", "CD38", "CD24"]


def _small_config(**protein):
    config = load_config()
    config["scrna"]["qc"].update(min_counts=1, min_genes=1)
    config["scrna"]["qc"]["doublets"]["enabled"] = False
    config["scrna"]["protein"]["markers"] = list(_MARKERS)  # not the defaults, which may grow
    config["scrna"]["protein"].update(protein)
    return config


def _rna(n_cells=40, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    obs = pd.DataFrame(index=[f"AAAC{i:04d}-1" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


def _adt_counts(n_cells, n_adts, seed=1):
    # Distinct column scales so that a column landing on the wrong marker is seen.
    rng = np.random.default_rng(seed)
    return rng.poisson(np.arange(1, n_adts + 1) * 7.0, size=(n_cells, n_adts)).astype(np.int64)


def _sample(sample_id="CITE1"):
    return {"sample_id": sample_id, "patient_id": "P1", "day": 30, "modality": "scrna"}


@pytest.mark.parametrize(("name", "canonical"), [
    ("CD19:HIB19|CD19|AHS0030|pAbO", "CD19"),      # BD AbSeq
    ("CD3:UCHT1|CD3E|AHS0231|pAbO", "CD3"),        # gene field CD3E does not make it ambiguous
    ("IgD:IA6-2|IGHD|AHS0058|pAbO", "IgD"),
    ("CD19(HIB19)", "CD19"), ("CD24 (ML5)", "CD24"),
    ("CD19-TotalSeqB", "CD19"), ("TotalSeqB_CD38", "CD38"), ("CD20_2H7", "CD20"),
    ("ADT_CD19", "CD19"), ("ADT:CD27", "CD27"), ("Hu.CD19", "CD19"), ("anti-human CD19", "CD19"),
    ("CD274", "CD274"), ("CD27.1", "CD27"),
    ("Mouse.IgG1", ""), ("Hashtag1", ""), ("HTO_A0251", ""),
])
def test_adt_names_of_vendors_resolve_to_markers(name, canonical):
    assert adt_canonical(name) == canonical


def test_marker_matching_never_takes_a_longer_cd_and_reports_duplicates():
    names = ["CD274(29E.2A3)", "Hu.HLA-DR", "CD27:M-T271|CD27|AHS0025|pAbO", "CD19", "CD19_2"]
    matched, several = match_protein_markers(names, ["CD27", "HLA-DR", "CD19", "CD38"])
    assert matched == {"CD27": 2, "HLA-DR": 1, "CD19": 3}
    assert several == {"CD19": ["CD19", "CD19_2"]}


def _check_markers_carry_their_columns(adata, adt_names, counts, expected):
    """obsm["protein_counts"]/["protein"] columns are the source ADT columns of each marker."""
    assert adata.uns["protein_names"] == list(expected)
    clr_all = clr_normalise(counts, margin="cell")
    for column, marker in enumerate(adata.uns["protein_names"]):
        source = adt_names.index(expected[marker])
        assert adata.uns["protein_features"][column] == expected[marker]
        np.testing.assert_array_equal(adata.obsm["protein_counts"][:, column], counts[:, source])
        np.testing.assert_allclose(adata.obsm["protein"][:, column], clr_all[:, source],
                                   rtol=1e-6)


def test_scvi_style_obsm_dataframe_with_bd_abseq_names_is_used(tmp_path):
    adata = _rna()
    names = ["IgD:IA6-2|IGHD|AHS0058|pAbO", "CD274:MIH1|CD274|AHS0004|pAbO",
             "CD19:HIB19|CD19|AHS0030|pAbO", "Mouse.IgG1", "CD27:M-T271|CD27|AHS0025|pAbO",
             "CD3:UCHT1|CD3E|AHS0231|pAbO"]
    counts = _adt_counts(adata.n_obs, len(names))
    adata.obsm["protein_expression"] = pd.DataFrame(counts, index=adata.obs_names,
                                                    columns=names)
    path = tmp_path / "totalvi.h5ad"
    adata.write_h5ad(path)
    result, _ = ingest_scrna(path, config=_small_config(), sample=_sample())
    expected = {"CD3": names[5], "CD19": names[2], "CD27": names[4], "IgD": names[0]}
    _check_markers_carry_their_columns(result, names, counts, expected)
    panel = result.uns["protein_panel"]
    assert panel["source"] == "obsm['protein_expression']"
    assert panel["flag"] == ""
    assert panel["markers_missing"] == "CD20;CD38;CD24"
    assert "protein_expression" not in result.obsm  # moved into obsm["protein(_counts)"]
    result.write_h5ad(tmp_path / "out.h5ad")  # uns records are writable
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["protein_panel"]["source"] == panel["source"]


def test_obsm_array_with_names_in_uns_and_totalseq_names(tmp_path):
    adata = _rna(seed=3)
    names = ["CD274-TotalSeqB", "CD27-TotalSeqB", "CD19(HIB19)", "Hu.CD20", "ADT_CD3",
             "anti-human IgD", "CD38_HIT2", "Hashtag1"]
    counts = _adt_counts(adata.n_obs, len(names), seed=4)
    adata.obsm["protein_expression"] = counts
    adata.uns["protein_names"] = np.array(names, dtype=object)
    path = tmp_path / "array.h5ad"
    adata.write_h5ad(path)
    result, _ = ingest_scrna(path, config=_small_config(), sample=_sample())
    expected = {"CD3": "ADT_CD3", "CD19": "CD19(HIB19)", "CD20": "Hu.CD20",
                "CD27": "CD27-TotalSeqB", "IgD": "anti-human IgD", "CD38": "CD38_HIT2"}
    _check_markers_carry_their_columns(result, names, counts, expected)
    assert result.uns["protein_panel"]["adts_unmatched"] == "CD274-TotalSeqB;Hashtag1"


def test_configured_obsm_and_names_keys(tmp_path):
    adata = _rna()
    counts = _adt_counts(adata.n_obs, 2)
    adata.obsm["citeseq"] = sp.csr_matrix(counts)
    adata.uns["citeseq_panel"] = ["CD20_2H7", "CD19_HIB19"]
    path = tmp_path / "custom.h5ad"
    adata.write_h5ad(path)
    config = _small_config(obsm_key="citeseq", names_key="citeseq_panel")
    result, _ = ingest_scrna(path, config=config, sample=_sample())
    _check_markers_carry_their_columns(result, ["CD20_2H7", "CD19_HIB19"], counts,
                                       {"CD19": "CD19_HIB19", "CD20": "CD20_2H7"})
    with pytest.raises(InputError, match="obsm_key is 'other'"):
        ingest_scrna(path, config=_small_config(obsm_key="other"), sample=_sample())


def test_protein_config_keys_are_known(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("scrna:\n  protein:\n    required: true\n    obsm_key: adt\n"
                    "    names_key: adt_names\n")
    protein = load_config(path)["scrna"]["protein"]
    assert protein["required"] is True and protein["obsm_key"] == "adt"


def test_var_adts_in_h5ad_with_vendor_names_and_adt_prefix(tmp_path):
    genes = _rna(n_genes=20)
    names = ["CD19:HIB19|CD19|AHS0030|pAbO", "CD20(2H7)", "CD274(29E.2A3)"]
    counts = _adt_counts(genes.n_obs, len(names), seed=5)
    var = pd.DataFrame({"feature_types": ["Gene Expression"] * 20 + ["Antibody Capture"] * 3},
                       index=[*genes.var_names, *names])
    adata = ad.AnnData(sp.hstack([genes.X, sp.csr_matrix(counts.astype(np.float32))]).tocsr(),
                       obs=genes.obs, var=var)
    adata.write_h5ad(tmp_path / "var.h5ad")
    result, _ = ingest_scrna(tmp_path / "var.h5ad", config=_small_config(), sample=_sample())
    _check_markers_carry_their_columns(result, names, counts,
                                       {"CD19": names[0], "CD20": names[1]})
    assert result.n_vars == 20
    # No feature_types column: ADT_<name> features are antibody capture.
    prefixed = ad.AnnData(adata.X, obs=genes.obs,
                          var=pd.DataFrame(index=[*genes.var_names, "ADT_CD19", "ADT_CD20",
                                                  "ADT_CD274"]))
    prefixed.write_h5ad(tmp_path / "prefixed.h5ad")
    result, _ = ingest_scrna(tmp_path / "prefixed.h5ad", config=_small_config(),
                             sample=_sample())
    _check_markers_carry_their_columns(result, ["ADT_CD19", "ADT_CD20", "ADT_CD274"], counts,
                                       {"CD19": "ADT_CD19", "CD20": "ADT_CD20"})
    assert "ADT_CD19" not in result.var_names


def test_adt_panel_matching_no_marker_is_reported_and_refused_when_required(tmp_path, caplog):
    adata = _rna()
    names = ["CD4_RPA-T4", "CD8a(RPA-T8)", "Hashtag1"]
    counts = _adt_counts(adata.n_obs, len(names))
    adata.obsm["protein_expression"] = pd.DataFrame(counts, index=adata.obs_names,
                                                    columns=names)
    path = tmp_path / "t_panel.h5ad"
    adata.write_h5ad(path)
    with caplog.at_level("WARNING", logger="bcellmap.scrna.ingest"):
        result, _ = ingest_scrna(path, config=_small_config(), sample=_sample("TPANEL"))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "TPANEL" in warning and "none of the 3 ADTs" in warning and "CD8a(RPA-T8)" in warning
    assert result.uns["protein_panel"]["flag"] == NO_MARKER_MATCH
    assert result.uns["protein_panel"]["adts_unmatched"] == ";".join(names)
    assert "protein" not in result.obsm and "protein_names" not in result.uns
    with pytest.raises(InputError, match="required is true but none of the 3 ADTs") as error:
        ingest_scrna(path, config=_small_config(required=True), sample=_sample("TPANEL"))
    assert "TPANEL" in str(error.value) and str(path) in str(error.value)


def test_required_protein_without_any_adt_is_an_error(tmp_path):
    path = tmp_path / "rna_only.h5ad"
    _rna().write_h5ad(path)
    result, _ = ingest_scrna(path, config=_small_config(), sample=_sample())
    assert result.uns["protein_panel"]["source"] == "none"
    with pytest.raises(InputError, match="no CITE-seq antibody data"):
        ingest_scrna(path, config=_small_config(required=True), sample=_sample())


def test_protein_rows_that_are_not_the_cells_are_refused(tmp_path):
    import h5py

    adata = _rna()
    counts = _adt_counts(adata.n_obs, 2)
    adata.obsm["protein_expression"] = pd.DataFrame(counts, index=adata.obs_names,
                                                    columns=["CD19", "CD20"])
    adata.obsm["adt"] = counts
    path = tmp_path / "short.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as handle:  # a matrix of another object's cells
        del handle["obsm/adt"]
        handle["obsm/adt"] = counts[:-5]
    with pytest.raises(InputError, match=r"protein \(ADT\) matrix obsm\['adt'\] has 35 rows "
                       "but the file has 40 cells") as error:
        ingest_scrna(path, config=_small_config(), sample=_sample("SHORT"))
    assert "sample 'SHORT'" in str(error.value) and str(path) in str(error.value)
    # Same cells in another order: refused, not attached to the wrong cells.
    path = tmp_path / "shuffled.h5ad"
    adata.obsm.pop("adt")
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as handle:
        index = handle["obsm/protein_expression/_index"]
        index[...] = index[...][::-1]
    with pytest.raises(InputError, match="same barcodes in another order") as error:
        read_scrna(path, sample_id="SHUF")
    assert "SHUF" in str(error.value) and str(path) in str(error.value)


def test_normalised_obsm_protein_is_refused_unless_raw_counts_are_there_too(tmp_path):
    adata = _rna()
    counts = _adt_counts(adata.n_obs, 2)
    names = ["CD19", "CD20"]
    adata.obsm["protein"] = pd.DataFrame(clr_normalise(counts), index=adata.obs_names,
                                         columns=names)
    path = tmp_path / "clr.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError, match="not integer counts") as error:
        ingest_scrna(path, config=_small_config(), sample=_sample("CLR"))
    assert "obsm['protein']" in str(error.value) and "CLR" in str(error.value)
    adata.obsm["protein_counts"] = pd.DataFrame(counts, index=adata.obs_names, columns=names)
    adata.write_h5ad(path)
    result, _ = ingest_scrna(path, config=_small_config(), sample=_sample("CLR"))
    _check_markers_carry_their_columns(result, names, counts, {"CD19": "CD19", "CD20": "CD20"})
    assert result.uns["protein_panel"]["source"] == "obsm['protein_counts']"


def test_obsm_array_without_names_is_refused(tmp_path):
    adata = _rna()
    adata.obsm["protein_expression"] = _adt_counts(adata.n_obs, 3)
    path = tmp_path / "nonames.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError, match="holds 3 proteins but no names") as error:
        ingest_scrna(path, config=_small_config(), sample=_sample("NONAMES"))
    assert "NONAMES" in str(error.value)
    adata.uns["protein_names"] = ["CD19", "CD20"]
    adata.write_h5ad(path)
    with pytest.raises(InputError, match="3 protein columns but uns\\['protein_names'\\] "
                                         "names 2"):
        ingest_scrna(path, config=_small_config(), sample=_sample("NONAMES"))
