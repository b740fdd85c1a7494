"""``pca``, ``neighbors``, ``leiden`` and ``kmeans`` on AnnData: the package's CuPy/NumPy
kernels (``bcellmap.kernels``), with results where scanpy puts them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._apiutils import ConfigLike, record, resolve_config
from ..errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData


def _data(adata: AnnData, *, use_rep: str | None, markers: Sequence[str] | None) -> Any:
    """The rows to cluster: canonical ``markers`` of ``X``, ``obsm[use_rep]``, or ``X``."""
    import numpy as np

    if markers is not None:
        from ..flow.cluster import marker_matrix

        return marker_matrix(adata, list(markers), sample_id=(adata.uns.get("sample") or {})
                             .get("sample_id"))
    if use_rep is None:
        use_rep = "X_pca" if "X_pca" in adata.obsm else "X"
    if use_rep == "X":
        matrix = adata.X
        if hasattr(matrix, "tocsr"):
            return matrix.tocsr()
        return np.asarray(matrix)
    if use_rep not in adata.obsm:
        raise InputError(f"obsm has no {use_rep!r} (obsm keys: {', '.join(adata.obsm) or 'none'})")
    return np.asarray(adata.obsm[use_rep])


def _dense(data: Any) -> Any:
    import numpy as np

    return data.toarray() if hasattr(data, "toarray") else np.asarray(data)


def _source(use_rep: str | None, markers: Sequence[str] | None, adata: AnnData) -> str:
    if markers is not None:
        return "X[" + ",".join(markers) + "]"
    return use_rep or ("X_pca" if "X_pca" in adata.obsm else "X")


def pca(
    adata: AnnData,
    *,
    n_comps: int | None = None,
    markers: Sequence[str] | None = None,
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: ConfigLike = None,
    key_added: str = "X_pca",
    copy: bool = False,
) -> AnnData | None:
    """Principal components of ``X`` (``bcellmap.kernels.pca``: exact, dense or sparse).

    Parameters
    ----------
    adata
        Cells or events x features (e.g. scaled log-expression, or transformed flow values).
    n_comps
        Components to keep. Default: ``scrna.cluster.n_pcs`` (30), capped at the data's rank.
    markers
        Canonical flow markers of ``X`` to use instead of every column.
    device
        ``auto``, ``cpu`` or ``gpu`` (``BCELLMAP_DEVICE`` overrides it). Default: config.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    key_added
        ``obsm`` key of the scores.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obsm[key_added]``: scores;
        ``uns["pca"]``: ``variance``, ``variance_ratio``, ``components``, ``mean``.
    """
    from ..kernels.backend import get_backend
    from ..kernels.pca import pca as pca_kernel

    adata = adata.copy() if copy else adata
    cfg = resolve_config(config)
    data = _data(adata, use_rep="X", markers=markers)
    n = int(n_comps or (cfg.get("scrna", {}).get("cluster", {}).get("n_pcs", 30)))
    n = min(n, data.shape[0] - 1, data.shape[1])
    backend = get_backend(cfg, device=device)
    fitted = pca_kernel(data, n_components=n, backend=backend)
    adata.obsm[key_added] = fitted.scores
    adata.uns["pca"] = {"variance": fitted.explained_variance,
                        "variance_ratio": fitted.explained_variance_ratio,
                        "components": fitted.components, "mean": fitted.mean}
    record(adata, "pca", {"n_comps": n, "markers": None if markers is None else list(markers),
                          "key_added": key_added, "device": backend.device})
    return adata if copy else None


def neighbors(
    adata: AnnData,
    *,
    n_neighbors: int | None = None,
    use_rep: str | None = None,
    markers: Sequence[str] | None = None,
    method: Literal["exact", "approximate"] = "exact",
    weighting: Literal["umap", "binary"] = "umap",
    seed: int | None = None,
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: ConfigLike = None,
    key_added: str = "neighbors",
    copy: bool = False,
) -> AnnData | None:
    """The kNN graph of the rows (``bcellmap.kernels.knn`` and ``kernels.leiden.knn_graph``).

    Parameters
    ----------
    adata
        Cells or events.
    n_neighbors
        Neighbours per row, the row itself included (as scanpy). Default:
        ``scrna.cluster.k`` (15), at most the number of rows.
    use_rep
        ``X`` or an ``obsm`` key. Default: ``X_pca`` when present, else ``X``.
    markers
        Canonical flow markers of ``X`` to use instead (overrides ``use_rep``).
    method
        ``exact`` (brute force, CPU or GPU) or ``approximate`` (pynndescent, CPU).
    weighting
        Edge weights: ``umap`` (fuzzy simplicial set) or ``binary``.
    seed
        Seed of the approximate search. Default: the config's ``seed``.
    device
        ``auto``, ``cpu`` or ``gpu`` (``BCELLMAP_DEVICE`` overrides it). Default: config.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    key_added
        ``uns`` key of the settings; with another key than ``neighbors`` the ``obsp``
        keys are ``{key_added}_distances`` and ``{key_added}_connectivities``.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obsp["distances"]`` (kNN distances,
        CSR, self excluded), ``obsp["connectivities"]`` (symmetric weighted graph) and
        ``uns[key_added]`` (``connectivities_key``, ``distances_key``, ``params``).
    """
    import numpy as np
    import scipy.sparse as sp

    from ..kernels.backend import get_backend
    from ..kernels.knn import nearest_neighbors
    from ..kernels.leiden import knn_graph

    adata = adata.copy() if copy else adata
    cfg = resolve_config(config)
    seed = int(cfg.get("seed", 0)) if seed is None else int(seed)
    data = _data(adata, use_rep=use_rep, markers=markers)
    k = int(n_neighbors or cfg.get("scrna", {}).get("cluster", {}).get("k", 15))
    k = min(k, data.shape[0])
    backend = get_backend(cfg, device=device)
    indices, distances = nearest_neighbors(_dense(data), k=k, backend=backend, method=method,
                                           seed=seed)
    graph = knn_graph(indices, distances, weighting=weighting)
    n = indices.shape[0]
    rows = np.repeat(np.arange(n), indices.shape[1])
    keep = indices.ravel() != rows
    distance_matrix = sp.csr_matrix((distances.ravel()[keep], (rows[keep], indices.ravel()[keep])),
                                    shape=(n, n))
    prefix = "" if key_added == "neighbors" else f"{key_added}_"
    adata.obsp[f"{prefix}distances"] = distance_matrix
    adata.obsp[f"{prefix}connectivities"] = graph
    params = {"n_neighbors": k, "use_rep": _source(use_rep, markers, adata), "method": method,
              "weighting": weighting, "seed": seed, "device": backend.device}
    adata.uns[key_added] = {"connectivities_key": f"{prefix}connectivities",
                            "distances_key": f"{prefix}distances", "params": params}
    record(adata, "neighbors", {**params, "key_added": key_added})
    return adata if copy else None


def leiden(
    adata: AnnData,
    *,
    resolution: float | None = None,
    seed: int | None = None,
    n_iterations: int = -1,
    neighbors_key: str = "neighbors",
    key_added: str = "leiden",
    config: ConfigLike = None,
    copy: bool = False,
) -> AnnData | None:
    """Leiden clusters of the kNN graph of :func:`neighbors` (``bcellmap.kernels.leiden``).

    Parameters
    ----------
    adata
        An AnnData with a graph from :func:`neighbors`.
    resolution
        Modularity resolution. Default: ``scrna.cluster.resolution`` (1.0).
    seed
        Seed of igraph's generator for this call. Default: the config's ``seed``.
    n_iterations
        Leiden iterations; negative: until the partition stops improving.
    neighbors_key
        ``uns`` key of the graph's settings (as :func:`neighbors` wrote them).
    key_added
        ``obs`` column (and ``uns`` key) of the clusters.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obs[key_added]``: categorical cluster
        labels ``"0"``, ``"1"``, ... numbered by decreasing size; ``uns[key_added]``:
        ``params``.
    """
    import pandas as pd

    from ..kernels.leiden import leiden_partition

    adata = adata.copy() if copy else adata
    cfg = resolve_config(config)
    seed = int(cfg.get("seed", 0)) if seed is None else int(seed)
    if resolution is None:
        resolution = float(cfg.get("scrna", {}).get("cluster", {}).get("resolution", 1.0))
    settings = adata.uns.get(neighbors_key)
    if not settings or settings.get("connectivities_key") not in adata.obsp:
        raise InputError(f"no kNN graph under uns[{neighbors_key!r}]: run "
                         "bcellmap.tl.neighbors first")
    labels = leiden_partition(adata.obsp[settings["connectivities_key"]],
                              resolution=float(resolution), seed=seed,
                              n_iterations=int(n_iterations))
    categories = [str(c) for c in range(int(labels.max()) + 1)] if labels.size else []
    adata.obs[key_added] = pd.Categorical([str(c) for c in labels], categories=categories)
    params = {"resolution": float(resolution), "seed": seed, "n_iterations": int(n_iterations),
              "neighbors_key": neighbors_key}
    adata.uns[key_added] = {"params": params}
    record(adata, "leiden", {**params, "key_added": key_added})
    return adata if copy else None


def kmeans(
    adata: AnnData,
    *,
    n_clusters: int,
    use_rep: str | None = None,
    markers: Sequence[str] | None = None,
    seed: int | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: ConfigLike = None,
    key_added: str = "kmeans",
    copy: bool = False,
) -> AnnData | None:
    """k-means clusters of the rows (``bcellmap.kernels.kmeans``: k-means++ then Lloyd).

    Parameters
    ----------
    adata
        Cells or events.
    n_clusters
        Number of clusters.
    use_rep
        ``X`` or an ``obsm`` key. Default: ``X_pca`` when present, else ``X``.
    markers
        Canonical flow markers of ``X`` to use instead (overrides ``use_rep``).
    seed
        Seed of the k-means++ draws. Default: the config's ``seed``.
    max_iter
        Most Lloyd iterations.
    tol
        Convergence tolerance (scikit-learn's definition).
    device
        ``auto``, ``cpu`` or ``gpu`` (``BCELLMAP_DEVICE`` overrides it). Default: config.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    key_added
        ``obs`` column (and ``uns`` key) of the clusters.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obs[key_added]``: categorical cluster
        labels; ``uns[key_added]``: ``centres``, ``inertia``, ``n_iter``, ``params``.
    """
    import numpy as np
    import pandas as pd

    from ..kernels.backend import get_backend
    from ..kernels.kmeans import kmeans as kmeans_kernel

    adata = adata.copy() if copy else adata
    cfg = resolve_config(config)
    seed = int(cfg.get("seed", 0)) if seed is None else int(seed)
    data = np.asarray(_dense(_data(adata, use_rep=use_rep, markers=markers)))
    backend = get_backend(cfg, device=device)
    result = kmeans_kernel(data, n_clusters=int(n_clusters), backend=backend, seed=seed,
                           max_iter=int(max_iter), tol=float(tol))
    adata.obs[key_added] = pd.Categorical([str(c) for c in result.labels],
                                          categories=[str(c) for c in range(int(n_clusters))])
    params = {"n_clusters": int(n_clusters), "use_rep": _source(use_rep, markers, adata),
              "seed": seed, "max_iter": int(max_iter), "tol": float(tol),
              "device": backend.device}
    adata.uns[key_added] = {"centres": result.centres, "inertia": float(result.inertia),
                            "n_iter": int(result.n_iter), "params": params}
    record(adata, "kmeans", {**params, "key_added": key_added})
    return adata if copy else None
