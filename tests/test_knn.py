"""Exact kNN against scikit-learn's brute force, on both CPU paths and CuPy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.knn import nearest_neighbors


def _same_sets(ours: np.ndarray, reference: np.ndarray, ref_dist: np.ndarray) -> float:
    """Share of rows whose neighbour sets agree, counting rows with a tie at the k-th as equal."""
    agree = 0
    for row, (a, b) in enumerate(zip(ours, reference, strict=True)):
        tied = np.isclose(ref_dist[row, -1], ref_dist[row, -2], rtol=1e-9)
        agree += set(a.tolist()) == set(b.tolist()) or tied
    return agree / len(ours)


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
        assert _same_sets(idx, ref_idx, ref_dist) == 1.0
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-6)
        assert np.all(np.diff(dist, axis=1) >= 0)


def test_self_is_first_and_k_equals_n(device):
    data = np.random.default_rng(1).normal(size=(40, 3))
    idx, dist = nearest_neighbors(data, k=40, backend=get_backend(device=device),
                                  use_sklearn=False)
    assert np.array_equal(idx[:, 0], np.arange(40)) and np.allclose(dist[:, 0], 0, atol=1e-6)
    assert all(sorted(row) == list(range(40)) for row in idx.tolist())


def test_tiny_budget_identical(device):
    data = np.random.default_rng(2).normal(size=(500, 8))
    runs = [nearest_neighbors(data, k=7, backend=get_backend(device=device, budget_mb=mb),
                              use_sklearn=False) for mb in (64, 0.001)]
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
