"""k-means (k-means++ initialisation, Lloyd iterations) and the shared nearest-centre kernel.

The nearest-centre kernel :func:`assign_nearest` is also how SOM nodes are found (a SOM node
is a k-means centre with a neighbourhood): squared distances come from
``||x||^2 - 2 x.c + ||c||^2`` by one matrix product per row chunk, chunks sized by the
backend's memory budget, and per-centre sums are accumulated in float64 in the same pass.

On the CPU, Lloyd iterations call scikit-learn's ``KMeans`` from our k-means++ centres: its
Cython loop fuses distance and argmin and is about 3-4x faster than any NumPy formulation
(measured in ``benchmarks/clustering.py``). Both paths share the initialisation, tolerance
definition and result type, and the tests check both against scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend, check_finite


@dataclass(frozen=True)
class Assignment:
    """Result of :func:`assign_nearest`, arrays on the backend's device.

    Attributes
    ----------
    labels
        int64, the nearest centre of each row.
    sqdist
        Squared Euclidean distance to that centre (clipped at 0).
    sums
        float64 ``(n_centres, n_features)`` sum of the rows assigned to each centre, or None.
    counts
        float64 ``(n_centres,)`` rows per centre, or None.
    """

    labels: Any
    sqdist: Any
    sums: Any = None
    counts: Any = None


def _compute_dtype(data: Any, backend: Backend) -> Any:
    # On the CPU, float32 input stays float32 (flow data; twice the matmul speed). On the GPU,
    # cuBLAS picks its algorithm by matrix shape, so float32 distances of one row can differ
    # between chunk sizes and flip near-ties: float64 keeps results independent of the memory
    # budget, and the GPU has the arithmetic to spare.
    if backend.is_gpu or np.dtype(data.dtype) != np.float32:
        return np.float64
    return np.float32


def assign_nearest(
    data: Any,
    centres: Any,
    *,
    backend: Backend,
    with_sums: bool = False,
) -> Assignment:
    """Assign every row of ``data`` to its nearest centre, in chunks under the memory budget.

    Parameters
    ----------
    data
        ``(n, d)`` array on the host or on the device; host chunks are moved to the device
        one at a time, so ``data`` may be larger than device memory.
    centres
        ``(k, d)`` centres.
    backend
        Array backend and memory budget.
    with_sums
        Also return per-centre sums and counts (for a centre update), in float64.

    Returns
    -------
    Assignment
    """
    xp = backend.xp
    n, n_features = data.shape
    dtype = _compute_dtype(data, backend)
    centres_dev = backend.asarray(centres, dtype=dtype)
    n_centres = centres_dev.shape[0]
    centre_sq = (centres_dev.astype(np.float64) ** 2).sum(axis=1).astype(dtype)
    labels = xp.empty(n, dtype=np.int64)
    sqdist = xp.empty(n, dtype=np.float64)
    sums = xp.zeros((n_centres, n_features), dtype=np.float64) if with_sums else None
    counts = xp.zeros(n_centres, dtype=np.float64) if with_sums else None
    itemsize = np.dtype(dtype).itemsize
    # Per row: the distance block and its temporaries, the row itself, labels and distances.
    bytes_per_row = 3 * n_centres * itemsize + 2 * n_features * 8 + 32
    for rows in backend.chunks(n, bytes_per_row=bytes_per_row):
        chunk = backend.asarray(data[rows], dtype=dtype)
        # ||x||^2 is constant per row: argmin over ||c||^2 - 2 x.c is enough.
        scores = chunk @ centres_dev.T
        scores *= -2
        scores += centre_sq[None, :]
        nearest = xp.argmin(scores, axis=1)
        best = xp.take_along_axis(scores, nearest[:, None], axis=1)[:, 0].astype(np.float64)
        best += (chunk.astype(np.float64) ** 2).sum(axis=1)
        labels[rows] = nearest
        sqdist[rows] = xp.maximum(best, 0.0)
        if with_sums:
            counts += xp.bincount(nearest, minlength=n_centres).astype(np.float64)
            for j in range(n_features):
                sums[:, j] += xp.bincount(nearest, weights=chunk[:, j].astype(np.float64),
                                          minlength=n_centres)
    return Assignment(labels=labels, sqdist=sqdist, sums=sums, counts=counts)


def kmeans_plusplus(
    data: Any,
    *,
    n_clusters: int,
    backend: Backend,
    seed: int,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy k-means++ initial centres (as scikit-learn: ``2 + log(k)`` trials per centre).

    Random numbers come from a NumPy generator on the host, so the CPU and the GPU draw the
    same candidates for the same seed.

    Parameters
    ----------
    data
        ``(n, d)`` array (host or device).
    n_clusters
        Number of centres, at most ``n``.
    backend
        Array backend and memory budget.
    seed
        Seed of the random draws.
    n_local_trials
        Candidates tried per centre; None: ``2 + int(log(k))``.

    Returns
    -------
    ``(n_clusters, d)`` float64 centres on the host.
    """
    xp = backend.xp
    n = data.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    rng = np.random.default_rng(seed)
    data_dev = backend.asarray(data)
    first = int(rng.integers(n))
    centres = np.empty((n_clusters, data.shape[1]), dtype=np.float64)
    centres[0] = backend.to_host(data_dev[first]).astype(np.float64)
    closest = assign_nearest(data_dev, centres[:1], backend=backend).sqdist
    for c in range(1, n_clusters):
        cumulative = xp.cumsum(closest)
        potential = float(cumulative[-1])
        draws = backend.asarray(rng.random(n_local_trials) * potential)
        candidates = xp.minimum(xp.searchsorted(cumulative, draws), n - 1)
        candidate_rows = backend.to_host(data_dev[candidates]).astype(np.float64)
        # Distances of every row to each candidate, chunked: candidates act as centres.
        trial = xp.empty((n, n_local_trials), dtype=np.float64)
        cand_dev = backend.asarray(candidate_rows, dtype=_compute_dtype(data_dev, backend))
        cand_sq = (cand_dev.astype(np.float64) ** 2).sum(axis=1)
        for rows in backend.chunks(n, bytes_per_row=4 * n_local_trials * 8 + data.shape[1] * 8):
            chunk = data_dev[rows]
            d2 = (chunk.astype(np.float64) ** 2).sum(axis=1)[:, None] - 2.0 * (
                chunk @ cand_dev.T).astype(np.float64) + cand_sq[None, :]
            trial[rows] = xp.minimum(closest[rows, None], xp.maximum(d2, 0.0))
        best = int(xp.argmin(trial.sum(axis=0)))
        closest = trial[:, best].copy()
        centres[c] = candidate_rows[best]
    return centres


