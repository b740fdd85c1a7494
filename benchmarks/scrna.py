"""Benchmark: bcellmap's scRNA clustering (PCA + exact kNN + Leiden) against scanpy's
``pp.pca`` + ``pp.neighbors`` + ``tl.leiden`` on the same simulated data, in one run.

The data are simulated visits of :mod:`bcellmap.demo.simulate_scrna` (gamma-Poisson counts with
T, NK, monocyte, DC and B populations), pooled, normalised (``normalize_total`` + ``log1p``)
and scaled once with scanpy; both tools get the same dense scaled matrix. Each tool runs in its
own child process (spawned), so its peak resident memory is measured alone; wall times cover
the clustering calls only (not the imports). Printed: seconds per step, the ratio
scanpy / bcellmap (> 1: bcellmap is faster), peak RSS, explained variance of both PCAs, and the
adjusted Rand index between the two clusterings and against the simulated cell types.

scanpy's neighbours use its ``sklearn`` transformer (exact, as bcellmap's): its default from
4,096 cells, pynndescent 0.7.0, fails with scipy 1.17 from 8,192 cells
(``'csr_array' object has no attribute 'getnnz'``).

Usage::

    python benchmarks/scrna.py --cells 100000 --genes 2000 [--device gpu] [--resolution 1.0]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _simulate(cells: int, genes: int, seed: int, workdir: Path) -> tuple[Path, np.ndarray]:
    """Pooled, normalised, scaled simulated cells -> .npy path and truth cell types."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    from bcellmap.demo.simulate_scrna import simulate_scrna_visits

    per_visit = 10_000
    n_visits = max(1, int(np.ceil(cells / per_visit)))
    patients = [f"P{i:02d}" for i in range(int(np.ceil(n_visits / 2)))]
    rows = simulate_scrna_visits(workdir / "sim", patients=patients, seed=seed,
                                 cells_per_sample=min(per_visit, cells), n_genes=genes,
                                 days=(-7, 150), write_10x_h5=False)[:n_visits]
    blocks, truth = [], []
    for row in rows:
        adata = ad.read_h5ad(workdir / "sim" / row["path"])
        labels = pd.read_csv(workdir / "sim" / f"{row['sample_id']}.truth.tsv", sep="\t",
                             keep_default_na=False)["cell_type"].to_numpy()
        blocks.append(adata.X)
        truth.append(labels)
    adata = ad.AnnData(sp.vstack(blocks, format="csr")[:cells])
    truth_labels = np.concatenate(truth)[:cells]
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.scale(adata)
    path = workdir / "scaled.npy"
    np.save(path, np.asarray(adata.X, dtype=np.float32))
    return path, truth_labels


def _run_bcellmap(path: str, n_pcs: int, k: int, resolution: float, seed: int, device: str,
                  queue) -> None:
    from bcellmap.kernels.backend import get_backend
    from bcellmap.kernels.knn import nearest_neighbors
    from bcellmap.kernels.leiden import knn_graph, leiden_partition
    from bcellmap.kernels.pca import pca

    data = np.load(path)
    backend = get_backend({"device": device, "memory": {"host_budget_mb": 1024,
                                                        "gpu_budget_mb": 4096}})
    times = {}
    start = time.perf_counter()
    fitted = pca(data, n_components=n_pcs, backend=backend)
    times["pca"] = time.perf_counter() - start
    start = time.perf_counter()
    indices, distances = nearest_neighbors(fitted.scores, k=k, backend=backend)
    graph = knn_graph(indices, distances)
    times["neighbors"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = leiden_partition(graph, resolution=resolution, seed=seed)
    times["leiden"] = time.perf_counter() - start
    queue.put({"times": times, "labels": labels,
               "variance": float(fitted.explained_variance_ratio.sum()),
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _run_scanpy(path: str, n_pcs: int, k: int, resolution: float, seed: int, queue) -> None:
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.load(path))
    times = {}
    start = time.perf_counter()
    sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
    times["pca"] = time.perf_counter() - start
    start = time.perf_counter()
    sc.pp.neighbors(adata, n_neighbors=k, n_pcs=n_pcs, transformer="sklearn",
                    random_state=seed)
    times["neighbors"] = time.perf_counter() - start
    start = time.perf_counter()
    sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=-1,
                 directed=False, random_state=seed)
    times["leiden"] = time.perf_counter() - start
    queue.put({"times": times, "labels": adata.obs["leiden"].astype(int).to_numpy(),
               "variance": float(adata.uns["pca"]["variance_ratio"].sum()),
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _in_child(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{target.__name__} exited with {process.exitcode}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    from sklearn.metrics import adjusted_rand_score

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--pcs", type=int, default=50)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path, truth = _simulate(args.cells, args.genes, args.seed, Path(tmp))
        print(f"data: {len(truth)} cells x {args.genes} genes, simulated and scaled in "
              f"{time.perf_counter() - start:.1f} s")
        ours = _in_child(_run_bcellmap, str(path), args.pcs, args.k, args.resolution,
                         args.seed, args.device)
        theirs = _in_child(_run_scanpy, str(path), args.pcs, args.k, args.resolution,
                           args.seed)
    print(f"{'step':<12}{'bcellmap s':>12}{'scanpy s':>12}{'scanpy/bcellmap':>18}")
    for step in ("pca", "neighbors", "leiden"):
        a, b = ours["times"][step], theirs["times"][step]
        print(f"{step:<12}{a:>12.2f}{b:>12.2f}{b / a:>18.2f}")
    total_a, total_b = sum(ours["times"].values()), sum(theirs["times"].values())
    print(f"{'total':<12}{total_a:>12.2f}{total_b:>12.2f}{total_b / total_a:>18.2f}")
    print(f"peak RSS MB: bcellmap {ours['peak_mb']:.0f} ({args.device}), "
          f"scanpy {theirs['peak_mb']:.0f}")
    print(f"explained variance ({args.pcs} PCs): bcellmap {ours['variance']:.4f}, "
          f"scanpy {theirs['variance']:.4f}")
    singlet = ~np.isin(truth, ["doublet", "low_quality"])
    print(f"clusters: bcellmap {len(np.unique(ours['labels']))}, "
          f"scanpy {len(np.unique(theirs['labels']))}; "
          f"ARI bcellmap vs scanpy {adjusted_rand_score(theirs['labels'], ours['labels']):.3f}; "
          f"ARI vs cell types: bcellmap "
          f"{adjusted_rand_score(truth[singlet], ours['labels'][singlet]):.3f}, scanpy "
          f"{adjusted_rand_score(truth[singlet], theirs['labels'][singlet]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
