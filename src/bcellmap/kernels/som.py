"""Self-organising map as FlowSOM builds it, trained by batch updates on NumPy or CuPy.

FlowSOM (Van Gassen et al. 2015) trains a ``xdim x ydim`` grid by online updates: codes start
at randomly drawn events, and every node within a Chebyshev grid distance ``radius`` of the
winning node moves towards the event by ``alpha``, with the radius shrinking linearly from the
0.67 quantile of the grid distances to 0 and ``alpha`` from 0.05 to 0.01 over ``rlen`` passes.

Here each pass is one *batch* update over all training events (Kohonen's batch SOM): every
event is assigned to its nearest code, and each code moves towards the mean of the events won
by the nodes in its neighbourhood (the same Chebyshev "bubble" as FlowSOM)::

    target_j = sum_i h(bmu_i, j) x_i / sum_i h(bmu_i, j)
    code_j  <- code_j + alpha_t (target_j - code_j)

with the radius shrinking linearly from ``radius`` to 0 and the batch learning rate ``alpha_t``
from ``alpha[0]`` to ``alpha[1]`` over the passes. The sums per node come out of the
nearest-node pass, and ``h`` acts on the ``n_nodes x d`` sums, so a pass costs one distance
matrix product plus O(n d). A batch pass replaces ``n`` online steps, which is why the batch
learning rate is of order 1 where FlowSOM's online rate is 0.05. The last passes run at radius
0, which are Lloyd k-means steps on the codes: mapping quality at the end is that of k-means.

A pass is the nearest-centre kernel of :mod:`bcellmap.kernels.kmeans` (on the CPU one matrix
product per cache-sized block, in float32 for float32 events, chunks spread over threads, the
compiled argmin and sums when the training is large enough to repay loading them; on the GPU
float64 chunks sized by the memory budget) plus per-node sums in the same pass, so a pass
costs about as much as mapping the events once. The events are never copied whole.

Events are mapped to nodes by the nearest code (:func:`map_to_nodes`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend, check_finite
from .kmeans import _assign, _compute_dtype, _prepare_centres, _use_compiled, assign_nearest


def grid_distances(xdim: int, ydim: int) -> np.ndarray:
    """Chebyshev distances between the nodes of a ``xdim x ydim`` grid (FlowSOM's order).

    Node ``i`` sits at ``(i // ydim, i % ydim)``, as FlowSOM enumerates
    ``[(x, y) for x in range(xdim) for y in range(ydim)]``.
    """
    coords = np.array([(x, y) for x in range(xdim) for y in range(ydim)], dtype=np.float64)
    return np.abs(coords[:, None, :] - coords[None, :, :]).max(axis=2)


def default_radius(xdim: int, ydim: int) -> float:
    """FlowSOM's start radius: the 0.67 quantile of the grid distances."""
    return float(np.quantile(grid_distances(xdim, ydim), 0.67))


def train_som(
    data: Any,
    *,
    backend: Backend,
    seed: int,
    xdim: int = 10,
    ydim: int = 10,
    rlen: int = 10,
    alpha: tuple[float, float] = (1.0, 0.5),
    radius: float | None = None,
) -> np.ndarray:
    """Train a self-organising map by batch updates.

    Parameters
    ----------
    data
        ``(n, d)`` training events (host or device; moved to the device once).
    backend
        Array backend and memory budget.
    seed
        Seed for drawing the initial codes from the events.
    xdim, ydim
        Grid size; ``xdim * ydim`` nodes.
    rlen
        Batch passes over the training data (at least 1).
    alpha
        Batch learning rate at the first and the last pass (in (0, 1]).
    radius
        Start neighbourhood radius in grid units; None: FlowSOM's default
        (:func:`default_radius`). It shrinks linearly to 0 at the last pass.

    Returns
    -------
    ``(xdim * ydim, d)`` float64 codebook on the host.

    Raises
    ------
    ValueError
        Fewer events than nodes, NaN or infinite values, or invalid parameters.
    """
    n_nodes = xdim * ydim
    if data.ndim != 2:
        raise ValueError(f"SOM training needs a 2-d array of events x markers, got {data.shape}")
    if xdim < 1 or ydim < 1 or rlen < 1:
        raise ValueError(f"xdim, ydim and rlen must be positive, got {xdim}, {ydim}, {rlen}")
    if not all(0 < a <= 1 for a in alpha):
        raise ValueError(f"batch learning rates must lie in (0, 1], got {alpha}")
    if data.shape[0] < n_nodes:
        raise ValueError(f"{data.shape[0]} training events are fewer than the {n_nodes} SOM "
                         f"nodes ({xdim}x{ydim})")
    check_finite(backend, data, what="SOM training data")
    xp = backend.xp
    rng = np.random.default_rng(seed)
    data_dev = backend.asarray(data)  # once per training run
    dtype = _compute_dtype(data_dev, backend)
    start_rows = np.sort(rng.choice(data.shape[0], size=n_nodes, replace=False))
    codes = backend.asarray(backend.to_host(data_dev[backend.asarray(start_rows)]),
                            dtype=np.float64)
    grid = backend.asarray(grid_distances(xdim, ydim))
    start_radius = default_radius(xdim, ydim) if radius is None else float(radius)
    compiled = _use_compiled(backend, data.shape[0] * rlen, n_nodes)
    with backend.parallel() as runner:  # one thread pool for all passes
        for t in range(rlen):
            progress = t / (rlen - 1) if rlen > 1 else 1.0
            current_radius = start_radius * (1.0 - progress)
            rate = alpha[0] + (alpha[1] - alpha[0]) * progress
            step = _assign(data_dev, _prepare_centres(codes, backend=backend, dtype=dtype),
                           backend=backend, runner=runner, dtype=dtype, with_sums=True,
                           with_distances=False, compiled=compiled)
            # Bubble neighbourhood; +1e-9 keeps integer radii inclusive against rounding.
            neighbourhood = (grid <= current_radius + 1e-9).astype(np.float64)
            weight = neighbourhood @ step.counts
            target_sums = neighbourhood @ step.sums
            reached = weight > 0
            target = target_sums / xp.maximum(weight, 1.0)[:, None]
            codes = xp.where(reached[:, None], codes + rate * (target - codes), codes)
    return backend.to_host(codes)


def map_to_nodes(data: Any, codes: Any, *, backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """Map every event to its nearest SOM node, in chunks under the memory budget.

    Parameters
    ----------
    data
        ``(n, d)`` events (host or device). ``n`` may be 0.
    codes
        ``(n_nodes, d)`` codebook.
    backend
        Array backend and memory budget.

    Returns
    -------
    nodes, distances
        int64 node of each event and the Euclidean distance to its code (host arrays).
    """
    if data.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    check_finite(backend, data, what="events to map")
    step = assign_nearest(data, codes, backend=backend)
    return backend.to_host(step.labels), np.sqrt(backend.to_host(step.sqdist))
