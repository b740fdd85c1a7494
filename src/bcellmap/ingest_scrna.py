"""Ingest of one single-cell RNA sample: read, CITE-seq protein, QC, normalise -> h5ad.

Output AnnData (``results/scrna/{sample_id}.h5ad``), the scRNA counterpart of the flow AnnData:

- one row per cell (droplet barcode) of the source, in source order, QC failures included;
  ``obs["event_index"]`` is its row in the source;
- ``layers["counts"]``: raw UMI counts (float32 CSR); ``X``: ``log1p`` of counts normalised to
  ``scrna.normalise.target_sum`` per cell (scanpy); ``var["highly_variable"]`` from scanpy's
  ``seurat`` flavour on the QC-passed cells; ``var["mito"]``;
- QC columns as flow: ``qc_min_counts``, ``qc_min_genes``, ``qc_mito``, ``qc_doublet`` (True =
  removed by that step), ``qc_pass``, ``qc_reason`` (first failing step or ``pass``), plus
  ``n_counts``, ``n_genes``, ``pct_mito`` and ``doublet_score`` (NaN where scrublet did not run);
- CITE-seq: ``obsm["protein"]`` (CLR-normalised antibody counts of the configured markers found),
  ``obsm["protein_counts"]`` (raw), ``uns["protein_names"]`` (canonical names, column order);
- ``uns["sample"]``, ``uns["source"]``, ``uns["qc"]``.

QC steps are sequential for counting (``min_counts``, ``min_genes``, ``mito``, ``doublets``):
scrublet (``scanpy.pp.scrublet``, exact sklearn neighbours, seeded) runs on the cells that
passed the first three steps. The QC table has the flow columns.

Input must hold raw counts (``X`` or ``layers["counts"]`` of an .h5ad); log-normalised input
is refused unless ``scrna.input_normalised`` is true, in which case ``X`` is kept as given,
``layers["counts"]`` is absent and the count-based steps (``min_counts``, doublets) are skipped.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

QC_STEPS = ("min_counts", "min_genes", "mito", "doublets")
_QC_COLUMN = {"min_counts": "qc_min_counts", "min_genes": "qc_min_genes", "mito": "qc_mito",
              "doublets": "qc_doublet"}


def _is_integer_valued(matrix: Any) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return True
    sample = values[: 1_000_000]
    return bool(np.all(sample >= 0) and np.all(np.equal(np.mod(sample, 1), 0)))


def read_scrna(path: str | Path, *, sample_id: str | None = None,
               input_normalised: bool = False):
    """Read a 10x .h5, a 10x matrix folder or an .h5ad into an AnnData of raw counts.

    Parameters
    ----------
    path
        Cell Ranger ``.h5``, a folder with ``matrix.mtx(.gz)``, ``barcodes``, ``features``
        (or ``genes``), or an ``.h5ad`` with counts in ``layers["counts"]`` or ``X``.
    sample_id
        For error messages.
    input_normalised
        Accept a log-normalised ``.h5ad`` (``X`` kept as is, ``uns["input_normalised"]``).

    Returns
    -------
    AnnData with float32 CSR ``X`` (counts, or the normalised values when accepted) and
    ``var["feature_types"]`` (``Gene Expression`` where the file does not say).

    Raises
    ------
    InputError
        Unreadable or unknown format, no cells or features, or non-count values.
    """
    import anndata as ad
    import scanpy as sc

    path = Path(path)
    try:
        if path.is_dir():
            adata = sc.read_10x_mtx(path, var_names="gene_symbols", gex_only=False)
        elif path.suffix == ".h5":
            adata = sc.read_10x_h5(path, gex_only=False)
        elif path.suffix == ".h5ad":
            adata = ad.read_h5ad(path)
            if "counts" in adata.layers:
                adata.X = adata.layers["counts"]
            adata.layers.clear()
        else:
            raise InputError("unknown scRNA format: expected a 10x .h5, a 10x matrix folder or "
                             "an .h5ad", path=path, sample_id=sample_id)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - readers raise many types; report them as input
        raise InputError(f"cannot be read as scRNA counts ({type(exc).__name__}: {exc})",
                         path=path, sample_id=sample_id) from exc
    if adata.n_vars == 0:
        raise InputError("no features (genes) in the file", path=path, sample_id=sample_id)
    if adata.X is None:
        raise InputError("no count matrix (X is empty and there is no layers['counts'])",
                         path=path, sample_id=sample_id)
    adata.var_names_make_unique()
    if "feature_types" not in adata.var:
        adata.var["feature_types"] = "Gene Expression"
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.eliminate_zeros()  # stored zeros would count as detected genes
    adata.uns["input_normalised"] = False
    if not _is_integer_valued(adata.X):
        if not input_normalised:
            raise InputError(
                "values are not integer counts (looks log-normalised); give raw counts in X or "
                "layers['counts'], or set scrna.input_normalised: true to accept it",
                path=path, sample_id=sample_id)
        adata.uns["input_normalised"] = True
    elif input_normalised and adata.n_obs and adata.X.max() > 50:
        raise InputError("scrna.input_normalised is true but the values are integer counts "
                         f"up to {adata.X.max():.0f}; set it to false",
                         path=path, sample_id=sample_id)
    return adata


def _protein_pattern(marker: str) -> re.Pattern[str]:
    # "CD19", "CD19_TotalSeqB", "Hu.CD19", "anti-IgD": the marker between separators,
    # so CD27 does not match CD274.
    return re.compile(rf"(^|[._\- ]){re.escape(marker)}([._\- ]|$)", re.IGNORECASE)


def clr_normalise(counts: np.ndarray, *, margin: str = "cell") -> np.ndarray:
    """Centred log-ratio of antibody counts as Seurat ``NormalizeData(method="CLR")``.

    ``log1p(x / exp(mean(log1p(x[x > 0]))))`` where the mean is taken within each cell
    (``margin="cell"``, Seurat margin=2, the usual choice for ADTs) or within each feature
    across cells (``margin="feature"``, Seurat margin=1); as in Seurat, the sum of ``log1p``
    over positive values is divided by the length of the whole vector.
    """
    counts = np.asarray(counts, dtype=np.float64)
    axis = 1 if margin == "cell" else 0
    if margin not in ("cell", "feature"):
        raise ValueError(f"margin must be 'cell' or 'feature', not {margin!r}")
    logs = np.log1p(np.where(counts > 0, counts, 0.0))
    geometric = np.exp(logs.sum(axis=axis, keepdims=True) / max(counts.shape[axis], 1))
    return np.log1p(counts / geometric).astype(np.float32)


def _split_protein(adata, *, markers: list[str], margin: str) -> tuple[np.ndarray, list[str]]:
    """Move antibody-capture features out of ``adata`` into (CLR values, canonical names)."""
    is_adt = adata.var["feature_types"].astype(str).eq("Antibody Capture").to_numpy()
    if not is_adt.any():
        return np.zeros((adata.n_obs, 0), dtype=np.float32), []
    adt_names = list(adata.var_names[is_adt])
    adt_counts = adata.X[:, is_adt].toarray()
    clr = clr_normalise(adt_counts, margin=margin)
    keep, names = [], []
    for marker in markers:
        hits = [i for i, n in enumerate(adt_names) if _protein_pattern(marker).search(n)]
        if hits:
            keep.append(hits[0])
            names.append(marker)
    adata._inplace_subset_var(~is_adt)
    adata.obsm["protein_counts"] = adt_counts[:, keep].astype(np.float32)
    return clr[:, keep], names


def _scrublet_scores(counts: sp.csr_matrix, *, config: dict[str, Any], seed: int
                     ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Doublet scores and calls of scanpy's scrublet with exact (sklearn) neighbours.

    pynndescent 0.7 breaks with scipy 1.17 from 8,192 cells (``csr_array.getnnz``), and
    scrublet's manifold holds observed plus simulated cells, so the exact path is forced.
    """
    import anndata as ad
    import scanpy as sc

    settings = config["scrna"]["qc"]["doublets"]
    if settings["threshold"] is None:
        try:
            import skimage  # noqa: F401 - scrublet's automatic threshold needs it
        except ImportError:
            raise ConfigError("scrna.qc.doublets.threshold is null (automatic), which needs "
                              "scikit-image; install it or set a threshold such as 0.25"
                              ) from None
    tmp = ad.AnnData(X=counts.copy())
    sc.pp.scrublet(tmp, expected_doublet_rate=float(settings["expected_rate"]),
                   threshold=settings["threshold"], random_state=seed,
                   use_approx_neighbors=False, verbose=False)
    scores = tmp.obs["doublet_score"].to_numpy(dtype=float)
    threshold = tmp.uns["scrublet"].get("threshold")
    if threshold is None or not np.isfinite(threshold):
        log.warning("scrublet found no doublet-score threshold; no cell removed as doublet")
        return scores, np.zeros(len(scores), dtype=bool), None
    return scores, scores > threshold, float(threshold)


