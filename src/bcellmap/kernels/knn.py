"""k-nearest neighbours: exact (matrix products, then exact distances of the few kept) or
approximate.

Exact search on the CPU (:func:`_knn_exact_host`) never partially sorts a full distance row.
The reference rows are centred, cast to float32 and shuffled once; for a block of queries:

1. one product against the first ``s`` shuffled rows (a random sample) gives, per query, a
   bound ``tau``: the ``k``-th smallest of the minima of disjoint groups of that block, so at
   least ``k`` reference rows lie within ``tau`` and every true neighbour lies within
   ``tau`` (up to the float32 error bound ``eps``, below);
2. one product per further tile of reference rows, with ``-(tau + 2 eps)`` folded into the
   product as an extra column, leaves a sign test: the rows passing it (about ``k n / s``
   per query) are the candidates, the rest of the tile is never looked at again;
3. among a query's candidates, those within ``2 eps`` of the ``k``-th smallest float32 value
   are kept (``k`` and the rare near-ties), their distances are recomputed exactly in float64
   from the original rows, and sorted by distance then row.

``eps`` bounds the float32 error of every computed value (the standard ``(d + 3) u`` bound of
a dot product, times the squared norms involved, with a margin), so the result is the same
neighbour set as a float64 brute force, ties aside, and the distances are exact. Products
are the cost (half a float64 brute force's, in float32); query blocks run on threads with
BLAS on one thread each (:meth:`Backend.parallel`).

On the GPU, :func:`_knn_exact_xp` computes float64 distance blocks (one product per chunk
sized by the memory budget), keeps the ``k`` smallest with ``argpartition`` and sorts only
those. ``use_sklearn=True`` calls scikit-learn's brute-force ``NearestNeighbors`` instead.

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
        Exact search on the CPU via scikit-learn's brute force instead of
        :func:`_knn_exact_host` (same neighbours, ties aside). None: no. Ignored on the GPU.

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
    if backend.is_gpu:
        return _knn_exact_xp(data, data if query is None else query, k=k, backend=backend)
    reference = backend.to_host(data)
    queries = None if query is None else backend.to_host(query)
    if use_sklearn:
        from sklearn.neighbors import NearestNeighbors

        model = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference)
        distances, indices = model.kneighbors(reference if queries is None else queries)
        return indices.astype(np.int64), distances.astype(np.float64)
    return _knn_exact_host(reference, queries, k=k, backend=backend)


# Float32 unit roundoff, and the float32 block a thread fills per product (rows x columns).
_U32 = float(np.finfo(np.float32).eps) / 2
_QUERY_BLOCK = 512
_TILE_COLUMNS = 4096
_GROUP = 8  # reference rows per group whose minimum bounds the k-th distance


def _sample_columns(n: int, k: int) -> int:
    """Reference rows in the first, bounding tile: at least 8 k (k groups), about n / 16
    (so a query keeps about 16 k candidates), at most all."""
    return min(n, max(_GROUP * k, min(65_536, max(_TILE_COLUMNS, n // 16))))


def _knn_exact_host(data: np.ndarray, query: np.ndarray | None, *, k: int, backend: Backend
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN on the CPU: float32 products select candidates, float64 decides.

    See the module docstring for the method and why it is exact.
    """
    n, d = data.shape
    self_query = query is None
    m = n if self_query else query.shape[0]
    shift = data.mean(axis=0, dtype=np.float64)
    # Shuffled, centred float32 reference, augmented: [-2 r, ||r||^2, 1] per row, so that
    # [q, 1, -c] @ row = ||q - r||^2 - ||q||^2 - c in one product.
    order = np.random.default_rng(0).permutation(n)  # fixed: the result does not depend on it
    reference = np.empty((n, d + 2), dtype=np.float32)
    with np.errstate(over="ignore"):  # checked below
        for rows in backend.chunks(n, bytes_per_row=3 * d * 8, max_rows=65_536):
            centred = data[order[rows]].astype(np.float64) - shift[None, :]
            reference[rows, :d] = -2.0 * centred
            reference[rows, d] = np.einsum("ij,ij->i", centred, centred)
            reference[rows, d + 1] = 1.0
    # Largest norm of a (centred) reference row, from the float32 squared norms used.
    r_max = float(np.sqrt(reference[:, d].astype(np.float64).max()))
    if not r_max < 1e15:  # float32 squares would overflow: the float64 array kernel instead
        return _knn_exact_xp(data, data if self_query else query, k=k, backend=backend)
    n_sample = _sample_columns(n, k)
    tile = min(n, _TILE_COLUMNS)
    expected = 2 * k * n / n_sample + k  # candidates per query, with room to spare
    bytes_per_row = 5 * max(tile, n_sample) + 24 * expected + 16 * k
    indices = np.empty((m, k), dtype=np.int64)
    distances = np.empty((m, k), dtype=np.float64)

    def task(rows: slice) -> None:
        q = data[rows] if self_query else query[rows]
        found_idx, found_d2 = _host_block(q, data, reference, order, shift, r_max=r_max, k=k,
                                          n_sample=n_sample, tile=tile)
        indices[rows] = found_idx
        distances[rows] = np.sqrt(found_d2)

    with backend.parallel() as runner:
        block = min(_QUERY_BLOCK, backend.chunk_rows(bytes_per_row=bytes_per_row * runner.threads,
                                                      n_rows=m))
        runner.map(task, list(backend.chunks(m, bytes_per_row=1.0, max_rows=block)))
    return indices, distances


