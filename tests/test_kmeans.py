"""k-means against scikit-learn from the same initial centres, on both CPU paths and CuPy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.kmeans import assign_nearest, kmeans, kmeans_plusplus


def _data(n: int = 4000, d: int = 5, k: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(k, d))
    return centres[rng.integers(0, k, n)] + rng.normal(0, 1.0, size=(n, d))


@pytest.mark.parametrize("use_sklearn", [False, True])
def test_inertia_matches_sklearn_from_same_start(device, use_sklearn):
    data = _data()
    backend = get_backend(device=device)
    init = kmeans_plusplus(data, n_clusters=8, backend=backend, seed=4)
    ours = kmeans(data, n_clusters=8, backend=backend, seed=4, init=init, max_iter=100,
                  tol=1e-6, use_sklearn=use_sklearn)
    reference = KMeans(n_clusters=8, init=init, n_init=1, max_iter=100, tol=1e-6,
                       algorithm="lloyd").fit(data)
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-3)
    # Inertia by hand from the returned centres and labels.
    by_hand = ((data - ours.centres[ours.labels]) ** 2).sum()
    assert ours.inertia == pytest.approx(by_hand, rel=1e-6)


def test_plusplus_spreads_centres(device):
    data = _data(k=8)
    backend = get_backend(device=device)
    init = kmeans_plusplus(data, n_clusters=8, backend=backend, seed=0)
    # One centre per true blob: each init centre is a data row, nearest blobs all distinct.
    rng = np.random.default_rng(0)
    blobs = rng.normal(0, 4, size=(8, 5))
    nearest_blob = ((init[:, None] - blobs[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert len(set(nearest_blob.tolist())) >= 7


def test_tiny_budget_identical(device):
    data = _data(n=1500).astype(np.float32)
    init = kmeans_plusplus(data, n_clusters=5, backend=get_backend(device=device), seed=1)
    results = [kmeans(data, n_clusters=5, backend=get_backend(device=device, budget_mb=mb),
                      seed=1, init=init, max_iter=50, use_sklearn=False)
               for mb in (256, 0.001)]
    assert np.array_equal(results[0].labels, results[1].labels)
    np.testing.assert_allclose(results[0].centres, results[1].centres, rtol=1e-9)
    tiny = get_backend(device=device, budget_mb=0.001)
    assign = assign_nearest(data, init, backend=tiny, with_sums=True)
    assert float(assign.counts.sum()) == data.shape[0]


def test_bad_input(device):
    backend = get_backend(device=device)
    with pytest.raises(ValueError, match="fewer than the 10 clusters"):
        kmeans(_data(n=5), n_clusters=10, backend=backend, seed=0)
    data = _data(n=50)
    data[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(data, n_clusters=3, backend=backend, seed=0)
