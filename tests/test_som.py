"""SOM and consensus metaclustering against known mixture labels and hand-computed updates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.metrics import adjusted_rand_score

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.metacluster import _cut_maxclust, consensus_metaclusters
from bcellmap.kernels.som import default_radius, grid_distances, map_to_nodes, train_som


def _mixture(n: int = 6000, d: int = 6, k: int = 6, seed: int = 0, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 8, size=(k, d)) + offset
    truth = rng.integers(0, k, size=n)
    data = centres[truth] + rng.normal(0, 0.35, size=(n, d))
    return data.astype(np.float32), truth


def _rare_recall(truth: np.ndarray, labels: np.ndarray, rare: int) -> float:
    """Share of the rare population's events in clusters where it is the majority."""
    table = np.zeros((labels.max() + 1, truth.max() + 1), dtype=int)
    np.add.at(table, (labels, truth), 1)
    return table[table.argmax(axis=1) == rare, rare].sum() / table[:, rare].sum()


def test_som_metaclusters_recover_mixture(device):
    data, truth = _mixture()
    backend = get_backend(device=device)
    codes = train_som(data, backend=backend, seed=1, xdim=6, ydim=6)
    nodes, dist = map_to_nodes(data, codes, backend=backend)
    meta = consensus_metaclusters(codes, n_clusters=6, seed=1, n_resamples=30)
    assert adjusted_rand_score(truth, meta[nodes]) > 0.95
    # Distances are Euclidean distances to the node's code, checked by hand.
    assert np.allclose(dist, np.linalg.norm(data - codes[nodes], axis=1), atol=1e-3)


def test_rare_population_gets_its_own_metacluster(device):
    # 0.3% of 40,000 events: 120 events far from the 8 common populations.
    rng = np.random.default_rng(4)
    centres = rng.uniform(0, 6, size=(9, 10))
    weights = np.append(np.full(8, 0.997 / 8), 0.003)
    truth = rng.choice(9, size=40_000, p=weights)
    data = (centres[truth] + rng.normal(0, 0.4, size=(40_000, 10))).astype(np.float32)
    backend = get_backend(device=device)
    codes = train_som(data, backend=backend, seed=2)
    nodes, _ = map_to_nodes(data, codes, backend=backend)
    labels = consensus_metaclusters(codes, n_clusters=9, seed=2)[nodes]
    assert _rare_recall(truth, labels, rare=8) > 0.95
    assert adjusted_rand_score(truth, labels) > 0.95


def test_far_from_origin_data_loses_no_precision(device):
    # float32 distances by ||x||^2 - 2 x.c + ||c||^2 would cancel at an offset of 1e4 (the
    # squared norms reach 6e8, float32 resolves 64); the kernel's shift keeps them exact.
    data, truth = _mixture(offset=1e4)
    backend = get_backend(device=device)
    codes = train_som(data, backend=backend, seed=1, xdim=6, ydim=6)
    nodes, dist = map_to_nodes(data, codes, backend=backend)
    brute = ((data[:, None, :].astype(np.float64) - codes[None]) ** 2).sum(axis=2)
    assert (nodes == brute.argmin(axis=1)).mean() > 0.999
    np.testing.assert_allclose(dist, np.sqrt(brute.min(axis=1)), atol=0.02)
    meta = consensus_metaclusters(codes, n_clusters=6, seed=1, n_resamples=30)
    assert adjusted_rand_score(truth, meta[nodes]) > 0.95


def test_one_pass_is_the_batch_update_by_hand(device):
    data, _ = _mixture(n=3000)
    backend = get_backend(device=device)
    # rlen 1: radius 0 and the last learning rate, so each code moves alpha[1] of the way to
    # the mean of the events nearest to it; the start codes are events drawn by the seed.
    codes = train_som(data, backend=backend, seed=7, xdim=3, ydim=3, rlen=1, alpha=(1.0, 0.3))
    rng = np.random.default_rng(7)
    start = data[np.sort(rng.choice(data.shape[0], size=9, replace=False))].astype(np.float64)
    nearest = ((data[:, None, :].astype(np.float64) - start[None]) ** 2).sum(axis=2).argmin(1)
    means = np.array([data[nearest == j].mean(axis=0, dtype=np.float64) for j in range(9)])
    np.testing.assert_allclose(codes, start + 0.3 * (means - start), rtol=1e-6, atol=1e-5)


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


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :]))


def test_tree_cut_is_scipys_maxclust():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(3, 60))
        k = int(rng.integers(1, n))
        if trial % 2:  # consensus distances: many tied heights
            tree = linkage(rng.integers(0, 5, size=n * (n - 1) // 2) / 4.0, method="average")
        else:
            tree = linkage(rng.normal(size=(n, 3)), method="average")
        assert _same_partition(_cut_maxclust(tree, k),
                               fcluster(tree, t=k, criterion="maxclust")), trial


def test_consensus_matches_the_definition_by_hand():
    # ConsensusClusterPlus by hand: resample, cut, count co-clustering over co-drawing.
    rng = np.random.default_rng(3)
    codes = rng.normal(size=(30, 4))
    draw = np.random.default_rng(5)
    together, both = np.zeros((30, 30)), np.zeros((30, 30))
    for _ in range(25):
        drawn = np.sort(draw.choice(30, size=27, replace=False))
        labels = fcluster(linkage(codes[drawn], method="average"), t=5, criterion="maxclust")
        together[np.ix_(drawn, drawn)] += labels[:, None] == labels[None, :]
        both[np.ix_(drawn, drawn)] += 1
    distance = 1 - together / np.maximum(both, 1)
    np.fill_diagonal(distance, 0)
    expected = fcluster(linkage(distance[np.triu_indices(30, 1)], method="average"), t=5,
                        criterion="maxclust")
    ours = consensus_metaclusters(codes, n_clusters=5, seed=5, n_resamples=25)
    assert _same_partition(ours, expected)
    _, first = np.unique(ours, return_index=True)
    assert np.array_equal(ours[np.sort(first)], np.arange(5))  # numbered by first appearance


def test_thread_count_does_not_change_the_result(monkeypatch):
    # Chunks have a fixed size and their sums are added in order: 1 or 3 threads, same bits.
    from bcellmap.kernels import backend as backend_module

    data, _ = _mixture(n=70_000, d=5)
    backend = get_backend(device="cpu")
    runs = []
    for threads in (1, 3):
        monkeypatch.setattr(backend_module, "host_threads", lambda threads=threads: threads)
        codes = train_som(data, backend=backend, seed=4, xdim=4, ydim=4, rlen=4)
        runs.append((codes, map_to_nodes(data, codes, backend=backend)))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1][0], runs[1][1][0])
    assert np.array_equal(runs[0][1][1], runs[1][1][1])
