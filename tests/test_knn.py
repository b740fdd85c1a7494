"""Exact kNN against scikit-learn's brute force and by hand, on the CPU kernels and CuPy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.knn import _knn_exact_xp, nearest_neighbors


def _same_sets(ours: np.ndarray, data: np.ndarray, query: np.ndarray, k: int) -> float:
    """Share of rows whose neighbour set is a valid k nearest set: by exact float64
    distances, every returned row is no farther than the k-th nearest (ties may go either
    way), checked against scikit-learn's brute force for the k-th distance."""
    reference = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(data)
    ref_dist, ref_idx = reference.kneighbors(query)
    agree = 0
    for row, (a, b) in enumerate(zip(ours, ref_idx, strict=True)):
        if set(a.tolist()) == set(b.tolist()):
            agree += 1
            continue
        exact = np.sqrt(((data[a] - query[row]) ** 2).sum(axis=1))
        agree += len(set(a.tolist())) == k and exact.max() <= ref_dist[row, -1] * (1 + 1e-9)
    return agree / len(ours)


def _mixture(n: int, d: int, seed: int, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 6, size=(12, d)) + offset
    return centres[rng.integers(0, 12, n)] + rng.normal(0, 0.4, size=(n, d))


@pytest.mark.parametrize("use_sklearn", [False, True])
def test_exact_equals_sklearn_brute_force(device, use_sklearn):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1500, 12))
    query = rng.normal(size=(300, 12))
    backend = get_backend(device=device, budget_mb=0.5)  # several chunks
    reference = NearestNeighbors(n_neighbors=10, algorithm="brute").fit(data)
    for q in (None, query):
        ref_dist, ref_idx = reference.kneighbors(data if q is None else q)
        idx, dist = nearest_neighbors(data, k=10, backend=backend, query=q,
                                      use_sklearn=use_sklearn)
        assert _same_sets(idx, data, data if q is None else q, 10) == 1.0
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-6)
        assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize(("dtype", "offset"), [(np.float64, 0.0), (np.float32, 0.0),
                                               (np.float64, 1e3), (np.float32, 50.0)])
def test_clustered_data_equal_sklearn(device, dtype, offset):
    # Several query blocks and reference tiles, clustered rows (many close neighbours), and
    # rows far from the origin: the float32 selection must still be exact.
    data = _mixture(9000, 20, seed=3, offset=offset).astype(dtype)
    idx, dist = nearest_neighbors(data, k=15, backend=get_backend(device=device))
    reference = data.astype(np.float64)
    assert _same_sets(idx, reference, reference, 15) == 1.0
    # Distances are exact Euclidean distances to the returned rows, nearest first.
    by_hand = np.sqrt(((reference[idx] - reference[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(dist, by_hand, rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert np.array_equal(idx[:, 0], np.arange(len(data)))  # no duplicates: self first


def test_duplicates_and_ties(device):
    # Each row three times: nearest sets hold exact ties; the copies come first (distance 0),
    # ties broken by row number as a stable brute force does.
    rng = np.random.default_rng(5)
    data = np.repeat(rng.normal(size=(400, 6)), 3, axis=0)
    idx, dist = nearest_neighbors(data, k=3, backend=get_backend(device=device))
    copies = 3 * (np.arange(1200) // 3)[:, None] + np.arange(3)[None, :]
    assert np.array_equal(idx, copies)  # sorted by row number within the tie
    assert np.all(dist == 0)


def test_huge_values_equal_sklearn(device):
    # Squared norms beyond float32's range: answered in float64 all the same.
    data = np.random.default_rng(6).normal(size=(400, 4)) * 1e20
    idx, dist = nearest_neighbors(data, k=5, backend=get_backend(device=device))
    assert _same_sets(idx, data, data, 5) == 1.0
    by_hand = np.sqrt(((data[idx] - data[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(dist, by_hand, rtol=1e-9)


def test_array_kernel_on_numpy_equals_sklearn():
    # The GPU path's kernel, run on NumPy with a small budget (several chunks).
    rng = np.random.default_rng(4)
    data = rng.normal(size=(1200, 8))
    query = rng.normal(size=(200, 8))
    backend = get_backend(device="cpu", budget_mb=0.2)
    idx, dist = _knn_exact_xp(data, query, k=9, backend=backend)
    ref_dist, _ = NearestNeighbors(n_neighbors=9, algorithm="brute").fit(data).kneighbors(query)
    assert _same_sets(idx, data, query, 9) == 1.0
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-6)


def test_self_is_first_and_k_equals_n(device):
    data = np.random.default_rng(1).normal(size=(40, 3))
    idx, dist = nearest_neighbors(data, k=40, backend=get_backend(device=device))
    assert np.array_equal(idx[:, 0], np.arange(40)) and np.allclose(dist[:, 0], 0, atol=1e-6)
    assert all(sorted(row) == list(range(40)) for row in idx.tolist())
    by_hand = np.sqrt(((data[idx] - data[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(dist, by_hand, rtol=1e-12, atol=1e-12)


def test_tiny_budget_identical(device):
    data = np.random.default_rng(2).normal(size=(500, 8))
    runs = [nearest_neighbors(data, k=7, backend=get_backend(device=device, budget_mb=mb))
            for mb in (64, 0.001)]
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_bad_input(device):
    backend = get_backend(device=device)
    data = np.zeros((5, 2))
    with pytest.raises(ValueError, match="must be in 1..5"):
        nearest_neighbors(data, k=6, backend=backend)
    data[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        nearest_neighbors(data, k=2, backend=backend)
    with pytest.raises(ValueError, match="not 'exact'"):
        nearest_neighbors(np.zeros((5, 2)), k=2, backend=backend, method="fast")