def run_qc(adata, *, config: dict[str, Any], sample_id: str) -> pd.DataFrame:
    """Flag cells that fail QC in ``adata.obs`` and return the per-sample QC table.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or normalised values when ``uns["input_normalised"]``).
    config
        Merged config (``scrna.qc``, ``scrna.mito_prefix``, ``seed``).
    sample_id
        Written into the QC table.
    """
    qc = config["scrna"]["qc"]
    normalised_input = bool(adata.uns.get("input_normalised", False))
    mito = adata.var_names.str.startswith(config["scrna"]["mito_prefix"])
    adata.var["mito"] = mito
    X = adata.X
    n_counts = np.asarray(X.sum(axis=1)).ravel()
    n_genes = np.diff(X.indptr)  # X is CSR without stored zeros (read_scrna)
    mito_counts = np.asarray(X[:, mito].sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        pct_mito = np.where(n_counts > 0, 100.0 * mito_counts / n_counts, 0.0)
    adata.obs["n_counts"] = n_counts.astype(np.float32)
    adata.obs["n_genes"] = n_genes.astype(np.int32)
    adata.obs["pct_mito"] = pct_mito.astype(np.float32)
    adata.obs["doublet_score"] = np.nan

    alive = np.ones(adata.n_obs, dtype=bool)
    rows = []
    learned: dict[str, Any] = {}
    for step in QC_STEPS:
        failed = np.zeros(adata.n_obs, dtype=bool)
        detail = ""
        if step == "min_counts":
            if normalised_input:
                detail = "skipped: input is normalised"
            else:
                failed = n_counts < qc["min_counts"]
                detail = f"n_counts < {qc['min_counts']}"
        elif step == "min_genes":
            failed = n_genes < qc["min_genes"]
            detail = f"n_genes < {qc['min_genes']}"
        elif step == "mito":
            if normalised_input or not mito.any():
                detail = ("skipped: input is normalised" if normalised_input else
                          f"skipped: no gene starts with {config['scrna']['mito_prefix']!r}")
            else:
                failed = pct_mito > qc["max_mito_pct"]
                detail = f"pct_mito > {qc['max_mito_pct']}"
        elif step == "doublets":
            settings = qc["doublets"]
            if not settings["enabled"]:
                detail = "skipped: disabled"
            elif normalised_input:
                detail = "skipped: input is normalised"
            elif alive.sum() < settings["min_cells"]:
                detail = f"skipped: {int(alive.sum())} cells < min_cells {settings['min_cells']}"
            else:
                scores, calls, threshold = _scrublet_scores(
                    X[alive], config=config, seed=int(config["seed"]))
                adata.obs.loc[alive, "doublet_score"] = scores
                failed[alive] = calls
                learned["doublet_threshold"] = threshold
                detail = (f"scrublet score > {threshold:.3f}" if threshold is not None
                          else "scrublet: no threshold found, none removed")
        adata.obs[_QC_COLUMN[step]] = failed
        removed = int((failed & alive).sum())
        rows.append({"sample_id": sample_id, "step": step, "events_in": int(alive.sum()),
                     "events_removed": removed, "events_out": int(alive.sum()) - removed,
                     "detail": detail})
        alive &= ~failed
    adata.obs["qc_pass"] = alive
    reason = np.full(adata.n_obs, "pass", dtype=object)
    for step in reversed(QC_STEPS):
        reason[adata.obs[_QC_COLUMN[step]].to_numpy()] = step
    adata.obs["qc_reason"] = pd.Categorical(reason, categories=[*QC_STEPS, "pass"])
    adata.uns["qc"] = {"min_counts": qc["min_counts"], "min_genes": qc["min_genes"],
                       "max_mito_pct": qc["max_mito_pct"],
                       "doublets": {k: v for k, v in qc["doublets"].items() if v is not None},
                       **{k: v for k, v in learned.items() if v is not None}}
    return pd.DataFrame(rows, columns=["sample_id", "step", "events_in", "events_removed",
                                       "events_out", "detail"])


def ingest_scrna(path: str | Path, *, config: dict[str, Any], sample: dict[str, Any]):
    """Read, QC and normalise one scRNA sample.

    Parameters
    ----------
    path
        The sample's file or folder (see :func:`read_scrna`).
    config
        Merged config.
    sample
        Sample-sheet fields: sample_id, patient_id, day, modality, panel.

    Returns
    -------
    (AnnData, QC table) as described in the module docstring.
    """
    import scanpy as sc

    sample_id = str(sample["sample_id"])
    scfg = config["scrna"]
    adata = read_scrna(path, sample_id=sample_id, input_normalised=bool(scfg["input_normalised"]))
    protein, protein_names = _split_protein(adata, markers=list(scfg["protein"]["markers"]),
                                            margin=scfg["protein"]["clr_margin"])
    n_source = adata.n_obs
    adata.obs["event_index"] = np.arange(n_source, dtype=np.int64)
    qc_table = run_qc(adata, config=config, sample_id=sample_id)

    if not adata.uns["input_normalised"]:
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=float(scfg["normalise"]["target_sum"]))
        sc.pp.log1p(adata)
        adata.uns.pop("log1p", None)
    adata.var["highly_variable"] = False
    passed = adata.obs["qc_pass"].to_numpy()
    if passed.sum() >= 3:
        view = adata[passed].copy()
        sc.pp.highly_variable_genes(view, flavor="seurat",
                                    n_top_genes=min(int(scfg["hvg"]["n_top_genes"]),
                                                    adata.n_vars))
        adata.var["highly_variable"] = view.var["highly_variable"].to_numpy()
        adata.var["dispersions_norm"] = view.var["dispersions_norm"].to_numpy(dtype=np.float32)
    if protein_names:
        adata.obsm["protein"] = protein
        adata.uns["protein_names"] = protein_names
        adata.uns["protein_clr_margin"] = scfg["protein"]["clr_margin"]
    adata.uns["sample"] = {k: ("" if v is None else v) for k, v in sample.items()}
    adata.uns["source"] = {"path": str(path), "cells": int(n_source),
                           "features": int(adata.n_vars)}
    return adata, qc_table


def cli_ingest_scrna(args: argparse.Namespace) -> None:
    """``bcellmap ingest-scrna``: one sample of the sheet -> h5ad and QC table."""
    from ._io import write_h5ad, write_tsv
    from .config import load_config
    from .samplesheet import read_sample_sheet, sample_row

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples)
    row = sample_row(sheet, args.sample_id, path=args.samples)
    if row["modality"] != "scrna":
        raise InputError(f"modality is {row['modality']!r}, not 'scrna'", path=args.samples,
                         sample_id=args.sample_id)
    sample = {"sample_id": args.sample_id, "patient_id": str(row["patient_id"]),
              "day": int(row["day"]), "modality": "scrna", "panel": str(row.get("panel", ""))}
    adata, qc_table = ingest_scrna(row["path"], config=config, sample=sample)
    n_pass = int(adata.obs["qc_pass"].sum())
    if n_pass == 0:
        log.warning("sample %s: no cell passed QC", args.sample_id)
    write_tsv(qc_table, args.qc)
    write_h5ad(adata, args.out)
    log.info("sample %s: %d cells, %d passed QC", args.sample_id, adata.n_obs, n_pass)
