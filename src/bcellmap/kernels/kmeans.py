"""k-means (k-means++ initialisation, Lloyd iterations) and the shared nearest-centre kernel.

The nearest-centre kernel :func:`assign_nearest` is also how SOM nodes are found (a SOM node
is a k-means centre with a neighbourhood). The argmin over centres of ``||x - c||^2`` is that
of ``||x - c||^2 - ||x - s||^2 = -2 x.(c - s) + (c - s).(c + s)`` for any fixed ``s`` (here a
point near the data's centre): one matrix product of the rows with a ``d x k`` matrix plus a
bias, without the float32 cancellation of ``||c||^2 - 2 x.c`` when the data sit far from the
origin (see :class:`_Centres`). Per-centre sums for the centre update are accumulated in
float64 in the same pass.

Blocks: on the GPU a chunk is as large as the memory budget allows (one product per chunk;
float64). On the CPU (float32 for float32 input), chunks are spread over threads
(:meth:`Backend.parallel`, BLAS one thread per chunk) and each chunk is cut into blocks whose
score matrix stays in cache (about 1 MB), laid out centres x rows so that the minimum over
centres runs along contiguous rows. The argmin and the per-centre sums run either as NumPy
steps (a minimum, then the first centre reaching it; a sparse one-hot product for the sums)
or as compiled numba steps (:mod:`._nearest_cpu`) that give identical results several times
faster but cost about 0.45 s to load per process: they run once a call's work is large
enough to repay that (:func:`_use_compiled`). On the GPU the sums are one ``bincount`` per
column.

k-means++ follows scikit-learn's greedy variant (``2 + log(k)`` candidates per centre, drawn
with probability proportional to the squared distance, the one lowering the potential most is
kept); the candidates' distances to every row are one product per block, laid out candidates
x rows so that the minimum with the current distances and the potentials run along contiguous
rows. Lloyd iterations run on the same kernel (scikit-learn's definitions of the tolerance and
of convergence); ``use_sklearn=True`` runs scikit-learn's Lloyd loop from our centres instead.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .backend import Backend, ChunkRunner, check_finite

# Distance block per thread on the CPU, in bytes: small enough to stay in a core's cache.
_CPU_BLOCK_BYTES = 1 << 20
# Rows per chunk (one thread's task) on the CPU, whatever the number of threads, so that
# float64 sums are added in the same order and results do not depend on the machine.
_CPU_TASK_ROWS = 32_768
# Rows x centres x passes from which the compiled CPU steps repay their load (about 0.45 s):
# they save about 2.5 ns of CPU time per row, centre and pass (measured at k = 30 and 100).
_COMPILED_MIN_WORK = 200_000_000


def _use_compiled(backend: Backend, row_passes: int, n_centres: int) -> bool:
    """Whether a CPU pass should run the compiled steps: the process has loaded them already,
    or the work they would speed up (``row_passes`` times ``n_centres``; for an open-ended
    loop, the work done so far without them) repays loading them. False on the GPU, or where
    numba is missing."""
    if backend.is_gpu:
        return False
    loaded = sys.modules.get(f"{__package__}._nearest_cpu")  # not imported for small work
    if loaded is not None and loaded.is_loaded():
        return True
    if row_passes * n_centres < _COMPILED_MIN_WORK:
        return False
    try:
        from . import _nearest_cpu  # noqa: F401
    except ImportError:  # numba missing or broken: the NumPy steps give the same answers
        return False
    return True


@dataclass(frozen=True)
class Assignment:
    """Result of :func:`assign_nearest`, arrays on the backend's device.

    Attributes
    ----------
    labels
        int64, the nearest centre of each row.
    sqdist
        Squared Euclidean distance to that centre (clipped at 0), or None when not asked for.
    sums
        float64 ``(n_centres, n_features)`` sum of the rows assigned to each centre, or None.
    counts
        float64 ``(n_centres,)`` rows per centre, or None.
    """

    labels: Any
    sqdist: Any
    sums: Any = None
    counts: Any = None


def _compute_dtype(data: Any, backend: Backend) -> Any:
    # On the CPU, float32 input stays float32 (flow data; twice the matmul speed). On the GPU,
    # cuBLAS picks its algorithm by matrix shape, so float32 distances of one row can differ
    # between chunk sizes and flip near-ties: float64 keeps results independent of the memory
    # budget, and the GPU has the arithmetic to spare.
    if backend.is_gpu or np.dtype(data.dtype) != np.float32:
        return np.float64
    return np.float32


@dataclass(frozen=True)
class _Centres:
    """Centres prepared once for many products.

    With ``s`` a point near the data's centre, ``x @ weights + bias`` is
    ``||x - c||^2 - ||x - s||^2 = -2 x.(c - s) + (c - s).(c + s)``: the same argmin over the
    centres as the squared distance. Its float32 error scales with ``||x|| ||c - s||`` (not
    ``||c||^2`` as for ``||c||^2 - 2 x.c``); when the data sit far from the origin compared
    with the centres' spread, the rows are also shifted by ``s`` (``row_shift``, one copy per
    chunk), so that the error scales with the spread.
    """

    weights: Any  # (d, k), compute dtype: -2 (c - s) as columns
    bias: Any  # (k,), compute dtype: (c~ - s~).(c~ + s~), c~ and s~ less the row shift
    centre: Any  # s less the rows' shift, (d,), compute dtype
    row_shift: Any  # subtracted from the rows before the product, or None

    @property
    def count(self) -> int:
        """The number of centres, k."""
        return int(self.weights.shape[1])


def _prepare_centres(centres: Any, *, backend: Backend, dtype: Any, shift: Any = None
                     ) -> _Centres:
    """``shift`` (``s``) None: the centres' mean."""
    xp = backend.xp
    centres64 = backend.asarray(centres, dtype=np.float64)
    shift64 = (centres64.mean(axis=0) if shift is None
               else backend.asarray(shift, dtype=np.float64))
    offset = centres64 - shift64[None, :]
    # Shift the rows too only where float32 would lose the distances: the error grows with
    # ||s|| / spread (the centres' distance from s), 4e-6 of the spread at a factor of 64.
    # Flow data (arcsinh-transformed, or scaled) stay far below; data around 1e4 do not.
    spread = float(xp.sqrt((offset**2).sum(axis=1).max()))
    subtract = (np.dtype(dtype) == np.float32
                and float(xp.sqrt((shift64**2).sum())) > 64.0 * spread)
    row_shift = shift64 if subtract else xp.zeros_like(shift64)
    weights = -2.0 * offset.T
    bias = (offset * (centres64 + shift64[None, :] - 2.0 * row_shift[None, :])).sum(axis=1)
    return _Centres(weights=weights.astype(dtype), bias=bias.astype(dtype),
                    centre=(shift64 - row_shift).astype(dtype),
                    row_shift=row_shift.astype(dtype) if subtract else None)


