"""Gaussian mixture with full covariances, fitted by expectation-maximisation on the host.

The algorithm is scikit-learn's ``GaussianMixture(covariance_type="full",
init_params="kmeans")``: each initialisation starts from the one-hot responsibilities of a
k-means partition (here bcellmap's own k-means++ and Lloyd kernel), then alternates the
M-step (weights, means and covariances from the responsibilities, ``reg_covar`` added to every
covariance diagonal) and the E-step (log densities through the Cholesky factor of each
covariance) until the mean log-likelihood per row changes by less than ``tol``; of ``n_init``
initialisations the one with the highest final mean log-likelihood is kept. Tested against
scikit-learn on the same data (``tests/test_gmm.py``).

Why our own: the per-sample lymphocyte scatter gate (``flow/_qc.py``) fits a mixture on two
dimensions in every ingest job, and importing scikit-learn (which imports ``scipy.stats``)
cost 1.6 s there, more than reading, compensating, transforming and QC-ing a 20,000-event file
together. The data are small (a subsample of at most tens of thousands of rows, a handful of
dimensions), so this runs on NumPy only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .backend import Backend
from .kmeans import kmeans

# A tiny weight floor, as scikit-learn's ``10 * eps``: an emptied component keeps a defined
# mean instead of dividing by zero.
_WEIGHT_FLOOR = 10 * np.finfo(np.float64).eps
_HOST = Backend(xp=np, device="cpu", reason="Gaussian mixture initialisation (host)",
                budget_bytes=256 * 2**20)


@dataclass(frozen=True)
class GaussianMixtureResult:
    """A fitted Gaussian mixture (host arrays, float64).

    Attributes
    ----------
    weights
        ``(k,)`` mixing weights, summing to 1.
    means
        ``(k, d)`` component means.
    covariances
        ``(k, d, d)`` component covariances (``reg_covar`` included).
    lower_bound
        Mean log-likelihood per training row at the last E-step of the kept initialisation.
    converged
        Whether the kept initialisation met ``tol`` within ``max_iter`` iterations.
    n_iter
        EM iterations run by the kept initialisation.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    lower_bound: float
    converged: bool
    n_iter: int

    def log_responsibilities(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row log-likelihood and ``(n, k)`` log posterior of each component."""
        weighted = _weighted_log_density(np.asarray(data, dtype=np.float64), self.weights,
                                         self.means, self.covariances)
        log_norm = _logsumexp_rows(weighted)
        return log_norm, weighted - log_norm[:, None]

    def predict(self, data: np.ndarray) -> np.ndarray:
        """Most probable component of each row."""
        return np.argmax(self.log_responsibilities(data)[1], axis=1)


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    # Reductions over the few columns as element-wise maxima and a matrix product: NumPy's
    # reductions along a short last axis are many times slower.
    top = values[:, 0].copy()
    for column in range(1, values.shape[1]):
        np.maximum(top, values[:, column], out=top)
    top[~np.isfinite(top)] = 0.0
    return top + np.log(np.exp(values - top[:, None]) @ np.ones(values.shape[1]))


def _weighted_log_density(data: np.ndarray, weights: np.ndarray, means: np.ndarray,
                          covariances: np.ndarray) -> np.ndarray:
    """``log w_k + log N(x | mu_k, Sigma_k)`` for every row and component, ``(n, k)``."""
    n_components, n_dims = means.shape
    # With L L^T = Sigma and P = L^-T, |(x - mu) P|^2 is the squared Mahalanobis distance:
    # all components' P side by side make it one matrix product of the rows.
    precision_factors = np.empty((n_dims, n_components * n_dims))
    log_det = np.empty(n_components)
    for component, covariance in enumerate(covariances):
        cholesky = np.linalg.cholesky(covariance)
        factor = np.linalg.inv(cholesky).T
        precision_factors[:, component * n_dims:(component + 1) * n_dims] = factor
        log_det[component] = 2.0 * np.log(np.diag(cholesky)).sum()
    offsets = np.einsum("kd,kde->ke", means,
                        precision_factors.reshape(n_dims, n_components, n_dims).transpose(1, 0, 2))
    whitened = data @ precision_factors - offsets.reshape(-1)
    block_sums = np.repeat(np.eye(n_components), n_dims, axis=0)
    mahalanobis = (whitened * whitened) @ block_sums
    return (np.log(weights) - 0.5 * (n_dims * math.log(2 * math.pi) + log_det)
            - 0.5 * mahalanobis)


def _m_step(data: np.ndarray, outer: np.ndarray, responsibilities: np.ndarray, reg_covar: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and covariances from responsibilities (``outer``: rows' x x^T, flat)."""
    totals = np.ones(data.shape[0]) @ responsibilities + _WEIGHT_FLOOR
    means = (responsibilities.T @ data) / totals[:, None]
    n_dims = data.shape[1]
    # E[x x^T] - mu mu^T; the rows are centred on their mean first (_fit_once), which keeps
    # the subtraction well conditioned.
    second = (responsibilities.T @ outer / totals[:, None]).reshape(-1, n_dims, n_dims)
    covariances = second - means[:, :, None] * means[:, None, :]
    covariances[:, np.arange(n_dims), np.arange(n_dims)] += reg_covar
    return totals / totals.sum(), means, covariances


def _fit_once(data: np.ndarray, outer: np.ndarray, *, n_components: int, seed: int,
              reg_covar: float, tol: float, max_iter: int) -> GaussianMixtureResult:
    labels = kmeans(data, n_clusters=n_components, backend=_HOST, seed=seed).labels
    responsibilities = np.zeros((data.shape[0], n_components))
    responsibilities[np.arange(data.shape[0]), labels] = 1.0
    weights, means, covariances = _m_step(data, outer, responsibilities, reg_covar)
    lower_bound = -np.inf
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is reported)
        weighted = _weighted_log_density(data, weights, means, covariances)
        log_norm = _logsumexp_rows(weighted)
        weights, means, covariances = _m_step(data, outer, np.exp(weighted - log_norm[:, None]),
                                              reg_covar)
        previous, lower_bound = lower_bound, float(log_norm.mean())
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return GaussianMixtureResult(weights=weights, means=means, covariances=covariances,
                                 lower_bound=lower_bound, converged=converged, n_iter=n_iter)


