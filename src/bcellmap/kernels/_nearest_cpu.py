"""Compiled (numba) CPU steps of the nearest-centre pass: argmin over centres, per-centre sums.

NumPy's ``argmin`` along the rows of a short score matrix pays about 50 ns of overhead per
row (k-means with k = 30: 1.7 ms of a 2.7 ms chunk of 32,768 rows), and the sums per centre
need a second pass. Here the scores are laid out centres x rows, so the running minimum runs
along contiguous rows and compiles to vector instructions, and the sums are one scatter pass.
Both give exactly what the NumPy steps in :mod:`bcellmap.kernels.kmeans` give (the same
float32 additions, the first centre among equal scores, float64 sums added in row order), so
which one runs changes the speed, never the answer.

numba is a dependency of scanpy (and so of ours). Importing it and loading the cached
machine code takes about 0.45 s per process (about 1 s to compile the first time), so the
NumPy steps run small passes (see :func:`bcellmap.kernels.kmeans._use_compiled`).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np


def _jit(function: Any) -> Any:
    # Cache the machine code on disk (next to this file, or in numba's user cache) so later
    # processes load it instead of compiling; without a writable cache place, compile.
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


@_jit
def _nearest_columns(scores: np.ndarray, bias: np.ndarray, labels: np.ndarray,
                     best: np.ndarray) -> None:  # pragma: no cover (runs compiled)
    n_centres, n_rows = scores.shape
    first = bias[0]
    for row in range(n_rows):
        best[row] = scores[0, row] + first
        labels[row] = 0
    for centre in range(1, n_centres):
        offset = bias[centre]
        for row in range(n_rows):
            # Branch-free, so the loop over contiguous rows vectorises; strict "<" keeps the
            # first centre among equal scores, as argmin does.
            score = scores[centre, row] + offset
            lower = score < best[row]
            best[row] = score if lower else best[row]
            labels[row] = centre if lower else labels[row]


@_jit
def _scatter_sums(rows: np.ndarray, labels: np.ndarray, sums: np.ndarray,
                  counts: np.ndarray) -> None:  # pragma: no cover (runs compiled)
    n_rows, n_features = rows.shape
    for row in range(n_rows):
        label = labels[row]
        counts[label] += 1.0
        for feature in range(n_features):
            sums[label, feature] += rows[row, feature]


def is_loaded() -> bool:
    """Whether this process has already paid for the machine code (any input dtype)."""
    return bool(_nearest_columns.signatures)


def nearest_columns(scores: np.ndarray, bias: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Nearest centre of each column of ``scores + bias[:, None]``; returns the lowest scores.

    Parameters
    ----------
    scores
        ``(centres, rows)`` C-contiguous, float32 or float64.
    bias
        ``(centres,)`` in the dtype of ``scores``, added to each centre's row.
    labels
        ``(rows,)`` int64, written: the first centre with the lowest score.

    Returns
    -------
    ``(rows,)`` lowest score of each column, in the dtype of ``scores``.
    """
    best = np.empty(scores.shape[1], dtype=scores.dtype)
    _nearest_columns(scores, bias, labels, best)
    return best


def centre_sums(rows: np.ndarray, labels: np.ndarray, n_centres: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-centre sums and counts of ``rows``, added in row order."""
    sums = np.zeros((n_centres, rows.shape[1]), dtype=np.float64)
    counts = np.zeros(n_centres, dtype=np.float64)
    _scatter_sums(rows, labels, sums, counts)
    return sums, counts
