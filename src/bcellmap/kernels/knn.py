"""k-nearest neighbours: exact (chunked matrix products and partial sorting) or approximate.

Exact search computes squared Euclidean distances of a chunk of queries to all reference rows
as ``||q||^2 - 2 q.x + ||x||^2`` (float64, one matrix product per chunk sized by the memory
budget), keeps the ``k`` smallest with ``argpartition`` and sorts only those. On the CPU it
calls scikit-learn's brute-force ``NearestNeighbors`` by default: its ArgKmin kernel fuses the
distance and the selection in parallel compiled code (faster than NumPy's argpartition over
the full distance block); the array kernel runs on the GPU and is tested on the CPU too.

``method="approximate"`` uses pynndescent (CPU only; it compiles with numba on first use in
every process, so it is imported lazily). Measured recall against exact search (50,000 x 50
Gaussian mixture, k=15): see ``benchmarks/clustering.py`` and the module constant
:data:`APPROXIMATE_RECALL_NOTE`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend, check_finite

APPROXIMATE_RECALL_NOTE = (
    "pynndescent recall@15 measured on a 50,000 x 50 Gaussian mixture (20 components, "
    "benchmarks/clustering.py --knn-recall): 0.867, default NNDescent parameters"
)


def nearest_neighbors(
    data: Any,
    *,
    k: int,
    backend: Backend,
    query: Any = None,
    method: str = "exact",
    seed: int = 0,
    use_sklearn: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the ``k`` nearest reference rows of every query row (Euclidean).

    Parameters
    ----------
    data
        ``(n, d)`` reference rows (host or device).
    k
        Neighbours per query, at most ``n``.
    backend
        Array backend and memory budget.
    query
        ``(m, d)`` query rows; None: the reference rows themselves (each row is then its own
        first neighbour, at distance 0, as scikit-learn's ``kneighbors(X)``).
    method
        ``exact`` or ``approximate`` (pynndescent, CPU only, ``query`` must be None).
    seed
        Seed of the approximate search.
    use_sklearn
        Exact search on the CPU via scikit-learn. None: yes on the CPU backend.

    Returns
    -------
    indices, distances
        ``(m, k)`` int64 neighbour rows and float64 Euclidean distances, nearest first (host).

    Raises
    ------
    ValueError
        ``k`` outside ``1..n``, NaN or infinite values, mismatched widths, an unknown method.
    """
    n = data.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} neighbours asked for among {n} rows; it must be in 1..{n}")
    check_finite(backend, data, what="kNN reference data")
    if query is not None:
        if query.shape[1] != data.shape[1]:
            raise ValueError(f"query has {query.shape[1]} columns, the data {data.shape[1]}")
        check_finite(backend, query, what="kNN queries")
    if method == "approximate":
        if query is not None:
            raise ValueError("approximate kNN supports the reference rows as queries only")
        return _knn_pynndescent(backend.to_host(data), k=k, seed=seed)
    if method != "exact":
        raise ValueError(f"kNN method {method!r} is not 'exact' or 'approximate'")
    if use_sklearn is None:
        use_sklearn = not backend.is_gpu
    if use_sklearn and not backend.is_gpu:
        from sklearn.neighbors import NearestNeighbors

        reference = np.asarray(data)
        model = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference)
        distances, indices = model.kneighbors(reference if query is None else np.asarray(query))
        return indices.astype(np.int64), distances.astype(np.float64)
    return _knn_exact_xp(data, data if query is None else query, k=k, backend=backend)


def _knn_exact_xp(data: Any, query: Any, *, k: int, backend: Backend
                  ) -> tuple[np.ndarray, np.ndarray]:
    xp = backend.xp
    reference = backend.asarray(data, dtype=np.float64)  # moved once
    reference_sq = (reference**2).sum(axis=1)
    n, m = reference.shape[0], query.shape[0]
    indices = np.empty((m, k), dtype=np.int64)
    distances = np.empty((m, k), dtype=np.float64)
    # Per query row: the distance block plus argpartition's index and scratch copies.
    for rows in backend.chunks(m, bytes_per_row=4 * n * 8 + 2 * k * query.shape[1] * 8):
        chunk = backend.asarray(query[rows], dtype=np.float64)
        block = chunk @ reference.T
        block *= -2.0
        block += reference_sq[None, :]
        block += (chunk**2).sum(axis=1)[:, None]
        if k < n:
            candidates = xp.argpartition(block, k - 1, axis=1)[:, :k]
        else:
            candidates = xp.broadcast_to(xp.arange(n)[None, :], block.shape).copy()
        # Exact distances of the k kept candidates, by differences: no cancellation, and the
        # same bits whatever the chunking (the product above is only used to select).
        candidate_d2 = ((reference[candidates] - chunk[:, None, :]) ** 2).sum(axis=2)
        # Sort the k candidates by distance, ties by row number (as a stable brute force).
        by_index = xp.argsort(candidates, axis=1)
        candidates = xp.take_along_axis(candidates, by_index, axis=1)
        candidate_d2 = xp.take_along_axis(candidate_d2, by_index, axis=1)
        # CuPy's argsort is always stable and takes no kind.
        if backend.is_gpu:
            by_distance = xp.argsort(candidate_d2, axis=1)
        else:
            by_distance = xp.argsort(candidate_d2, axis=1, kind="stable")
        indices[rows] = backend.to_host(xp.take_along_axis(candidates, by_distance, axis=1))
        distances[rows] = np.sqrt(np.maximum(
            backend.to_host(xp.take_along_axis(candidate_d2, by_distance, axis=1)), 0.0))
    return indices, distances


def _knn_pynndescent(data: np.ndarray, *, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pynndescent import NNDescent  # lazy: numba compiles on first use in every process

    index = NNDescent(np.asarray(data, dtype=np.float32), n_neighbors=k, metric="euclidean",
                      random_state=seed, n_jobs=1)
    indices, distances = index.neighbor_graph
    return indices.astype(np.int64), distances.astype(np.float64)
