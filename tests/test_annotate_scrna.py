"""scRNA annotation against the simulator's truth: B cells, subsets, CAR-T, bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from bcellmap.annotate_scrna import COUNT_COLUMNS, annotate_scrna
from bcellmap.backend import get_backend
from bcellmap.cli import main
from bcellmap.cluster_scrna import map_scrna, train_scrna
from bcellmap.config import load_config
from bcellmap.errors import InputError
from bcellmap.ingest_scrna import ingest_scrna
from bcellmap.simulate_scrna import simulate_scrna_visits

CAR = "CAR_FMC63"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Simulate one patient (CITE-seq baseline, aplasia, reconstitution), ingest, train, map."""
    out = tmp_path_factory.mktemp("scrna_annotate")
    rows = simulate_scrna_visits(out, patients=["P01"], seed=21, cells_per_sample=1500,
                                 n_genes=700, days=(-7, 28, 150), car_feature=CAR)
    config = load_config()
    config["scrna"]["car_feature"] = CAR
    config["scrna"]["cluster"]["cells_per_sample"] = 800
    paths, ingested = [], {}
    for row in rows:
        adata, _ = ingest_scrna(out / row["path"], config=config, sample=row)
        path = out / f"{row['sample_id']}.ingested.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
        ingested[row["sample_id"]] = adata
    backend = get_backend(device="cpu")
    model, _ = train_scrna(paths, config=config, backend=backend)
    mapped = {sid: map_scrna(a, model, config=config, backend=backend, sample_id=sid)
              for sid, a in ingested.items()}
    return out, rows, config, mapped, paths


def _truth(out, sample_id, adata):
    truth = pd.read_csv(out / f"{sample_id}.truth.tsv", sep="\t", keep_default_na=False)
    return truth.iloc[adata.obs["event_index"].to_numpy()].reset_index(drop=True)


def _singlets(truth):
    return ~truth["cell_type"].isin(["doublet", "low_quality"]).to_numpy()


@pytest.mark.parametrize("visit", [0, 2])
def test_b_cell_calls_match_the_truth(pipeline, visit):
    out, rows, config, mapped, _ = pipeline
    sample_id = rows[visit]["sample_id"]
    annotated, row = annotate_scrna(mapped[sample_id], config=config, sample_id=sample_id)
    truth = _truth(out, sample_id, annotated)
    keep = _singlets(truth)
    is_b = truth["cell_type"].to_numpy()[keep] == "B"
    called = annotated.obs["cell_type"].to_numpy()[keep] == "B"
    assert f1_score(is_b, called) >= 0.9
    lymph = np.isin(annotated.obs["cell_type"], ["T", "B", "NK"]).sum()
    assert row["lymphocytes"] == lymph
    assert row["b_cells"] == (annotated.obs["cell_type"] == "B").sum()
    assert set(COUNT_COLUMNS) == set(row)


def _naive_memory_f1(annotated, truth) -> float:
    subset_truth = truth["b_subset"].to_numpy()
    called = annotated.obs["b_subset"].astype(str).to_numpy()
    memory = {"unswitched_memory", "switched_memory"}
    both_b = (truth["cell_type"].to_numpy() == "B") & (annotated.obs["cell_type"] == "B")
    carry = np.isin(subset_truth, ["naive", *memory])  # transitional/plasmablast: no call here
    keep = both_b.to_numpy() & carry & np.isin(called, ["naive", *memory])
    return f1_score(np.isin(subset_truth[keep], list(memory)), np.isin(called[keep], list(memory)),
                    average="macro")


def test_naive_versus_memory_from_rna(pipeline):
    out, rows, config, mapped, _ = pipeline
    sample_id = rows[0]["sample_id"]
    rna_only = mapped[sample_id].copy()
    del rna_only.obsm["protein"]
    annotated, row = annotate_scrna(rna_only, config=config, sample_id=sample_id)
    assert _naive_memory_f1(annotated, _truth(out, sample_id, annotated)) >= 0.8
    assert row["subsets_not_called"] == "transitional;double_negative"
    assert row["transitional_count"] == "" and row["double_negative_count"] == ""


def test_cite_seq_protein_calls_transitional_and_subsets(pipeline):
    out, rows, config, mapped, _ = pipeline
    sample_id = rows[0]["sample_id"]
    annotated, row = annotate_scrna(mapped[sample_id], config=config, sample_id=sample_id)
    truth = _truth(out, sample_id, annotated)
    assert row["subsets_not_called"] == ""
    assert _naive_memory_f1(annotated, truth) >= 0.8
    true_transitional = (truth["b_subset"] == "transitional").to_numpy()
    called_transitional = (annotated.obs["b_subset"] == "transitional").to_numpy()
    assert called_transitional[true_transitional].mean() >= 0.6
    assert f1_score(true_transitional, called_transitional) >= 0.6


def test_aplasia_has_no_b_cells_and_counts_car_t_cells(pipeline):
    out, rows, config, mapped, _ = pipeline
    sample_id = rows[1]["sample_id"]
    annotated, row = annotate_scrna(mapped[sample_id], config=config, sample_id=sample_id)
    truth = _truth(out, sample_id, annotated)
    assert row["b_cells"] <= 2  # truth: none
    true_car = int(truth["car_t"].astype(str).eq("True").sum())
    assert true_car > 50
    assert abs(row["car_t_count"] - true_car) <= 0.1 * true_car
    assert row["car_t_pct_t"] == pytest.approx(100 * row["car_t_count"] / row["t_cells"], rel=1e-3)


def test_missing_marker_genes_score_partially_or_fail_clearly(pipeline):
    out, rows, config, mapped, _ = pipeline
    sample_id = rows[2]["sample_id"]
    adata = mapped[sample_id]
    partial = adata[:, ~adata.var_names.isin(["CD19", "MS4A1", "GNLY"])].copy()
    annotated, _ = annotate_scrna(partial, config=config, sample_id=sample_id)
    assert annotated.uns["annotation"]["missing_genes"]["B"] == ["MS4A1", "CD19"]
    truth = _truth(out, sample_id, annotated)
    keep = _singlets(truth)
    assert f1_score(truth["cell_type"].to_numpy()[keep] == "B",
                    annotated.obs["cell_type"].to_numpy()[keep] == "B") >= 0.9
    no_b = adata[:, ~adata.var_names.isin(["CD19", "MS4A1", "CD79A", "CD79B"])].copy()
    with pytest.raises(InputError, match="pan-B marker"):
        annotate_scrna(no_b, config=config, sample_id=sample_id)


def test_cli_on_a_sample_with_no_cell_after_qc(pipeline, tmp_path):
    out, rows, config, mapped, _ = pipeline
    sample_id = rows[2]["sample_id"]
    empty = mapped[sample_id][:0].copy()
    path = tmp_path / "empty.h5ad"
    empty.write_h5ad(path)
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([{**rows[2], "path": str(out / rows[2]["path"])}]).to_csv(sheet, sep="\t",
                                                                           index=False)
    status = main(["annotate-scrna", "--samples", str(sheet), "--sample-id", sample_id,
                   "--input", str(path), "--out", str(tmp_path / "a.h5ad"),
                   "--counts", str(tmp_path / "c.tsv")])
    assert status == 0
    counts = pd.read_csv(tmp_path / "c.tsv", sep="\t")
    assert list(counts.columns) == list(COUNT_COLUMNS)
    assert counts.loc[0, "events_qc_pass"] == 0 and counts.loc[0, "b_cells"] == 0
    assert counts.loc[0, "events_total"] == 1500
    assert ad.read_h5ad(tmp_path / "a.h5ad").n_obs == 0