def gaussian_mixture(
    data: np.ndarray,
    *,
    n_components: int,
    seed: int,
    n_init: int = 1,
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
) -> GaussianMixtureResult:
    """Fit a full-covariance Gaussian mixture by EM, best of ``n_init`` k-means starts.

    Parameters
    ----------
    data
        ``(n, d)`` finite values.
    n_components
        Mixture components ``k``, at most ``n``.
    seed
        Seeds the k-means++ draws of every initialisation.
    n_init
        Initialisations; the one with the highest mean log-likelihood is returned.
    reg_covar
        Added to the diagonal of every covariance (keeps them positive definite).
    tol
        Convergence threshold on the change of the mean log-likelihood per row.
    max_iter
        Most EM iterations per initialisation.

    Returns
    -------
    GaussianMixtureResult

    Raises
    ------
    ValueError
        Fewer rows than components, NaN or infinite values, a wrong shape, ``n_init < 1``, or
        a covariance that is not positive definite (raise ``reg_covar``).
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D, got shape {data.shape}")
    if not 1 <= n_components <= data.shape[0]:
        raise ValueError(f"n_components={n_components} must be in 1..{data.shape[0]} (rows)")
    if n_init < 1:
        raise ValueError(f"n_init must be at least 1, got {n_init}")
    if not np.isfinite(data).all():
        raise ValueError("data hold NaN or infinite values")
    # Fitted on centred rows (see _m_step); the means are shifted back at the end.
    shift = data.mean(axis=0)
    centred = data - shift
    # Every row's x x^T, flat: the M-step's second moments are one product with it.
    outer = (centred[:, :, None] * centred[:, None, :]).reshape(centred.shape[0], -1)
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=n_init)
    best = None
    for init_seed in seeds:
        try:
            fitted = _fit_once(centred, outer, n_components=n_components, seed=int(init_seed),
                               reg_covar=reg_covar, tol=tol, max_iter=max_iter)
        except np.linalg.LinAlgError as exc:
            raise ValueError("a mixture covariance is not positive definite; increase "
                             f"reg_covar (now {reg_covar})") from exc
        if best is None or fitted.lower_bound > best.lower_bound:
            best = fitted
    return dataclasses.replace(best, means=best.means + shift)
