"""PCA against scikit-learn (dense) and sparse against densified input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from bcellmap.kernels.backend import get_backend
from bcellmap.kernels.pca import pca


def _counts(n: int = 800, d: int = 60, seed: int = 0) -> sp.csr_matrix:
    # Low-rank log-counts: sparse like scRNA, with a few strong axes.
    rng = np.random.default_rng(seed)
    rates = np.exp(rng.normal(0, 1, (n, 4)) @ rng.normal(0, 0.8, (4, d)) - 1.0)
    return sp.csr_matrix(np.log1p(rng.poisson(rates)).astype(np.float64))


def test_explained_variance_matches_sklearn(device):
    dense = _counts().toarray()
    ours = pca(dense, n_components=10, backend=get_backend(device=device))
    reference = PCA(n_components=10, svd_solver="full").fit(dense)
    np.testing.assert_allclose(ours.explained_variance, reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_ratio,
                               reference.explained_variance_ratio_, rtol=1e-4)
    # Axes agree up to sign (scikit-learn's convention is followed, so signs agree too).
    np.testing.assert_allclose(np.abs(ours.components[:5]), np.abs(reference.components_[:5]),
                               atol=1e-6)
    np.testing.assert_allclose(np.abs(ours.scores[:, :5]),
                               np.abs(reference.transform(dense)[:, :5]), atol=1e-6)


def test_sparse_equals_densified_under_tiny_budget(device):
    counts = _counts()
    tiny = get_backend(device=device, budget_mb=0.01)
    sparse_fit = pca(counts, n_components=6, backend=tiny)
    dense_fit = pca(counts.toarray(), n_components=6, backend=get_backend(device=device))
    np.testing.assert_allclose(sparse_fit.explained_variance, dense_fit.explained_variance,
                               rtol=1e-10)
    np.testing.assert_allclose(sparse_fit.scores, dense_fit.scores, atol=1e-8)
    np.testing.assert_allclose(sparse_fit.transform(counts[:10], backend=tiny),
                               dense_fit.scores[:10], atol=1e-8)


def test_bad_input(device):
    backend = get_backend(device=device)
    with pytest.raises(ValueError, match="n_components"):
        pca(np.zeros((5, 3)), n_components=4, backend=backend)
    data = np.ones((5, 3))
    data[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        pca(data, n_components=2, backend=backend)


def test_row_blocks_equal_the_stacked_matrix_against_sklearn(device):
    # One block per sample (CSR and dense mixed, uneven sizes) must fit the PCA of the stack.
    counts = _counts(n=900)
    blocks = [counts[:250], counts[250:260].toarray(), counts[260:]]
    backend = get_backend(device=device, budget_mb=0.05)  # several chunks within each block
    ours = pca(blocks, n_components=6, backend=backend)
    dense = counts.toarray()
    reference = PCA(n_components=6, svd_solver="full").fit(dense)
    np.testing.assert_allclose(ours.explained_variance, reference.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(ours.mean, dense.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(ours.scores, reference.transform(dense), atol=1e-8)
    np.testing.assert_allclose(ours.transform(blocks, backend=backend), ours.scores, atol=1e-10)
    with pytest.raises(ValueError, match="differ in width"):
        pca([dense[:, :5], dense[:, :6]], n_components=2, backend=backend)
    with pytest.raises(ValueError, match="empty list"):
        pca([], n_components=2, backend=backend)