@dataclass(frozen=True)
class KMeansResult:
    """A fitted k-means model (host arrays).

    Attributes
    ----------
    centres
        ``(k, d)`` float64 centres.
    labels
        int64 nearest centre of each training row.
    inertia
        Sum of squared distances of rows to their centre.
    n_iter
        Lloyd iterations run.
    """

    centres: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int


def _validate(data: Any, n_clusters: int, backend: Backend) -> None:
    if data.ndim != 2:
        raise ValueError(f"k-means needs a 2-d array of rows x features, got shape {data.shape}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    if data.shape[0] < n_clusters:
        raise ValueError(f"{data.shape[0]} rows are fewer than the {n_clusters} clusters asked for")
    check_finite(backend, data, what="k-means input")


def kmeans(
    data: Any,
    *,
    n_clusters: int,
    backend: Backend,
    seed: int,
    init: np.ndarray | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    use_sklearn: bool | None = None,
) -> KMeansResult:
    """Cluster rows by k-means: k-means++ initialisation, then Lloyd iterations.

    Parameters
    ----------
    data
        ``(n, d)`` array, host or device.
    n_clusters
        Number of clusters ``k``.
    backend
        Array backend and memory budget.
    seed
        Seed of the k-means++ draws.
    init
        ``(k, d)`` initial centres instead of k-means++.
    max_iter
        Most Lloyd iterations.
    tol
        Stop when the summed squared centre shift is at most ``tol`` times the mean feature
        variance (scikit-learn's definition); also stop when no label changes.
    use_sklearn
        Run the Lloyd iterations with scikit-learn on the CPU. None: on the CPU backend yes,
        on the GPU no. Ignored (False) on the GPU.

    Returns
    -------
    KMeansResult

    Raises
    ------
    ValueError
        Fewer rows than clusters, NaN or infinite values, or a wrong shape.
    """
    _validate(data, n_clusters, backend)
    if init is None:
        init = kmeans_plusplus(data, n_clusters=n_clusters, backend=backend, seed=seed)
    init = np.asarray(init, dtype=np.float64)
    if init.shape != (n_clusters, data.shape[1]):
        raise ValueError(f"init has shape {init.shape}, expected {(n_clusters, data.shape[1])}")
    if use_sklearn is None:
        use_sklearn = not backend.is_gpu
    if use_sklearn and not backend.is_gpu:
        return _kmeans_sklearn(np.asarray(data), init, max_iter=max_iter, tol=tol, seed=seed)
    return _kmeans_lloyd(data, init, backend=backend, max_iter=max_iter, tol=tol)


def _kmeans_sklearn(data: np.ndarray, init: np.ndarray, *, max_iter: int, tol: float,
                    seed: int) -> KMeansResult:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=init.shape[0], init=init.astype(data.dtype), n_init=1,
                   max_iter=max_iter, tol=tol, algorithm="lloyd", random_state=seed)
    model.fit(data)
    return KMeansResult(centres=model.cluster_centers_.astype(np.float64),
                        labels=model.labels_.astype(np.int64), inertia=float(model.inertia_),
                        n_iter=int(model.n_iter_))


def _kmeans_lloyd(data: Any, init: np.ndarray, *, backend: Backend, max_iter: int,
                  tol: float) -> KMeansResult:
    xp = backend.xp
    data_dev = backend.asarray(data)  # once per call, not per iteration
    tol_abs = tol * float(xp.var(data_dev.astype(np.float64), axis=0).mean()) if tol > 0 else 0.0
    centres = backend.asarray(init, dtype=np.float64)
    previous = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is reported)
        step = assign_nearest(data_dev, centres, backend=backend, with_sums=True)
        if previous is not None and bool(xp.array_equal(step.labels, previous)):
            break  # strict convergence: the centres are already the means of their rows
        previous = step.labels
        filled = step.counts > 0
        # An empty cluster keeps its centre (rare with k-means++; documented behaviour).
        updated = xp.where(filled[:, None], step.sums / xp.maximum(step.counts, 1.0)[:, None],
                           centres)
        shift = float(((updated - centres) ** 2).sum())
        centres = updated
        if shift <= tol_abs:
            break
    final = assign_nearest(data_dev, centres, backend=backend)
    return KMeansResult(centres=backend.to_host(centres), labels=backend.to_host(final.labels),
                        inertia=float(final.sqdist.sum()), n_iter=n_iter)
