"""Principal component analysis for the single-cell path, dense or CSR input, NumPy or CuPy.

Method: covariance eigendecomposition. The ``d x d`` scatter matrix ``X^T X`` and the column
sums are accumulated over row chunks (a CSR chunk is densified one chunk at a time, never the
whole matrix; the input may also be a list of row blocks, e.g. one per sample, so that the
stacked matrix never has to exist), centred as ``(X^T X - n mu mu^T) / (n - 1)``, and
decomposed with ``eigh`` in float64. This is exact (not randomized) and suits the gene counts
of the single-cell path (a few thousand highly variable genes: the covariance is a few tens of
MB). Signs follow scikit-learn (>= 1.5): in each component the loading of largest magnitude
is positive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend


@dataclass(frozen=True)
class PCAResult:
    """A fitted PCA (host arrays).

    Attributes
    ----------
    scores
        ``(n, n_components)`` projections of the input rows.
    components
        ``(n_components, d)`` principal axes (unit rows).
    explained_variance
        Variance along each axis (denominator ``n - 1``, as scikit-learn).
    explained_variance_ratio
        Its share of the total variance.
    mean
        ``(d,)`` column means.
    """

    scores: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray

    def transform(self, data: Any, *, backend: Backend) -> np.ndarray:
        """Project new rows (dense or CSR) onto the fitted axes, chunked."""
        return _project(data, self.mean, self.components, backend=backend)


# On the host a chunk of a few thousand rows already runs BLAS at full speed; larger ones
# only cost memory (and fresh pages are slow to come by on some virtual machines).
_HOST_CHUNK_ROWS = 4096


def _is_sparse(data: Any) -> bool:
    return hasattr(data, "tocsr") and hasattr(data, "nnz")


def stacked_shape(data: Any) -> tuple[int, int]:
    """``(rows, columns)`` of a matrix, or of a list of row blocks taken as stacked."""
    blocks = _as_blocks(data)
    return sum(block.shape[0] for block in blocks), blocks[0].shape[1]


def _as_blocks(data: Any) -> list[Any]:
    """The input as a list of row blocks (a single matrix is one block)."""
    if isinstance(data, Sequence) and not isinstance(data, np.ndarray):
        blocks = list(data)
        if not blocks:
            raise ValueError("PCA got an empty list of row blocks")
        widths = {block.shape[1] for block in blocks}
        if len(widths) != 1:
            raise ValueError(f"PCA row blocks differ in width: {sorted(widths)}")
        return blocks
    return [data]


def _dense_chunks(blocks: list[Any], backend: Backend, *, bytes_per_row: float
                  ) -> Iterator[tuple[slice, Any]]:
    """Row slices of the stacked blocks with each slice densified on the backend (float64)."""
    offset = 0
    max_rows = None if backend.is_gpu else _HOST_CHUNK_ROWS
    for block in blocks:
        n_rows = block.shape[0]
        for rows in backend.chunks(n_rows, bytes_per_row=bytes_per_row, max_rows=max_rows):
            chunk = block[rows]
            if _is_sparse(chunk):
                chunk = chunk.toarray()  # one chunk only; the budget bounds its size
            yield (slice(offset + rows.start, offset + rows.stop),
                   backend.asarray(chunk, dtype=np.float64))
        offset += n_rows


def _project(data: Any, mean: np.ndarray, components: np.ndarray, *,
             backend: Backend) -> np.ndarray:
    blocks = _as_blocks(data)
    n, d = stacked_shape(blocks)
    mean_dev = backend.asarray(mean)
    axes = backend.asarray(components)
    out = np.empty((n, components.shape[0]), dtype=np.float64)
    for rows, chunk in _dense_chunks(blocks, backend, bytes_per_row=3 * d * 8):
        out[rows] = backend.to_host((chunk - mean_dev[None, :]) @ axes.T)
    return out


def pca(data: Any, *, n_components: int, backend: Backend) -> PCAResult:
    """Fit a PCA by covariance eigendecomposition and project the rows.

    Parameters
    ----------
    data
        ``(n, d)`` dense array or SciPy CSR matrix (host), or a device array; or a list of
        such row blocks of equal width, taken as stacked in order.
    n_components
        Axes to keep, ``1..min(n - 1, d)``.
    backend
        Array backend and memory budget.

    Returns
    -------
    PCAResult

    Raises
    ------
    ValueError
        Too few rows, ``n_components`` out of range, or NaN/infinite values.
    """
    blocks = _as_blocks(data)
    n, d = stacked_shape(blocks)
    if n < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {n}")
    if not 1 <= n_components <= min(n - 1, d):
        raise ValueError(f"n_components={n_components} must be in 1..{min(n - 1, d)}")
    for block in blocks:
        values = block.data if _is_sparse(block) else block
        mod = backend.xp if not isinstance(values, np.ndarray) else np
        if not bool(mod.isfinite(values).all()):
            raise ValueError("PCA input holds NaN or infinite values")
    xp = backend.xp
    scatter = xp.zeros((d, d), dtype=np.float64)
    column_sums = xp.zeros(d, dtype=np.float64)
    for _, chunk in _dense_chunks(blocks, backend, bytes_per_row=2 * d * 8):
        scatter += chunk.T @ chunk
        column_sums += chunk.sum(axis=0)
    mean = column_sums / n
    covariance = (scatter - n * xp.outer(mean, mean)) / (n - 1)
    eigenvalues, eigenvectors = xp.linalg.eigh(covariance)
    order = xp.argsort(eigenvalues)[::-1][:n_components]
    explained = xp.maximum(eigenvalues[order], 0.0)
    components = eigenvectors[:, order].T
    # scikit-learn's sign convention: the largest |loading| of each axis is positive.
    largest = xp.argmax(xp.abs(components), axis=1)
    signs = xp.sign(components[xp.arange(n_components), largest])
    components = components * xp.where(signs == 0, 1.0, signs)[:, None]
    total = float(xp.trace(covariance))
    mean_host, components_host = backend.to_host(mean), backend.to_host(components)
    explained_host = backend.to_host(explained)
    return PCAResult(
        scores=_project(blocks, mean_host, components_host, backend=backend),
        components=components_host,
        explained_variance=explained_host,
        explained_variance_ratio=explained_host / total if total > 0 else explained_host * 0,
        mean=mean_host,
    )
