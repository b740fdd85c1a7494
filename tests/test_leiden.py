"""kNN graph + Leiden recovers planted partitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.leiden import cluster_leiden, knn_graph, leiden_partition


@pytest.mark.parametrize("weighting", ["umap", "binary"])
def test_blobs_are_recovered(device, weighting):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(5, 10))
    truth = np.repeat(np.arange(5), 200)
    data = centres[truth] + rng.normal(0, 1, size=(1000, 10))
    labels = cluster_leiden(data, k=15, resolution=0.5, seed=1, backend=get_backend(device=device),
                            weighting=weighting)
    assert adjusted_rand_score(truth, labels) > 0.95


def test_planted_partition_graph():
    rng = np.random.default_rng(3)
    truth = np.repeat(np.arange(4), 60)
    same = truth[:, None] == truth[None, :]
    edges = np.triu(rng.random((240, 240)) < np.where(same, 0.3, 0.01), k=1)
    graph = sp.csr_matrix(edges | edges.T, dtype=np.float64)
    labels = leiden_partition(graph, resolution=1.0, seed=0)
    assert adjusted_rand_score(truth, labels) > 0.95
    assert np.array_equal(labels, leiden_partition(graph, resolution=1.0, seed=0))


def test_umap_weights_by_hand():
    # Point 0 has neighbours at distances 1 and 2 (plus itself): rho = 1, so the nearest
    # edge weighs 1, and sigma solves exp(0) + exp(-1/sigma) = log2(3).
    indices = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    distances = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 1.5], [0.0, 1.5, 2.0]])
    graph = knn_graph(indices, distances, weighting="umap").toarray()
    sigma0 = -1.0 / np.log(np.log2(3) - 1.0)
    w02 = np.exp(-1.0 / sigma0)
    sigma2 = -0.5 / np.log(np.log2(3) - 1.0)
    w20 = np.exp(-0.5 / sigma2)
    assert graph[0, 2] == pytest.approx(w02 + w20 - w02 * w20, rel=1e-6)
    assert np.allclose(graph, graph.T) and np.all(np.diag(graph) == 0)


def test_umap_weights_equal_umap_learn():
    # The peer: umap-learn's fuzzy_simplicial_set on the same neighbour lists (self included,
    # as it expects), on clustered data with duplicated points (distance-0 neighbours).
    umap_ = pytest.importorskip("umap.umap_")
    from bcellmap.kernels.knn import nearest_neighbors

    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(3.0 * i, 1.0, (300, 6)) for i in range(5)])
    values = np.vstack([values, values[:15]])
    indices, distances = nearest_neighbors(values, k=15, backend=get_backend(device="cpu"))
    theirs, _, _ = umap_.fuzzy_simplicial_set(values, 15, np.random.RandomState(0), "euclidean",
                                              knn_indices=indices, knn_dists=distances)
    ours = knn_graph(indices, distances, weighting="umap")
    theirs = sp.csr_matrix(theirs)
    assert ((theirs != 0) != (ours != 0)).nnz == 0  # the same edges
    # umap-learn stops its sigma bisection at a tolerance of 1e-5; ours runs 64 steps.
    assert abs(theirs - ours).max() < 1e-5
