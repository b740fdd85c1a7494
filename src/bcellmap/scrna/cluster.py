"""Cohort clustering of scRNA samples: train PCA + exact kNN + Leiden, then map every cell.

Train (:func:`train_scrna_cohort`, the ``bcellmap train-scrna`` step; cohort-wide,
bounded): a seeded subsample of at most ``scrna.cluster.cells_per_sample`` QC-passed cells per
sample (read lazily from the ingested h5ad files), the ``scrna.cluster.n_genes`` genes most
often highly variable across samples (present in every sample; ties broken by mean normalised
dispersion), each gene scaled to unit variance over the pooled subsample (scanpy's
``pp.scale`` without clipping, so the matrix stays sparse and memory stays bounded; the samples'
blocks are scaled in place and never stacked), PCA
(:mod:`bcellmap.kernels.pca`), exact kNN and Leiden (:mod:`bcellmap.kernels.knn`,
:mod:`bcellmap.kernels.leiden`) through :mod:`bcellmap.kernels.backend` (GPU when available).
The model NPZ holds what mapping needs: ``genes``, ``gene_mean``, ``gene_scale`` (the HVG
means and scales), ``components`` (PCA loadings), ``pca_mean``, ``embedding`` (training PCA
scores), ``labels`` (training Leiden clusters), ``explained_variance_ratio``, ``train_sample``
and ``train_event_index``.

Map (:func:`map_scrna`, the ``bcellmap map-scrna`` step; per sample): every QC-passed cell
is scaled with the model's means and scales (model genes missing from the sample count as zero
expression, logged), projected on the loadings, and labelled by majority vote of its
``scrna.cluster.transfer_k`` nearest training cells in PCA space (ties to the nearer
neighbours). Output: the QC-passed cells of the ingested AnnData with ``obs["leiden"]`` (int),
``obs["leiden_confidence"]`` (share of votes) and ``obsm["X_pca"]``. A sample with no
QC-passed cell gives a valid, empty AnnData.

CITE-seq protein gates (``train-scrna --protein-thresholds``, cohort-wide like the model):
:func:`learn_scrna_protein_thresholds` pools a seeded subsample of at most
``scrna.protein.cells_per_sample`` QC-passed cells of every sample with protein and learns
each gate inside its parent population (:func:`bcellmap.scrna.annotate.learn_protein_thresholds`);
``annotate-scrna`` applies the same gates to every sample. A sample whose protein lacks CD3,
or both CD19 and CD20, gets its per-cell RNA call on the subsample for that parent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..contracts import sample_rng, subsample_indices
from ..errors import InputError

log = logging.getLogger(__name__)


def cluster_scaled(data: Any, *, n_pcs: int, k: int, resolution: float, seed: int,
                   backend) -> tuple[Any, np.ndarray]:
    """PCA, exact kNN graph and Leiden clusters of already scaled expression.

    Parameters
    ----------
    data
        ``(n, genes)`` dense array or CSR matrix (scaled log-expression), or a list of such
        row blocks (one per sample), taken as stacked in order.
    n_pcs, k, resolution, seed
        PCA axes, neighbours (self included, as scanpy's ``n_neighbors``), Leiden resolution
        and seed.
    backend
        :class:`bcellmap.kernels.backend.Backend`.

    Returns
    -------
    (:class:`bcellmap.kernels.pca.PCAResult`, int64 Leiden cluster per row)
    """
    from ..kernels.leiden import cluster_leiden
    from ..kernels.pca import pca, stacked_shape

    n_rows, n_genes = stacked_shape(data)
    n_pcs = min(n_pcs, n_rows - 1, n_genes)
    fitted = pca(data, n_components=n_pcs, backend=backend)
    labels = cluster_leiden(fitted.scores, k=min(k, n_rows), resolution=resolution,
                            seed=seed, backend=backend)
    return fitted, labels


class _IngestedSample:
    """One ingested sample h5ad, read in parts (h5py): obs, var and ``uns`` entries at once,
    rows of ``X`` and the protein only when asked.

    anndata's backed mode would load every layer (the raw counts) and ``obsm`` entry of every
    sample, which cohort training never reads.
    """

    def __init__(self, path: str | Path):
        from anndata.io import read_elem

        from ..io.readers import h5ad_matrix, open_h5ad

        self.path = path
        self._handle = open_h5ad(path)
        try:
            handle = self._handle
            uns = handle["uns"] if "uns" in handle else {}
            self.sample_id = _sample_id_of(read_elem(uns["sample"]) if "sample" in uns
                                           else {}, path)
            self.obs = read_elem(handle["obs"])
            self.var = read_elem(handle["var"])
            self.protein_names = [str(n) for n in read_elem(uns["protein_names"])] \
                if "protein_names" in uns else []
            self._obsm = handle["obsm"] if "obsm" in handle else {}
            self._x = h5ad_matrix(handle["X"])
        except (KeyError, TypeError, ValueError, OSError) as exc:
            self.close()
            raise InputError(f"cannot be read as an ingested scRNA sample "
                             f"({type(exc).__name__}: {exc})", path=path) from None
        if "qc_pass" not in self.obs:
            self.close()
            raise InputError("no obs['qc_pass']: not an ingest-scrna output", path=path,
                             sample_id=self.sample_id)

    def __enter__(self) -> _IngestedSample:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    @property
    def has_protein(self) -> bool:
        return "protein" in self._obsm and bool(self.protein_names)

    def protein(self) -> np.ndarray:
        """``obsm["protein"]`` of every cell, float64."""
        from anndata.io import read_elem

        return np.asarray(read_elem(self._obsm["protein"]), dtype=np.float64)

    def rows(self, chosen: np.ndarray) -> sp.csr_matrix:
        """Rows ``chosen`` (sorted) of ``X`` as float32 CSR, read one slab at a time."""
        from ..io.readers import iter_h5ad_rows

        parts = [sp.csr_matrix(part, dtype=np.float32)
                 for part in iter_h5ad_rows(self._x, chosen)]
        if not parts:
            return sp.csr_matrix((0, self._x.shape[1]), dtype=np.float32)
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _sample_id_of(sample: Any, path: str | Path) -> str:
    """The ``sample_id`` of an ``uns["sample"]`` mapping, else the file name's stem."""
    return str(sample.get("sample_id", Path(path).stem)) if isinstance(sample, Mapping) \
        else Path(path).stem


def train_scrna(paths: Sequence[str | Path], *, config: Mapping[str, Any], backend
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit the cohort model on a bounded subsample of every sample.

    Parameters
    ----------
    paths
        Ingested sample h5ad files (``ingest-scrna`` output).
    config
        Merged config (``scrna.cluster``, ``seed``).
    backend
        Array backend.

    Returns
    -------
    (model arrays for the NPZ, info for the JSON)
    """
    ccfg = config["scrna"]["cluster"]
    seed = int(config["seed"])
    started = time.perf_counter()
    blocks, gene_lists, hvg_votes, dispersions = [], [], [], []
    sample_ids: list[str] = []
    event_index: list[np.ndarray] = []
    per_sample: dict[str, int] = {}
    for path in paths:
        with _IngestedSample(path) as sample:
            sample_id, obs, var = sample.sample_id, sample.obs, sample.var
            passed = np.flatnonzero(obs["qc_pass"].to_numpy())
            take = int(ccfg["cells_per_sample"])
            chosen = passed[subsample_indices(passed.size, take, sample_rng(seed, sample_id))]
            per_sample[sample_id] = int(chosen.size)
            genes = np.asarray(var.index, dtype=object)
            gene_lists.append(genes)
            hvg = var["highly_variable"].to_numpy(dtype=bool) if "highly_variable" in var \
                else np.zeros(len(genes), dtype=bool)
            hvg_votes.append(dict(zip(genes, hvg, strict=True)))
            disp = var["dispersions_norm"].to_numpy(dtype=float) if "dispersions_norm" in \
                var else np.zeros(len(genes))
            dispersions.append(dict(zip(genes, np.nan_to_num(disp), strict=True)))
            if chosen.size:
                blocks.append((sample.rows(chosen), genes))
                sample_ids.extend([sample_id] * chosen.size)
                event_index.append(obs["event_index"].to_numpy()[chosen]
                                   if "event_index" in obs else chosen)
    n_cells = sum(block.shape[0] for block, _ in blocks)
    if n_cells < 3:
        raise InputError(f"only {n_cells} QC-passed cells across {len(paths)} samples; "
                         "the scRNA model needs at least 3")

    common = set(gene_lists[0]).intersection(*map(set, gene_lists[1:]))
    ordered = [g for g in gene_lists[0] if g in common]
    votes = np.array([sum(v[g] for v in hvg_votes) for g in ordered], dtype=float)
    mean_disp = np.array([np.mean([d[g] for d in dispersions]) for g in ordered])
    order = np.lexsort((-mean_disp, -votes))[: int(ccfg["n_genes"])]
    genes = np.asarray(ordered, dtype=object)[np.sort(order)]

    # Aligned, scaled and reduced block by block (one per sample): the stacked matrix and
    # its scaled copy are never made, which keeps the job's memory to the blocks themselves.
    aligned = []
    while blocks:
        block, block_genes = blocks.pop(0)
        aligned.append(_align(block, block_genes, genes))
    mean, scale = _mean_scale(aligned)
    for block in aligned:
        _scale_columns_inplace(block, 1.0 / scale)
    fitted, labels = cluster_scaled(aligned, n_pcs=int(ccfg["n_pcs"]),
                                    k=int(ccfg["k"]), resolution=float(ccfg["resolution"]),
                                    seed=seed, backend=backend)
    model = {
        "genes": genes.astype(str), "gene_mean": mean, "gene_scale": scale,
        "components": fitted.components, "pca_mean": fitted.mean,
        "explained_variance": fitted.explained_variance,
        "explained_variance_ratio": fitted.explained_variance_ratio,
        "embedding": fitted.scores.astype(np.float32), "labels": labels,
        "train_sample": np.asarray(sample_ids, dtype=str),
        "train_event_index": np.concatenate(event_index).astype(np.int64),
    }
    sizes = np.bincount(labels)
    info = {
        "device": backend.device, "device_reason": backend.reason, "samples": per_sample,
        "cells": int(n_cells), "genes": int(len(genes)), "n_pcs": int(fitted.components.shape[0]),
        "explained_variance_ratio": [round(float(v), 6) for v in
                                     fitted.explained_variance_ratio],
        "clusters": int(sizes.size), "cluster_sizes": sizes.tolist(),
        "k": int(ccfg["k"]), "resolution": float(ccfg["resolution"]), "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return model, info


def _align(block: sp.csr_matrix, block_genes: np.ndarray, genes: np.ndarray) -> sp.csr_matrix:
    """Columns of ``block`` in the order of ``genes``; genes it lacks are zero columns.

    ``block`` itself comes back when its genes are already ``genes`` in order.
    """
    if len(block_genes) == len(genes) and np.array_equal(block_genes, genes):
        return block
    position = {g: i for i, g in enumerate(genes)}
    target = np.array([position.get(g, -1) for g in block_genes], dtype=np.int64)
    column = target[block.indices]
    keep = column >= 0
    row = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[keep]
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=block.shape[0]), out=indptr[1:])
    out = sp.csr_matrix((block.data[keep].astype(np.float32, copy=False),
                         column[keep].astype(np.int32), indptr),
                        shape=(block.shape[0], len(genes)))
    out.sort_indices()
    return out


def _mean_scale(blocks: Sequence[sp.csr_matrix]) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (ddof=1, as scanpy) of the stacked row blocks.

    Sums in float64; zero deviations become 1.
    """
    n = sum(block.shape[0] for block in blocks)
    width = blocks[0].shape[1]
    sums = np.zeros(width)
    sums_sq = np.zeros(width)
    for block in blocks:
        values = block.data.astype(np.float64)
        sums += np.bincount(block.indices, weights=values, minlength=width)
        sums_sq += np.bincount(block.indices, weights=values * values, minlength=width)
    mean = sums / n
    var = np.maximum(sums_sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    scale = np.sqrt(var)
    scale[scale == 0] = 1.0
    return mean, scale


def _scale_columns_inplace(block: sp.csr_matrix, factor: np.ndarray) -> None:
    """Multiply each column of ``block`` by ``factor`` in place (sparsity unchanged)."""
    block.data *= factor[block.indices].astype(block.data.dtype, copy=False)


def transfer_labels(query: np.ndarray, embedding: np.ndarray, labels: np.ndarray, *, k: int,
                    backend) -> tuple[np.ndarray, np.ndarray]:
    """Majority label of the ``k`` nearest training cells (ties to the nearer neighbours).

    Returns
    -------
    (int64 label, share of the k votes for it) per query row.
    """
    from ..kernels.knn import nearest_neighbors

    if query.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    k = min(k, embedding.shape[0])
    indices, _ = nearest_neighbors(embedding, query=query, k=k, backend=backend)
    neighbour_labels = labels[indices]
    n_labels = int(labels.max()) + 1
    votes = np.zeros((query.shape[0], n_labels))
    # A vote is 1 minus a tiny rank penalty, so a tie goes to the label of nearer cells.
    weights = 1.0 - 1e-6 * np.arange(k)[None, :]
    np.add.at(votes, (np.repeat(np.arange(query.shape[0]), k), neighbour_labels.ravel()),
              np.broadcast_to(weights, neighbour_labels.shape).ravel())
    winner = votes.argmax(axis=1)
    share = (neighbour_labels == winner[:, None]).mean(axis=1)
    return winner.astype(np.int64), share


def map_scrna(adata, model: Mapping[str, np.ndarray], *, config: Mapping[str, Any], backend,
              sample_id: str | None = None):
    """Label every QC-passed cell of one sample from the cohort model.

    Parameters
    ----------
    adata
        Ingested AnnData (all cells, ``obs["qc_pass"]``, log-normalised ``X``).
    model
        Arrays of the model NPZ.
    config
        Merged config (``scrna.cluster.transfer_k``).
    backend
        Array backend.
    sample_id
        For messages.

    Returns
    -------
    The QC-passed cells with ``obs["leiden"]``, ``obs["leiden_confidence"]``, ``obsm["X_pca"]``.
    """
    if "qc_pass" not in adata.obs:
        raise InputError("no obs['qc_pass']: not an ingest-scrna output", sample_id=sample_id)
    mapped = adata[adata.obs["qc_pass"].to_numpy()].copy()
    genes = np.asarray(model["genes"], dtype=object)
    missing = int((~np.isin(genes, np.asarray(mapped.var_names, dtype=object))).sum())
    if missing:
        log.warning("sample %s: %d of %d model genes are absent; counted as zero expression",
                    sample_id, missing, len(genes))
    # A copy: the scaling below is in place and mapped.X keeps the cells' expression.
    scaled = _align(sp.csr_matrix(mapped.X, dtype=np.float32, copy=True),
                    np.asarray(mapped.var_names, dtype=object), genes)
    _scale_columns_inplace(scaled, 1.0 / model["gene_scale"])
    if mapped.n_obs:
        from ..kernels.pca import PCAResult

        fitted = PCAResult(scores=np.zeros((0, model["components"].shape[0])),
                           components=model["components"],
                           explained_variance=model["explained_variance"],
                           explained_variance_ratio=model["explained_variance_ratio"],
                           mean=model["pca_mean"])
        scores = fitted.transform(scaled, backend=backend)
    else:
        scores = np.zeros((0, model["components"].shape[0]))
    labels, share = transfer_labels(scores, model["embedding"].astype(np.float64),
                                    model["labels"], k=int(config["scrna"]["cluster"]
                                                           ["transfer_k"]), backend=backend)
    mapped.obs["leiden"] = labels
    mapped.obs["leiden_confidence"] = share.astype(np.float32)
    mapped.obsm["X_pca"] = scores.astype(np.float32)
    mapped.uns["model_genes_missing"] = missing
    return mapped


def learn_scrna_protein_thresholds(paths: Sequence[str | Path], *, config: Mapping[str, Any]):
    """Learn the cohort's CITE-seq protein gates on an equal-sized subsample of every sample.

    Parameters
    ----------
    paths
        Ingested sample h5ad files (``ingest-scrna`` output); samples without
        ``obsm["protein"]`` are skipped.
    config
        Merged config (``scrna.protein``, ``scrna.annotate``, ``seed``).

    Returns
    -------
    pandas.DataFrame
        ``annotate_scrna.PROTEIN_THRESHOLD_COLUMNS``, one row per protein (empty without any
        CITE-seq sample).
    """
    import anndata as ad

    from .annotate import _protein_settings, learn_protein_thresholds, rna_cell_calls

    seed = int(config["seed"])
    take = int(_protein_settings(config)["cells_per_sample"])
    samples = []
    for path in paths:
        with _IngestedSample(path) as sample:
            sample_id, names = sample.sample_id, sample.protein_names
            if not sample.has_protein:
                continue
            passed = np.flatnonzero(sample.obs["qc_pass"].to_numpy())
            # A stream of its own (not the clustering subsample's): the sizes are independent.
            chosen = passed[subsample_indices(passed.size, take,
                                              sample_rng(seed, sample_id, stream=1))]
            protein = sample.protein()[chosen]
            columns = {name: protein[:, j] for j, name in enumerate(names)}
            rna = None
            if chosen.size and ("CD3" not in names or not {"CD19", "CD20"} & set(names)):
                subsample = ad.AnnData(X=sample.rows(chosen), var=sample.var[[]].copy())
                rna = rna_cell_calls(subsample, config=config, sample_id=sample_id)
        if chosen.size:
            samples.append((sample_id, columns, rna))
            log.info("sample %s: %d of %d QC-passed cells pooled for the protein gates",
                     sample_id, chosen.size, passed.size)
    if not samples:
        log.info("no sample has CITE-seq protein; no protein gate learned")
    return learn_protein_thresholds(samples, config=config, pool="cohort")


def _json_number(value: Any) -> float | None:
    value = float(value)
    return round(value, 6) if np.isfinite(value) else None


def train_scrna_cohort(paths: Sequence[str | Path], *, config: Mapping[str, Any], backend,
                       protein_thresholds: bool = False
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any], Any]:
    """The ``train-scrna`` step: the cohort model and (optionally) the CITE-seq protein gates.

    Parameters
    ----------
    paths
        Ingested sample h5ad files (``ingest-scrna`` output); used in sorted order, so the
        model does not depend on the order they are given in.
    config
        Merged config (``scrna``, ``seed``).
    backend
        Array backend.
    protein_thresholds
        Also learn the cohort's protein gates (:func:`learn_scrna_protein_thresholds`) and
        summarise them in the info.

    Returns
    -------
    (model arrays for the NPZ, info for the JSON, protein gates table or None)
    """
    paths = sorted(str(p) for p in paths)
    model, info = train_scrna(paths, config=config, backend=backend)
    gates = None
    if protein_thresholds:
        gates = learn_scrna_protein_thresholds(paths, config=config)
        info["protein_gates"] = {str(r["marker"]): {"parent": r["parent"],
                                                    "threshold": _json_number(r["threshold"]),
                                                    "method": r["method"],
                                                    "n_events": int(r["n_events"])}
                                 for r in gates.to_dict("records")}
        info["protein_gate_flags"] = [f for f in gates["flag"] if f]
    log.info("scRNA model: %d cells, %d genes, %d clusters on %s", info["cells"], info["genes"],
             info["clusters"], info["device"])
    return model, info, gates


def load_scrna_model(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a scRNA model NPZ written by ``train-scrna``.

    Raises
    ------
    InputError
        The file is missing or cannot be read.
    """
    try:
        with np.load(path, allow_pickle=False) as handle:
            return {key: handle[key] for key in handle.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the scRNA model ({exc})", path=path) from exc


def scrna_sample_id(adata, path: str | Path) -> str:
    """The sample id in ``uns["sample"]``, else the file name's stem."""
    return _sample_id_of(adata.uns.get("sample", {}), path)
