"""Consensus hierarchical metaclustering of SOM nodes, as FlowSOM does with ConsensusClusterPlus.

FlowSOM (R) calls ``ConsensusClusterPlus(codes, maxK, reps=100, pItem=0.9, pFeature=1,
clusterAlg="hc", innerLinkage="average", finalLinkage="average", distance="euclidean")``:
the codes are resampled ``reps`` times (90% of the nodes, without replacement), each resample
is cut into ``k`` clusters by average-linkage hierarchical clustering, the consensus matrix
holds how often two nodes fell in the same cluster when both were drawn, and the final
clusters are an average-linkage clustering of ``1 - consensus``, cut into ``k``.
This runs on the host with SciPy: it sees ``xdim * ydim`` codes (100 by default), not events.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist, squareform

from .backend import blas_single_threaded


def _cut_average_linkage(points_or_dist: np.ndarray, n_clusters: int, *,
                         precomputed: bool) -> np.ndarray:
    if precomputed:
        tree = linkage(squareform(points_or_dist, checks=False), method="average")
    else:
        tree = linkage(points_or_dist, method="average", metric="euclidean")
    return _cut_maxclust(tree, n_clusters)


def _cut_maxclust(tree: np.ndarray, n_clusters: int) -> np.ndarray:
    """Flat clusters as ``fcluster(tree, n_clusters, criterion="maxclust")`` forms them.

    The lowest height ``r`` at which at most ``n_clusters`` clusters remain, joining every
    merge whose subtree's highest merge is at most ``r`` (tied heights join together, so ties
    may leave fewer clusters). Same partition as SciPy's (the labels may be numbered
    differently), without ``fcluster``'s validation of the tree, which costs more than the cut
    on the ~100-node trees cut here 100 times per metaclustering.
    """
    n = tree.shape[0] + 1
    if n_clusters >= n:
        return np.arange(n, dtype=np.int64)
    highest = [0.0] * (n - 1)
    for i, (left, right, height) in enumerate(tree[:, :3].tolist()):  # lists: fast scalars
        left, right = int(left), int(right)
        if left >= n:
            height = max(height, highest[left - n])
        if right >= n:
            height = max(height, highest[right - n])
        highest[i] = height
    highest = np.asarray(highest)
    threshold = np.partition(highest, n - n_clusters - 1)[n - n_clusters - 1]
    joined = np.flatnonzero(highest <= threshold)
    children = tree[:, :2].astype(np.int64)
    parent = np.arange(2 * n - 1)
    parent[children[joined, 0]] = n + joined
    parent[children[joined, 1]] = n + joined
    while True:  # pointer jumping: each leaf ends at the top of its joined subtree
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    return np.unique(parent[:n], return_inverse=True)[1].astype(np.int64)


def consensus_metaclusters(
    codes: np.ndarray,
    *,
    n_clusters: int,
    seed: int,
    n_resamples: int = 100,
    resample_fraction: float = 0.9,
) -> np.ndarray:
    """Group SOM nodes into metaclusters by consensus hierarchical clustering.

    Parameters
    ----------
    codes
        ``(n_nodes, d)`` SOM codebook.
    n_clusters
        Number of metaclusters ``k`` (at most ``n_nodes``).
    seed
        Seed of the resampling.
    n_resamples
        Resamplings for the consensus matrix (ConsensusClusterPlus ``reps``).
    resample_fraction
        Fraction of nodes drawn per resampling (``pItem``).

    Returns
    -------
    int64 metacluster of each node, numbered ``0..k-1`` in order of first appearance along the
    nodes (so the numbering is reproducible).

    Raises
    ------
    ValueError
        ``n_clusters`` outside ``1..n_nodes``, or NaN/infinite codes.
    """
    codes = np.asarray(codes, dtype=np.float64)
    n_nodes = codes.shape[0]
    if not 1 <= n_clusters <= n_nodes:
        raise ValueError(f"{n_clusters} metaclusters asked for from {n_nodes} SOM nodes; "
                         f"it must be between 1 and the number of nodes")
    if not np.isfinite(codes).all():
        raise ValueError("SOM codes hold NaN or infinite values")
    if n_clusters == n_nodes:
        return np.arange(n_nodes, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_drawn = max(n_clusters, int(n_nodes * resample_fraction))
    # Euclidean distances once; a resample's linkage takes its rows and columns (the same
    # numbers linkage would compute from the drawn codes, without recomputing them).
    distances = squareform(pdist(codes, metric="euclidean"))
    drawn_mask = np.zeros((n_resamples, n_nodes))
    members = np.zeros((n_nodes, n_resamples * n_clusters))
    for r in range(n_resamples):
        drawn = np.sort(rng.choice(n_nodes, size=n_drawn, replace=False))
        labels = _cut_average_linkage(distances[np.ix_(drawn, drawn)], n_clusters,
                                      precomputed=True)
        drawn_mask[r, drawn] = 1.0
        members[drawn, r * n_clusters + labels] = 1.0
    # Times two nodes fell in one cluster, and times both were drawn: two matrix products
    # over the one-hot memberships of all resamples (exact counts in float64).
    with blas_single_threaded():  # small products
        together = members @ members.T
        drawn_together = drawn_mask.T @ drawn_mask
    consensus = together / np.maximum(drawn_together, 1.0)
    np.fill_diagonal(consensus, 1.0)
    distance = 1.0 - consensus
    np.fill_diagonal(distance, 0.0)
    labels = _cut_average_linkage(distance, n_clusters, precomputed=True)
    return _renumber_by_first_appearance(labels)


def _renumber_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    mapping = np.empty(order.size, dtype=np.int64)
    mapping[order] = np.arange(order.size)
    return mapping[np.searchsorted(np.unique(labels), labels)]
