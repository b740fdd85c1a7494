"""SOM and consensus metaclustering against known mixture labels, on NumPy and CuPy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.metacluster import consensus_metaclusters
from bcellmap.kernels.som import default_radius, grid_distances, map_to_nodes, train_som


def _mixture(n: int = 6000, d: int = 6, k: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 8, size=(k, d))
    truth = rng.integers(0, k, size=n)
    data = centres[truth] + rng.normal(0, 0.35, size=(n, d))
    return data.astype(np.float32), truth


def test_som_metaclusters_recover_mixture(device):
    data, truth = _mixture()
    backend = get_backend(device=device)
    codes = train_som(data, backend=backend, seed=1, xdim=6, ydim=6)
    nodes, dist = map_to_nodes(data, codes, backend=backend)
    meta = consensus_metaclusters(codes, n_clusters=6, seed=1, n_resamples=30)
    assert adjusted_rand_score(truth, meta[nodes]) > 0.95
    # Distances are Euclidean distances to the node's code, checked by hand.
    assert np.allclose(dist, np.linalg.norm(data - codes[nodes], axis=1), atol=1e-3)


def test_nodes_are_nearest_codes(device):
    data, _ = _mixture(n=2000)
    backend = get_backend(device=device)
    codes = train_som(data, backend=backend, seed=3, xdim=4, ydim=4, rlen=5)
    nodes, _ = map_to_nodes(data, codes, backend=backend)
    brute = ((data[:, None, :].astype(np.float64) - codes[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert (nodes == brute).mean() > 0.999  # float32 ties aside


def test_tiny_memory_budget_gives_identical_result(device):
    data, _ = _mixture(n=3000)
    big = get_backend(device=device, budget_mb=512)
    tiny = get_backend(device=device, budget_mb=0.002)  # a few rows per chunk
    codes_big = train_som(data, backend=big, seed=5, xdim=5, ydim=5)
    codes_tiny = train_som(data, backend=tiny, seed=5, xdim=5, ydim=5)
    np.testing.assert_allclose(codes_tiny, codes_big, rtol=1e-9, atol=1e-9)
    assert np.array_equal(map_to_nodes(data, codes_big, backend=big)[0],
                          map_to_nodes(data, codes_big, backend=tiny)[0])


def test_deterministic_for_a_seed(device):
    data, _ = _mixture(n=2000)
    backend = get_backend(device=device)
    first = train_som(data, backend=backend, seed=9, xdim=4, ydim=4)
    second = train_som(data, backend=backend, seed=9, xdim=4, ydim=4)
    assert np.array_equal(first, second)
    meta = [consensus_metaclusters(first, n_clusters=4, seed=2, n_resamples=20) for _ in "ab"]
    assert np.array_equal(meta[0], meta[1])


def test_bad_input_is_refused(device):
    backend = get_backend(device=device)
    data, _ = _mixture(n=200)
    with pytest.raises(ValueError, match="fewer than the 400 SOM nodes"):
        train_som(data, backend=backend, seed=0, xdim=20, ydim=20)
    broken = data.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        train_som(broken, backend=backend, seed=0, xdim=3, ydim=3)
    codes = train_som(data, backend=backend, seed=0, xdim=3, ydim=3)
    with pytest.raises(ValueError, match="between 1 and the number of nodes"):
        consensus_metaclusters(codes, n_clusters=10, seed=0)
    nodes, dist = map_to_nodes(data[:0], codes, backend=backend)  # an empty sample maps to none
    assert nodes.shape == (0,) and dist.shape == (0,)


def test_grid_matches_flowsom_definition():
    grid = grid_distances(3, 2)
    # FlowSOM: nodes [(x, y) for x in range(3) for y in range(2)], Chebyshev distance.
    assert grid[0, 5] == 2 and grid[0, 1] == 1 and grid[1, 2] == 1
    assert default_radius(10, 10) == pytest.approx(np.quantile(grid_distances(10, 10), 0.67))
