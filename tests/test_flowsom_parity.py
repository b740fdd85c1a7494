"""bcellmap's SOM + metaclustering is at least as accurate as the flowsom package.

Both run in the same test on the same data with the same grid, passes (rlen 10) and number of
metaclusters; accuracy is the adjusted Rand index against known labels (simulated mixtures,
and the manual gates of FlowSOM's own example file) and the recall of a rare population.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.metacluster import consensus_metaclusters
from bcellmap.kernels.som import map_to_nodes, train_som

fs = pytest.importorskip("flowsom")

REALFCS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realfcs"


def _bcellmap_labels(data, *, device, n_clusters, seed):
    backend = get_backend(device=device)
    codes = train_som(data, backend=backend, seed=seed, xdim=10, ydim=10)
    nodes, _ = map_to_nodes(data, codes, backend=backend)
    return consensus_metaclusters(codes, n_clusters=n_clusters, seed=seed)[nodes]


def _flowsom_labels(data, *, n_clusters, seed):
    model = fs.models.FlowSOMEstimator(xdim=10, ydim=10, n_clusters=n_clusters, seed=seed)
    return model.fit_predict(np.asarray(data, dtype=np.float64))


def _rare_recall(truth: np.ndarray, labels: np.ndarray, rare: int) -> float:
    """Share of the rare population's events in clusters where it is the majority."""
    table = np.zeros((labels.max() + 1, truth.max() + 1), dtype=int)
    np.add.at(table, (labels, truth), 1)
    return table[table.argmax(axis=1) == rare, rare].sum() / table[:, rare].sum()


def test_simulated_mixture(device):
    rng = np.random.default_rng(11)
    n_pops, n = 8, 8000
    centres = rng.uniform(-1, 4, size=(n_pops, 8))
    weights = np.array([0.4, 0.2, 0.12, 0.1, 0.08, 0.05, 0.03, 0.02])
    truth = rng.choice(n_pops, size=n, p=weights)
    data = (centres[truth] + rng.normal(0, 0.3, size=(n, 8))).astype(np.float32)
    ours = np.mean([adjusted_rand_score(truth, _bcellmap_labels(data, device=device,
                                                                n_clusters=n_pops, seed=s))
                    for s in (1, 2)])
    theirs = np.mean([adjusted_rand_score(truth, _flowsom_labels(data, n_clusters=n_pops, seed=s))
                      for s in (1, 2)])
    assert ours >= theirs - 0.01, (ours, theirs)
    assert ours > 0.9


def test_rare_population_as_well_as_flowsom(device):
    # The benchmark's setting, smaller: 12 populations and one of 0.3% (90 of 30,000 events),
    # the same events, grid, passes and number of metaclusters for both.
    rng = np.random.default_rng(12)
    centres = rng.uniform(0, 6, size=(13, 12))
    weights = np.append(rng.dirichlet(np.full(12, 2.0)) * 0.997, 0.003)
    truth = rng.choice(13, size=30_000, p=weights)
    data = (centres[truth] + rng.normal(0, 0.4, size=(30_000, 12))).astype(np.float32)
    ours = [_bcellmap_labels(data, device=device, n_clusters=13, seed=s) for s in (1, 2)]
    theirs = [_flowsom_labels(data, n_clusters=13, seed=s) for s in (1, 2)]
    ours_recall = np.mean([_rare_recall(truth, labels, 12) for labels in ours])
    theirs_recall = np.mean([_rare_recall(truth, labels, 12) for labels in theirs])
    assert ours_recall >= theirs_recall - 0.02, (ours_recall, theirs_recall)
    assert ours_recall > 0.95
    ours_ari = np.mean([adjusted_rand_score(truth, labels) for labels in ours])
    theirs_ari = np.mean([adjusted_rand_score(truth, labels) for labels in theirs])
    assert ours_ari >= theirs_ari - 0.01, (ours_ari, theirs_ari)


@pytest.mark.realfcs
@pytest.mark.skipif(not (REALFCS / "flowsom_ff.fcs").exists(), reason="realfcs folder absent")
def test_flowsom_example_file_against_manual_gates(device):
    import flowio
    import pandas as pd

    fcs = flowio.FlowData(str(REALFCS / "flowsom_ff.fcs"))
    events = fcs.as_array(preprocess=False)
    # Already compensated and transformed: the fluorescence channels are used as they are.
    data = events[:, list(fcs.fluoro_indices)].astype(np.float32)
    labels = pd.read_csv(REALFCS / "flowsom_ff_labels.csv")["label"].to_numpy()
    gated = labels != "Unlabeled"
    assert data.shape == (19225, 11) and gated.sum() == 19225 - 5554
    ours = np.mean([adjusted_rand_score(labels[gated], _bcellmap_labels(
        data, device=device, n_clusters=10, seed=s)[gated]) for s in (1, 2)])
    theirs = np.mean([adjusted_rand_score(labels[gated], _flowsom_labels(
        data, n_clusters=10, seed=s)[gated]) for s in (1, 2)])
    assert ours >= theirs, (ours, theirs)
