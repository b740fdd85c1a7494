"""Annotation of one scRNA sample: cell types, B-cell subsets, CAR-T cells, counts table.

Per cell, ``scanpy.tl.score_genes`` (seeded) scores every marker set of
``scrna.annotate.markers`` (B, plasmablast, T, NK, monocyte, DC: B cells are called against real
alternatives); the per-cell call (``obs["cell_type_cell"]``) is the best-scoring population, or
``unassigned`` when no score is above ``scrna.annotate.min_score``. Plasmablasts are B-lineage:
their ``cell_type`` is ``B`` and their ``b_subset`` ``plasmablast``. The cluster call
(``obs["cluster_cell_type"]``) is the majority of the per-cell calls in the cell's Leiden cluster
(``obs["leiden"]`` from ``map-scrna``); ``obs["cell_type"]`` is the cluster call
(``scrna.annotate.call: cluster``, robust to marker dropout) or the per-cell call (``cell``).

B-cell subsets (``obs["b_subset"]``, empty for non-B), per cell:

- RNA only: plasmablast when the plasmablast score beats the pan-B score; otherwise naive or
  memory by the higher of the naive and memory scores, memory split into switched (IGHG/IGHA
  expression above IGHM/IGHD) and unswitched. Transitional (needs CD24/CD38 protein) and
  double negative (needs IgD/CD27 protein) are not resolvable from RNA and are listed in
  ``subsets_not_called``.
- CITE-seq (``obsm["protein"]``): protein takes precedence for the subset markers:
  transitional CD24hi CD38hi, then the IgD/CD27 quadrants (naive IgD+CD27-, unswitched memory
  IgD+CD27+, switched memory IgD-CD27+, double negative IgD-CD27-); plasmablasts stay the RNA
  call. "Positive" thresholds come from ``scrna.protein.thresholds`` or a seeded two-component
  Gaussian mixture of the CLR values of all cells (``hi`` for CD24/CD38: of the B cells).

Missing marker genes: populations are scored with the genes present (partial scoring, listed in
``uns["annotation"]["missing_genes"]`` and logged); a population with none is not scored (and
cannot be called). No pan-B gene at all is an error: B cells could not be called.

Counts (``results/counts/{sample_id}.tsv``, the counts-table contract): ``lymphocytes`` is the
QC-passed T, B and NK cells, so the scRNA B-cell frequency is relative to lymphocytes, as for
flow (monocytes, DC and unassigned cells are excluded). ``cd19_pos``/``cd20_pos`` count B cells
with the CD19/CD20 protein above threshold, and are left empty (not measured) without CITE-seq
protein for that marker: CD19 mRNA drops out in most B cells, so an RNA-only "CD19-negative"
B cell is no evidence of CD19 loss, and counting it would raise false CD19/CD20 discordance.
``cd19neg_cd20pos`` needs both proteins. ``obs["cd19_rna"]``/``obs["cd20_rna"]`` keep the
transcript calls (at least one CD19/MS4A1 UMI) for inspection. ``car_t_count``: T cells with
at least ``scrna.annotate.car_min_counts`` UMIs of ``scrna.car_feature``; ``car_t_pct_t`` =
100 x car_t_count / t_cells (empty without a CAR feature or without T cells).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError

log = logging.getLogger(__name__)

SUBSETS = ("transitional", "naive", "unswitched_memory", "switched_memory",
           "double_negative", "plasmablast")
COUNT_COLUMNS = ("sample_id", "modality", "events_total", "events_qc_pass", "lymphocytes",
                 "t_cells", "b_cells", "cd19_pos", "cd20_pos", "cd19neg_cd20pos",
                 *(f"{s}_count" for s in SUBSETS), "subsets_not_called",
                 "cluster_discordant_events", "car_t_count", "car_t_pct_t")
LYMPHOCYTE_TYPES = ("T", "B", "NK")
UNASSIGNED = "unassigned"
_CLUSTER_KEY = "leiden"


def _present(adata, genes: list[str]) -> tuple[list[str], list[str]]:
    names = set(adata.var_names)
    return [g for g in genes if g in names], [g for g in genes if g not in names]


def _score(adata, genes: list[str], *, name: str, seed: int) -> np.ndarray:
    """Seeded scanpy marker score; the control set is capped by the genes available."""
    import scanpy as sc

    ctrl = max(1, min(50, adata.n_vars - len(genes)))
    sc.tl.score_genes(adata, genes, score_name=name, ctrl_size=ctrl,
                      n_bins=min(25, max(1, adata.n_vars // 20)), random_state=seed)
    return adata.obs.pop(name).to_numpy(dtype=float)


def _counts_of(adata, gene: str) -> np.ndarray:
    """UMIs of one gene per cell (``layers["counts"]``; X > 0 for normalised input)."""
    column = adata.var_names.get_loc(gene)
    if "counts" in adata.layers:
        values = adata.layers["counts"][:, column]
    else:
        values = (adata.X[:, column] > 0).astype(np.float32)
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    return values.ravel()


def _mean_expression(adata, genes: list[str]) -> np.ndarray:
    if not genes:
        return np.zeros(adata.n_obs)
    values = adata[:, genes].X
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    return values.mean(axis=1)


def _protein_threshold(values: np.ndarray, *, seed: int) -> float:
    """Boundary between the low and high component of a seeded 2-component Gaussian mixture
    (NaN when there are too few cells to learn it)."""
    from sklearn.mixture import GaussianMixture

    values = values[np.isfinite(values)]
    if values.size < 20 or np.ptp(values) == 0:
        return float("nan")
    gmm = GaussianMixture(n_components=2, random_state=seed).fit(values.reshape(-1, 1))
    high = int(np.argmax(gmm.means_.ravel()))
    grid = np.linspace(values.min(), values.max(), 512)
    posterior = gmm.predict_proba(grid.reshape(-1, 1))[:, high]
    above = np.flatnonzero(posterior >= 0.5)
    low_mean = float(gmm.means_.ravel()[1 - high])
    above = above[grid[above] > low_mean]
    return float(grid[above[0]]) if above.size else float("nan")


def _protein_calls(adata, *, b_cell: np.ndarray, config: Mapping[str, Any], seed: int
                   ) -> dict[str, np.ndarray]:
    """Boolean positive/hi calls per protein (only proteins with a usable threshold)."""
    names = list(adata.uns.get("protein_names", []))
    if "protein" not in adata.obsm or not names:
        return {}
    protein = np.asarray(adata.obsm["protein"], dtype=float)
    fixed = config["scrna"]["protein"].get("thresholds") or {}
    calls: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        values = protein[:, j]
        # CD24 and CD38 are "hi" among B cells (transitional); the others positive among all.
        pool = values[b_cell] if name in ("CD24", "CD38") else values
        cut = float(fixed[name]) if name in fixed else _protein_threshold(pool, seed=seed)
        if np.isfinite(cut):
            calls[name] = values >= cut
    return calls


def annotate_scrna(adata, *, config: Mapping[str, Any], sample_id: str,
                   events_total: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Label the cells of one mapped scRNA sample and count them.

    Parameters
    ----------
    adata
        QC-passed cells: log-normalised ``X``, ``layers["counts"]``, ``obs["leiden"]`` (optional;
        without it the per-cell call is used), ``obsm["protein"]`` (optional).
    config
        Merged config (``scrna``, ``seed``).
    sample_id
        For messages and the counts row.
    events_total
        Cells in the source file (QC failures included); default ``uns["source"]["cells"]``.

    Returns
    -------
    (annotated AnnData copy, counts-table row as a dict with the ``COUNT_COLUMNS``)
    """
    scfg = config["scrna"]
    acfg = scfg["annotate"]
    seed = int(config["seed"])
    adata = adata.copy()
    n = adata.n_obs
    missing: dict[str, list[str]] = {}
    marker_sets = {k: list(v) for k, v in acfg["markers"].items()}
    present_b, _ = _present(adata, marker_sets.get("B", []))
    if not present_b:
        raise InputError("none of the pan-B marker genes "
                         f"({', '.join(marker_sets.get('B', []))}) is in the count matrix; "
                         "B cells cannot be called (check gene symbols vs Ensembl ids)",
                         sample_id=sample_id)

    scores: dict[str, np.ndarray] = {}
    for population, genes in marker_sets.items():
        present, absent = _present(adata, genes)
        if absent:
            missing[population] = absent
        if not present:
            log.warning("sample %s: no %s marker gene found; %s is not scored", sample_id,
                        population, population)
            continue
        scores[population] = _score(adata, present, name=f"_score_{population}", seed=seed) \
            if n else np.zeros(0)
    subset_scores: dict[str, np.ndarray] = {}
    subset_genes: dict[str, list[str]] = {}
    for subset, genes in acfg["subset_markers"].items():
        present, absent = _present(adata, list(genes))
        subset_genes[subset] = present
        if absent:
            missing[f"subset:{subset}"] = absent
        if present and subset in ("naive", "memory") and n:
            subset_scores[subset] = _score(adata, present, name=f"_score_{subset}", seed=seed)
    if missing:
        log.warning("sample %s: marker genes missing, scored with the rest: %s", sample_id,
                    "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items()))

    populations = list(scores)
    score_matrix = np.column_stack([scores[p] for p in populations]) if n else \
        np.zeros((0, len(populations)))
    for p in populations:
        adata.obs[f"score_{p}"] = scores[p].astype(np.float32)
    best = score_matrix.argmax(axis=1) if n else np.zeros(0, dtype=int)
    best_population = np.asarray(populations, dtype=object)[best] if n else \
        np.zeros(0, dtype=object)
    best_score = score_matrix.max(axis=1) if n else np.zeros(0)
    per_cell = np.where(best_population == "plasmablast", "B", best_population).astype(object)
    per_cell[best_score <= float(acfg["min_score"])] = UNASSIGNED
    adata.obs["cell_type_cell"] = per_cell

    has_clusters = _CLUSTER_KEY in adata.obs
    if has_clusters and n:
        clusters = adata.obs[_CLUSTER_KEY].astype(str).to_numpy()
        majority = (pd.DataFrame({"c": clusters, "t": per_cell}).groupby("c")["t"]
                    .agg(lambda s: s.value_counts().index[0]))
        cluster_call = majority.reindex(clusters).to_numpy(dtype=object)
    else:
        cluster_call = per_cell.copy()
    adata.obs["cluster_cell_type"] = cluster_call
    use_cluster = acfg["call"] == "cluster" and has_clusters
    cell_type = cluster_call if use_cluster else per_cell
    discordant = int((cluster_call != per_cell).sum()) if has_clusters else 0
    b_cell = cell_type == "B"

    # B-cell subsets from RNA.
    subset = np.full(n, "", dtype=object)
    not_called = {"transitional", "double_negative"}
    pb = scores.get("plasmablast", np.full(n, -np.inf))
    pan_b = scores.get("B", np.full(n, -np.inf))
    is_pb = b_cell & (pb > pan_b) & (pb > float(acfg["min_score"]))
    subset[is_pb] = "plasmablast"
    if "plasmablast" not in scores:
        not_called.add("plasmablast")
    rest = b_cell & ~is_pb
    if "naive" in subset_scores and "memory" in subset_scores:
        memory = subset_scores["memory"] > subset_scores["naive"]
        switched = (_mean_expression(adata, subset_genes.get("switched", []))
                    > _mean_expression(adata, subset_genes.get("unswitched", [])))
        subset[rest & ~memory] = "naive"
        subset[rest & memory & switched] = "switched_memory"
        subset[rest & memory & ~switched] = "unswitched_memory"
    else:
        not_called |= {"naive", "unswitched_memory", "switched_memory"}

    # Protein precedence (CITE-seq).
    protein = _protein_calls(adata, b_cell=b_cell, config=config, seed=seed)
    if {"IgD", "CD27"} <= set(protein):
        igd, cd27 = protein["IgD"], protein["CD27"]
        target = b_cell & ~is_pb
        subset[target & igd & ~cd27] = "naive"
        subset[target & igd & cd27] = "unswitched_memory"
        subset[target & ~igd & cd27] = "switched_memory"
        subset[target & ~igd & ~cd27] = "double_negative"
        not_called -= {"double_negative", "naive", "unswitched_memory", "switched_memory"}
        if {"CD24", "CD38"} <= set(protein):
            subset[target & protein["CD24"] & protein["CD38"]] = "transitional"
            not_called.discard("transitional")
    adata.obs["cell_type"] = pd.Categorical(cell_type)
    adata.obs["b_subset"] = pd.Categorical(subset)

    def _rna_positive(gene: str) -> np.ndarray:
        if gene in adata.var_names:
            return b_cell & (_counts_of(adata, gene) >= 1)
        return np.zeros(n, dtype=bool)

    adata.obs["cd19_rna"] = _rna_positive("CD19")
    adata.obs["cd20_rna"] = _rna_positive("MS4A1")
    # Per-marker counts only from protein: None = not measured in this sample.
    cd19 = b_cell & protein["CD19"] if "CD19" in protein else None
    cd20 = b_cell & protein["CD20"] if "CD20" in protein else None
    for column, calls in (("cd19_pos", cd19), ("cd20_pos", cd20)):
        if calls is not None:
            adata.obs[column] = calls

    t_cells = int((cell_type == "T").sum())
    car_count: int | None = None
    car_feature = scfg.get("car_feature")
    if car_feature:
        if car_feature not in adata.var_names:
            raise InputError(f"scrna.car_feature {car_feature!r} is not a feature of this "
                             "sample; check the CAR transcript name of the product",
                             sample_id=sample_id)
        car = (cell_type == "T") & (_counts_of(adata, car_feature)
                                    >= float(acfg["car_min_counts"])) if n else \
            np.zeros(0, dtype=bool)
        adata.obs["car_t"] = car
        car_count = int(car.sum())

    if events_total is None:
        events_total = int(adata.uns.get("source", {}).get("cells", n))
    row: dict[str, Any] = {
        "sample_id": sample_id, "modality": "scrna", "events_total": int(events_total),
        "events_qc_pass": n,
        "lymphocytes": int(np.isin(cell_type, LYMPHOCYTE_TYPES).sum()),
        "t_cells": t_cells, "b_cells": int(b_cell.sum()),
        "cd19_pos": "" if cd19 is None else int(cd19.sum()),
        "cd20_pos": "" if cd20 is None else int(cd20.sum()),
        "cd19neg_cd20pos": "" if cd19 is None or cd20 is None else int((cd20 & ~cd19).sum()),
        # A subset this sample cannot resolve is empty (not measured), as in flow, so that
        # its cells are not reported as a measured zero.
        **{f"{s}_count": "" if s in not_called else int((subset == s).sum())
           for s in SUBSETS},
        "subsets_not_called": ";".join(s for s in SUBSETS if s in not_called),
        "cluster_discordant_events": discordant,
        "car_t_count": "" if car_count is None else car_count,
        "car_t_pct_t": "" if car_count is None or t_cells == 0
        else round(100.0 * car_count / t_cells, 4),
    }
    adata.uns["annotation"] = {
        "call": "cluster" if use_cluster else "cell", "populations_scored": populations,
        "missing_genes": missing, "protein_used": sorted(protein),
        "subsets_not_called": row["subsets_not_called"],
        "lymphocytes": "T, B and NK cells that passed QC",
    }
    return adata, row


def cli_annotate_scrna(args: argparse.Namespace) -> None:
    """``bcellmap annotate-scrna``: mapped h5ad -> annotated h5ad and counts table."""
    import anndata as ad

    from ._io import write_h5ad, write_tsv
    from .config import load_config
    from .samplesheet import read_sample_sheet, sample_row

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    sample_row(sheet, args.sample_id, path=args.samples)
    try:
        adata = ad.read_h5ad(args.input)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types
        raise InputError(f"cannot be read as h5ad ({exc})", path=args.input,
                         sample_id=args.sample_id) from exc
    annotated, row = annotate_scrna(adata, config=config, sample_id=args.sample_id)
    write_h5ad(annotated, args.out)
    write_tsv(pd.DataFrame([row], columns=list(COUNT_COLUMNS)), args.counts)
    log.info("sample %s: %d cells, %d lymphocytes, %d B cells", args.sample_id,
             row["events_qc_pass"], row["lymphocytes"], row["b_cells"])