def _host_block(q: np.ndarray, data: np.ndarray, reference: np.ndarray, order: np.ndarray,
                shift: np.ndarray, *, r_max: float, k: int, n_sample: int, tile: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference rows of a block of queries: indices and squared distances.

    Values are ``D' = ||q - r||^2 - ||q||^2`` (the same order as the distance), less a cut
    per query once it is known.
    """
    b, d = q.shape
    n = reference.shape[0]
    centred = q.astype(np.float64) - shift[None, :]
    q_norm = np.sqrt(np.einsum("ij,ij->i", centred, centred))
    augmented = np.empty((b, d + 2), dtype=np.float32)
    augmented[:, :d] = centred
    augmented[:, d] = 1.0
    augmented[:, d + 1] = 0.0
    # eps bounds the error of a computed D' from the float32 rounding of the inputs and the
    # product: (d + 7) u (||q|| + ||r||)^2 at most; 8 (d + 4) u leaves a wide margin.
    eps = 8.0 * (d + 4) * _U32 * (q_norm + r_max) ** 2
    extra = 3.0 * (d + 4) * _U32  # per unit of |cut|: the folded-in column and its rounding

    # 1. The bound tau: the k-th smallest group minimum of the first, random tile (k distinct
    # rows lie within it). Every true neighbour's D' is at most tau + eps, so its computed
    # value is at most 0 with cut = tau + 4 eps (+ the cut's own share of the error).
    first = augmented @ reference[:n_sample].T
    n_groups = n_sample // _GROUP
    if n_groups >= k:
        minima = first[:, :n_groups * _GROUP].reshape(b, _GROUP, n_groups).min(axis=1)
    else:  # a small reference: the whole tile
        minima = first
    tau = np.partition(minima, k - 1, axis=1)[:, k - 1].astype(np.float64)
    cut = tau + 4.0 * eps
    cut += extra * np.abs(cut)
    error = 2.0 * eps + extra * np.abs(cut)  # of any value once shifted by the cut
    cut32 = cut.astype(np.float32)
    first -= cut32[:, None]
    augmented[:, d + 1] = -cut32  # later tiles: the product subtracts the cut itself

    # 2. Candidates: values <= 0, tile by tile, each placed after its query's earlier ones.
    found_rows, found_cols, found_vals, found_pos = [], [], [], []
    filled = np.zeros(b, dtype=np.int64)
    bounds = [(0, n_sample)] + [(a, min(a + tile, n)) for a in range(n_sample, n, tile)]
    for start, stop in bounds:
        values = first if start == 0 else augmented @ reference[start:stop].T
        hit_rows, hit_cols = np.divmod(np.flatnonzero(values <= 0.0), stop - start)
        per_row = np.bincount(hit_rows, minlength=b)
        before = np.cumsum(per_row) - per_row  # hits are in row order within a tile
        found_pos.append(filled[hit_rows] + np.arange(hit_rows.size) - before[hit_rows])
        filled += per_row
        found_rows.append(hit_rows)
        found_cols.append(hit_cols + start)
        found_vals.append(values[hit_rows, hit_cols])
    rows_all = np.concatenate(found_rows)
    pos_all = np.concatenate(found_pos)
    width = int(filled.max())
    padded = np.full((b, width), np.inf, dtype=np.float32)
    padded[rows_all, pos_all] = np.concatenate(found_vals)
    columns = np.zeros((b, width), dtype=np.int64)
    columns[rows_all, pos_all] = np.concatenate(found_cols)

    # 3. Keep those within twice the error of the k-th smallest (the k nearest are among
    # them); exact float64 distances from the original rows decide.
    kth = np.partition(padded, k - 1, axis=1)[:, k - 1].astype(np.float64)
    keep = padded <= (kth + 2.0 * error)[:, None]
    n_keep = int(keep.sum(axis=1).max())
    if n_keep < width:
        chosen = np.argpartition(np.where(keep, padded, np.inf), n_keep - 1, axis=1)[:, :n_keep]
    else:
        chosen = np.broadcast_to(np.arange(width), (b, width))
    kept = np.take_along_axis(keep, chosen, axis=1)
    candidates = order[np.take_along_axis(columns, chosen, axis=1)]
    offsets = data[candidates].astype(np.float64) - q.astype(np.float64)[:, None, :]
    exact = np.einsum("ijk,ijk->ij", offsets, offsets)
    exact[~kept] = np.inf
    # Nearest first, ties by row number (as a stable brute force).
    by_row = np.argsort(candidates, axis=1, kind="stable")
    candidates = np.take_along_axis(candidates, by_row, axis=1)
    exact = np.take_along_axis(exact, by_row, axis=1)
    by_distance = np.argsort(exact, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(candidates, by_distance, axis=1),
            np.take_along_axis(exact, by_distance, axis=1))


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