def _rows(chunk: Any, centres: _Centres, *, backend: Backend, dtype: Any) -> Any:
    """A chunk on the device in the compute dtype, less the row shift if any (no copy when
    neither is needed)."""
    rows = backend.asarray(chunk, dtype=dtype)
    if centres.row_shift is not None:
        rows = rows - centres.row_shift[None, :]
    return rows


def _block_rows(backend: Backend, n_centres: int, itemsize: int, n_rows: int) -> int:
    """Rows per distance block: cache-sized on the CPU, the whole chunk on the GPU."""
    if backend.is_gpu:
        return max(1, n_rows)
    return max(64, _CPU_BLOCK_BYTES // max(1, n_centres * itemsize))


def _task_slices(backend: Backend, n_rows: int, *, bytes_per_row: float,
                 threads: int) -> list[slice]:
    """Chunks for the runner: on the GPU as the budget allows; on the CPU fixed-size chunks,
    smaller only when the budget per thread is smaller still."""
    if backend.is_gpu:
        return list(backend.chunks(n_rows, bytes_per_row=bytes_per_row))
    return list(backend.chunks(n_rows, bytes_per_row=bytes_per_row * threads,
                               max_rows=_CPU_TASK_ROWS))


def _nearest_rows(rows: Any, centres: _Centres, *, backend: Backend, labels: Any,
                  sqdist: Any, compiled: bool) -> None:
    """Nearest centre (and squared distance) of each row of one chunk, block by block,
    written into ``labels`` (and ``sqdist`` unless None): views of the chunk's rows.

    On the CPU the scores are laid out centres x rows: the minimum over centres then runs
    along contiguous rows (NumPy's row-wise argmin pays per row). ``compiled``: the numba
    steps of :mod:`._nearest_cpu` instead of NumPy's, with identical results.
    """
    xp = backend.xp
    step = _block_rows(backend, centres.count, rows.dtype.itemsize, rows.shape[0])
    weights_t = centres.weights.T
    if compiled:
        from . import _nearest_cpu
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        nearest = labels[start:start + step]
        if backend.is_gpu:
            scores = block @ centres.weights
            scores += centres.bias[None, :]
            xp.argmin(scores, axis=1, out=nearest)
            if sqdist is not None:  # flat indexing: faster than take_along_axis
                best = scores.ravel()[xp.arange(block.shape[0]) * centres.count + nearest]
        elif compiled:
            best = _nearest_cpu.nearest_columns(weights_t @ block.T, centres.bias, nearest)
        else:
            scores = weights_t @ block.T  # BLAS reads both transposes in place
            scores += centres.bias[:, None]
            best = scores.min(axis=0)
            np.argmax(scores == best[None, :], axis=0, out=nearest)  # first lowest, as argmin
        if sqdist is not None:
            # The score is the squared distance less ||x - s||^2; einsum is several times
            # faster than a sum over short rows.
            offset = block - centres.centre[None, :]
            rows_sq = xp.einsum("ij,ij->i", offset, offset).astype(np.float64)
            sqdist[start:start + step] = xp.maximum(best.astype(np.float64) + rows_sq, 0.0)


def _centre_sums(rows: Any, labels: Any, n_centres: int, *, backend: Backend, compiled: bool
                 ) -> tuple[Any, Any]:
    """float64 per-centre sums and counts of one chunk's rows (added in row order on the
    CPU, whichever step runs)."""
    xp = backend.xp
    if backend.is_gpu:
        counts = xp.bincount(labels, minlength=n_centres).astype(np.float64)
        sums = xp.stack([xp.bincount(labels, weights=rows[:, j].astype(np.float64),
                                     minlength=n_centres) for j in range(rows.shape[1])],
                        axis=1)
        return sums, counts
    if compiled:
        from . import _nearest_cpu

        return _nearest_cpu.centre_sums(np.ascontiguousarray(rows), labels, n_centres)
    from scipy.sparse import csc_matrix

    # One-hot (centres x rows), one entry per column: the product is one scatter-add pass in
    # compiled code, row by row (a bincount per feature re-reads the rows d times).
    m = rows.shape[0]
    onehot = csc_matrix((np.ones(m), labels, np.arange(m + 1)), shape=(n_centres, m))
    counts = np.bincount(labels, minlength=n_centres).astype(np.float64)
    return onehot @ rows.astype(np.float64), counts


def _assign(data: Any, centres: _Centres, *, backend: Backend, runner: ChunkRunner, dtype: Any,
            with_sums: bool, with_distances: bool, compiled: bool = False) -> Assignment:
    """One pass over ``data``; ``compiled`` (ignored on the GPU): the numba steps, same
    results."""
    xp = backend.xp
    n, n_features = data.shape
    itemsize = np.dtype(dtype).itemsize
    labels = xp.empty(n, dtype=np.int64)
    sqdist = xp.empty(n, dtype=np.float64) if with_distances else None
    # Per row: the row (a shifted copy, a float64 copy for the sums), label, distance; on the
    # GPU also the distance block and its temporaries, on the CPU cache-sized and fixed.
    bytes_per_row = n_features * (itemsize + 8) + 24
    if backend.is_gpu:
        bytes_per_row += 3 * centres.count * itemsize

    def task(rows: slice) -> tuple[Any, Any] | None:
        chunk = _rows(data[rows], centres, backend=backend, dtype=dtype)
        _nearest_rows(chunk, centres, backend=backend, labels=labels[rows],
                      sqdist=sqdist[rows] if with_distances else None, compiled=compiled)
        if with_sums:
            if centres.row_shift is not None:  # sum the rows as given, not as shifted
                chunk = backend.asarray(data[rows], dtype=dtype)
            return _centre_sums(chunk, labels[rows], centres.count, backend=backend,
                                compiled=compiled)
        return None

    parts = runner.map(task, _task_slices(backend, n, bytes_per_row=bytes_per_row,
                                          threads=runner.threads))
    sums = counts = None
    if with_sums:
        sums = xp.zeros((centres.count, n_features), dtype=np.float64)
        counts = xp.zeros(centres.count, dtype=np.float64)
        for part_sums, part_counts in parts:  # in chunk order: deterministic
            sums += part_sums
            counts += part_counts
    return Assignment(labels=labels, sqdist=sqdist, sums=sums, counts=counts)


def assign_nearest(
    data: Any,
    centres: Any,
    *,
    backend: Backend,
    with_sums: bool = False,
    with_distances: bool = True,
) -> Assignment:
    """Assign every row of ``data`` to its nearest centre, in chunks under the memory budget.

    Parameters
    ----------
    data
        ``(n, d)`` array on the host or on the device; host chunks are moved to the device
        one at a time, so ``data`` may be larger than device memory.
    centres
        ``(k, d)`` centres.
    backend
        Array backend and memory budget.
    with_sums
        Also return per-centre sums and counts (for a centre update), in float64.
    with_distances
        Return the squared distances (False saves a pass over each block).

    Returns
    -------
    Assignment
    """
    dtype = _compute_dtype(data, backend)
    prepared = _prepare_centres(centres, backend=backend, dtype=dtype)
    compiled = _use_compiled(backend, data.shape[0], prepared.count)
    with backend.parallel() as runner:
        return _assign(data, prepared, backend=backend, runner=runner, dtype=dtype,
                       with_sums=with_sums, with_distances=with_distances, compiled=compiled)


def _feature_means(data: Any, *, backend: Backend, runner: ChunkRunner) -> Any:
    """float64 mean of each column, summed chunk by chunk (no float64 copy of the data)."""
    slices = _task_slices(backend, data.shape[0], bytes_per_row=16 * data.shape[1],
                          threads=runner.threads)
    return sum(runner.map(lambda rows: data[rows].astype(np.float64).sum(axis=0), slices)
               ) / data.shape[0]


def _shifted_sq_norms(data: Any, shift: Any, *, backend: Backend, runner: ChunkRunner) -> Any:
    """float64 ``||x - shift||^2`` of every row."""
    xp = backend.xp
    out = xp.empty(data.shape[0], dtype=np.float64)

    def task(rows: slice) -> None:
        centred = data[rows].astype(np.float64) - shift[None, :]
        out[rows] = xp.einsum("ij,ij->i", centred, centred)

    runner.map(task, _task_slices(backend, data.shape[0], bytes_per_row=24 * data.shape[1],
                                  threads=runner.threads))
    return out


def kmeans_plusplus(
    data: Any,
    *,
    n_clusters: int,
    backend: Backend,
    seed: int,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy k-means++ initial centres (as scikit-learn: ``2 + log(k)`` trials per centre).

    Random numbers come from a NumPy generator on the host, so the CPU and the GPU draw the
    same candidates for the same seed.

    Parameters
    ----------
    data
        ``(n, d)`` array (host or device).
    n_clusters
        Number of centres, at most ``n``.
    backend
        Array backend and memory budget.
    seed
        Seed of the random draws.
    n_local_trials
        Candidates tried per centre; None: ``2 + int(log(k))``.

    Returns
    -------
    ``(n_clusters, d)`` float64 centres on the host.
    """
    xp = backend.xp
    n, n_features = data.shape
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    rng = np.random.default_rng(seed)
    data_dev = backend.asarray(data)  # moved once
    dtype = _compute_dtype(data_dev, backend)
    itemsize = np.dtype(dtype).itemsize
    centres = np.empty((n_clusters, n_features), dtype=np.float64)
    centres[0] = backend.to_host(data_dev[int(rng.integers(n))]).astype(np.float64)
    with backend.parallel() as runner:
        # A row's distances are kept less ||x - m||^2 (m: the data mean), which is what one
        # product gives (see _Centres); ||x - m||^2 is added back only for the D^2 weights.
        # Every candidate's potential then lacks the same sum over rows: the best is the same.
        shift = _feature_means(data_dev, backend=backend, runner=runner)
        row_sq = _shifted_sq_norms(data_dev, shift, backend=backend, runner=runner)
        slices = _task_slices(backend, n, bytes_per_row=n_features * itemsize
                              + 3 * n_local_trials * itemsize, threads=runner.threads)
        common = {"backend": backend, "dtype": dtype}
        closest = xp.empty((1, n), dtype=dtype)
        first = _prepare_centres(centres[:1], shift=shift, **common)
        runner.map(partial(_trial_potentials, data_dev, candidates=first, closest=None,
                           trial=closest, **common), slices)
        # Candidates x rows (contiguous rows: fast minimum and sums). The winner's row is kept
        # when the matrix fits the budget, else recomputed.
        keep_trials = n * n_local_trials * itemsize <= backend.budget_bytes
        trial = xp.empty((n_local_trials, n), dtype=dtype) if keep_trials else None
        for c in range(1, n_clusters):
            weights = xp.maximum(closest[0].astype(np.float64) + row_sq, 0.0)
            cumulative = xp.cumsum(weights)
            draws = backend.asarray(rng.random(n_local_trials) * float(cumulative[-1]))
            candidates = xp.minimum(xp.searchsorted(cumulative, draws), n - 1)
            candidate_rows = backend.to_host(data_dev[candidates]).astype(np.float64)
            prepared = _prepare_centres(candidate_rows, shift=shift, **common)
            potentials = sum(runner.map(  # in chunk order: deterministic
                partial(_trial_potentials, data_dev, candidates=prepared, closest=closest,
                        trial=trial, **common), slices))
            best = int(xp.argmin(potentials))
            if keep_trials:
                closest = trial[best:best + 1].copy()
            else:
                winner = _prepare_centres(candidate_rows[best:best + 1], shift=shift,
                                          **common)
                updated = xp.empty_like(closest)
                runner.map(partial(_trial_potentials, data_dev, candidates=winner,
                                   closest=closest, trial=updated, **common), slices)
                closest = updated
            centres[c] = candidate_rows[best]
    return centres


def _trial_potentials(data: Any, rows: slice, *, candidates: _Centres, closest: Any, trial: Any,
                      backend: Backend, dtype: Any) -> Any:
    """Squared distances (less ``||x - s||^2``) of one chunk's rows to each candidate, as
    ``(candidates, rows)``, floored by ``closest`` (``(1, n)``, when given) and stored in
    ``trial``; returns their float64 sums over the chunk's rows."""
    xp = backend.xp
    chunk = _rows(data[rows], candidates, backend=backend, dtype=dtype)
    step = _block_rows(backend, candidates.count, np.dtype(dtype).itemsize, chunk.shape[0])
    weights, bias = candidates.weights.T, candidates.bias[:, None]
    totals = xp.zeros(candidates.count, dtype=np.float64)
    for start in range(0, chunk.shape[0], step):  # cache-sized blocks on the CPU
        stop = min(start + step, chunk.shape[0])
        block = weights @ chunk[start:stop].T  # BLAS reads the transpose in place
        block += bias
        where = slice(rows.start + start, rows.start + stop)
        if closest is not None:
            xp.minimum(block, closest[:, where], out=block)
        if trial is not None:
            trial[:, where] = block
        totals += block.sum(axis=1, dtype=np.float64)
    return totals


@dataclass(frozen=True)
class KMeansResult:
    """A fitted k-means model (host arrays).

    Attributes
    ----------
    centres
        ``(k, d)`` float64 centres.
    labels
        int64 nearest centre of each training row.
    inertia
        Sum of squared distances of rows to their centre.
    n_iter
        Lloyd iterations run.
    """

    centres: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int


def _validate(data: Any, n_clusters: int, backend: Backend) -> None:
    if data.ndim != 2:
        raise ValueError(f"k-means needs a 2-d array of rows x features, got shape {data.shape}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    if data.shape[0] < n_clusters:
        raise ValueError(f"{data.shape[0]} rows are fewer than the {n_clusters} clusters asked for")
    check_finite(backend, data, what="k-means input")


def kmeans(
    data: Any,
    *,
    n_clusters: int,
    backend: Backend,
    seed: int,
    init: np.ndarray | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    use_sklearn: bool | None = None,
) -> KMeansResult:
    """Cluster rows by k-means: k-means++ initialisation, then Lloyd iterations.

    Parameters
    ----------
    data
        ``(n, d)`` array, host or device.
    n_clusters
        Number of clusters ``k``.
    backend
        Array backend and memory budget.
    seed
        Seed of the k-means++ draws.
    init
        ``(k, d)`` initial centres instead of k-means++.
    max_iter
        Most Lloyd iterations.
    tol
        Stop when the summed squared centre shift is at most ``tol`` times the mean feature
        variance (scikit-learn's definition); also stop when no label changes.
    use_sklearn
        Run the Lloyd iterations with scikit-learn's compiled loop on the CPU. None: no (our
        kernel, faster on 500k x 12 events, k = 30; see ``benchmarks/clustering.py``).
        Ignored on the GPU.

    Returns
    -------
    KMeansResult

    Raises
    ------
    ValueError
        Fewer rows than clusters, NaN or infinite values, or a wrong shape.
    """
    _validate(data, n_clusters, backend)
    if init is None:
        init = kmeans_plusplus(data, n_clusters=n_clusters, backend=backend, seed=seed)
    init = np.asarray(init, dtype=np.float64)
    if init.shape != (n_clusters, data.shape[1]):
        raise ValueError(f"init has shape {init.shape}, expected {(n_clusters, data.shape[1])}")
    if use_sklearn and not backend.is_gpu:
        return _kmeans_sklearn(np.asarray(data), init, max_iter=max_iter, tol=tol, seed=seed)
    return _kmeans_lloyd(data, init, backend=backend, max_iter=max_iter, tol=tol)


def _kmeans_sklearn(data: np.ndarray, init: np.ndarray, *, max_iter: int, tol: float,
                    seed: int) -> KMeansResult:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=init.shape[0], init=init.astype(data.dtype), n_init=1,
                   max_iter=max_iter, tol=tol, algorithm="lloyd", random_state=seed)
    model.fit(data)
    return KMeansResult(centres=model.cluster_centers_.astype(np.float64),
                        labels=model.labels_.astype(np.int64), inertia=float(model.inertia_),
                        n_iter=int(model.n_iter_))


def _mean_feature_variance(data: Any, *, backend: Backend, runner: ChunkRunner) -> float:
    """Mean over features of the variance, in float64 chunks (two passes, no full copy)."""
    xp = backend.xp
    mean = _feature_means(data, backend=backend, runner=runner)
    slices = _task_slices(backend, data.shape[0], bytes_per_row=16 * data.shape[1],
                          threads=runner.threads)

    def squares(rows: slice) -> Any:
        centred = data[rows].astype(np.float64) - mean[None, :]
        return (centred * centred).sum(axis=0)

    return float(xp.mean(sum(runner.map(squares, slices)) / data.shape[0]))


def _kmeans_lloyd(data: Any, init: np.ndarray, *, backend: Backend, max_iter: int,
                  tol: float) -> KMeansResult:
    xp = backend.xp
    data_dev = backend.asarray(data)  # once per call, not per iteration
    dtype = _compute_dtype(data_dev, backend)
    centres = backend.asarray(init, dtype=np.float64)
    previous = None
    n_iter = 0
    with backend.parallel() as runner:
        tol_abs = (tol * _mean_feature_variance(data_dev, backend=backend, runner=runner)
                   if tol > 0 else 0.0)
        for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is reported)
            # How many iterations are left is unknown: run NumPy until it has cost about as
            # much as loading the compiled steps (at most twice the best cost), then those.
            compiled = _use_compiled(backend, (n_iter - 1) * data.shape[0], init.shape[0])
            step = _assign(data_dev, _prepare_centres(centres, backend=backend, dtype=dtype),
                           backend=backend, runner=runner, dtype=dtype, with_sums=True,
                           with_distances=False, compiled=compiled)
            if previous is not None and bool(xp.array_equal(step.labels, previous)):
                break  # strict convergence: the centres are already the means of their rows
            previous = step.labels
            filled = step.counts > 0
            # An empty cluster keeps its centre (rare with k-means++; documented behaviour).
            updated = xp.where(filled[:, None],
                               step.sums / xp.maximum(step.counts, 1.0)[:, None], centres)
            shift = float(((updated - centres) ** 2).sum())
            centres = updated
            if shift <= tol_abs:
                break
        final = _assign(data_dev, _prepare_centres(centres, backend=backend, dtype=dtype),
                        backend=backend, runner=runner, dtype=dtype, with_sums=False,
                        with_distances=True,
                        compiled=_use_compiled(backend, n_iter * data.shape[0],
                                               init.shape[0]))
    return KMeansResult(centres=backend.to_host(centres), labels=backend.to_host(final.labels),
                        inertia=float(final.sqdist.sum()), n_iter=n_iter)
