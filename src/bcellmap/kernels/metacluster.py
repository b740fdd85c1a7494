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
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def _cut_average_linkage(points_or_dist: np.ndarray, n_clusters: int, *,
                         precomputed: bool) -> np.ndarray:
    if precomputed:
        tree = linkage(squareform(points_or_dist, checks=False), method="average")
    else:
        tree = linkage(points_or_dist, method="average", metric="euclidean")
    return fcluster(tree, t=n_clusters, criterion="maxclust") - 1


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
    together = np.zeros((n_nodes, n_nodes))
    drawn_together = np.zeros((n_nodes, n_nodes))
    for _ in range(n_resamples):
        drawn = np.sort(rng.choice(n_nodes, size=n_drawn, replace=False))
        labels = _cut_average_linkage(codes[drawn], n_clusters, precomputed=False)
        same = (labels[:, None] == labels[None, :]).astype(np.float64)
        together[np.ix_(drawn, drawn)] += same
        drawn_together[np.ix_(drawn, drawn)] += 1.0
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
