"""The array-module seam: CuPy on a GPU or NumPy on the CPU, with a memory budget.

Every clustering kernel is written once against ``backend.xp`` and processes its input in
row chunks sized by :meth:`Backend.chunk_rows`, so memory stays bounded by the configured
budget (``memory.gpu_budget_mb`` / ``memory.host_budget_mb``) and inputs larger than device
memory still run.

Device choice (``device`` in the config, overridden by the environment variable
``BCELLMAP_DEVICE``):

- ``cpu``: NumPy.
- ``gpu``: CuPy; when CuPy does not import or sees no device this is a
  :class:`~bcellmap.errors.BcellmapError` that says why, never a silent fallback.
- ``auto``: the GPU only when CuPy imports **and** ``cupy.cuda.runtime.getDeviceCount() > 0``
  (a SLURM job may set ``CUDA_VISIBLE_DEVICES`` on a node without a GPU), else NumPy.

On the CPU, :meth:`Backend.parallel` runs independent row chunks on a thread pool with BLAS
held to one thread per chunk (as scikit-learn's compiled loops do): NumPy releases the GIL in
its matrix products and reductions, and small products on a multi-threaded BLAS spend their
time synchronising threads, catastrophically so when other processes share the cores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import BcellmapError, ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")
ENV_DEVICE = "BCELLMAP_DEVICE"
_DEFAULT_BUDGET_MB = {"cpu": 1024.0, "gpu": 4096.0}
_BLAS_CONTROLLER: list[Any] = []  # threadpoolctl's controller, built once (it scans libraries)


def host_threads() -> int:
    """CPU threads a host kernel may use: the CPUs this process may run on (SLURM's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def blas_single_threaded() -> Iterator[None]:
    """Hold BLAS to one thread inside the block (no-op without threadpoolctl).

    For small matrix products: a threaded BLAS spends them synchronising its threads, up to
    100x slower than one thread when other processes share the cores.
    """
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # a scikit-learn dependency, but not ours: run unlimited
            _BLAS_CONTROLLER.append(None)
        else:
            _BLAS_CONTROLLER.append(ThreadpoolController())
    controller = _BLAS_CONTROLLER[0]
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


class ChunkRunner:
    """Applies a function to row chunks, in order; see :meth:`Backend.parallel`."""

    def __init__(self, pool: ThreadPoolExecutor | None, threads: int) -> None:
        self._pool = pool
        self.threads = threads  # chunks processed at once

    def map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[function(item) for item in items]``, computed concurrently on the CPU."""
        if self._pool is None:
            return [function(item) for item in items]
        return list(self._pool.map(function, items))


def gpu_status() -> tuple[bool, str]:
    """Say whether a CUDA GPU is usable through CuPy.

    Returns
    -------
    usable, reason
        ``usable`` is True when CuPy imports and reports at least one device; ``reason``
        explains the answer in words (for logs and error messages).
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError when the driver sees no device
        return False, f"CuPy imports but the CUDA runtime reports no device ({exc})"
    if count <= 0:
        return False, "CuPy imports but cupy.cuda.runtime.getDeviceCount() is 0"
    return True, f"CuPy {cupy.__version__} sees {count} CUDA device(s)"


def resolve_device(requested: str | None = None) -> tuple[str, str]:
    """Resolve a device request to ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    requested
        ``auto``, ``gpu`` or ``cpu`` (None means ``auto``). The environment variable
        ``BCELLMAP_DEVICE``, when set, overrides it.

    Returns
    -------
    device, reason
        The chosen device and why it was chosen.

    Raises
    ------
    ConfigError
        An unknown device name.
    BcellmapError
        ``gpu`` was asked for and no GPU is usable.
    """
    source = "config"
    env_value = os.environ.get(ENV_DEVICE, "").strip()
    if env_value:
        requested, source = env_value, f"environment {ENV_DEVICE}"
    requested = (requested or "auto").strip().lower()
    if requested not in DEVICES:
        raise ConfigError(f"device {requested!r} (from {source}) is not one of "
                          f"{', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu", f"device: cpu requested by {source}"
    usable, why = gpu_status()
    if requested == "gpu":
        if not usable:
            raise BcellmapError(f"device: gpu requested by {source}, but no GPU is usable: {why}")
        return "gpu", f"device: gpu requested by {source}; {why}"
    if usable:
        return "gpu", f"device: auto chose the GPU; {why}"
    return "cpu", f"device: auto chose the CPU; {why}"


@dataclass(frozen=True)
class Backend:
    """An array module with its device and memory budget.

    Attributes
    ----------
    xp
        ``numpy`` or ``cupy``.
    device
        ``"cpu"`` or ``"gpu"``.
    reason
        Why this device was chosen.
    budget_bytes
        Working memory a chunked kernel may use at once.
    """

    xp: ModuleType
    device: str
    reason: str
    budget_bytes: int

    @property
    def is_gpu(self) -> bool:
        """True on the CuPy backend."""
        return self.device == "gpu"

    def asarray(self, array: Any, *, dtype: Any = None) -> Any:
        """Move ``array`` to this backend's device (no copy when it is already there)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array: Any) -> np.ndarray:
        """Return ``array`` as a NumPy array on the host."""
        if self.is_gpu and not isinstance(array, np.ndarray):
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def chunk_rows(self, *, bytes_per_row: float, n_rows: int | None = None) -> int:
        """Rows per chunk so that a chunk's working arrays fit the memory budget.

        Parameters
        ----------
        bytes_per_row
            Working memory one row needs (all temporaries together).
        n_rows
            Total rows; the answer is never larger (and at least 1).
        """
        rows = max(1, int(self.budget_bytes // max(1.0, float(bytes_per_row))))
        if n_rows is not None:
            rows = min(rows, max(1, int(n_rows)))
        return rows

    def chunks(self, n_rows: int, *, bytes_per_row: float, max_rows: int | None = None
               ) -> Iterator[slice]:
        """Yield row slices covering ``range(n_rows)`` under the memory budget.

        ``max_rows`` caps the chunk size further (a cache-sized block on the CPU).
        """
        step = self.chunk_rows(bytes_per_row=bytes_per_row, n_rows=n_rows)
        if max_rows is not None:
            step = max(1, min(step, int(max_rows)))
        for start in range(0, n_rows, step):
            yield slice(start, min(start + step, n_rows))

    @contextmanager
    def parallel(self, *, threads: int | None = None) -> Iterator[ChunkRunner]:
        """A :class:`ChunkRunner` for independent chunks: threads on the CPU, serial on the GPU.

        On the CPU, BLAS is held to one thread while the block runs (with one thread too:
        callers cut work into small products, which a threaded BLAS only slows), each chunk
        being one thread's work; each chunk's memory counts once per thread against the
        budget, so callers size chunks by ``budget / runner.threads``. Results come back in
        chunk order, so reductions over them are deterministic.

        Parameters
        ----------
        threads
            Threads to use; None: :func:`host_threads`.
        """
        n_threads = host_threads() if threads is None else max(1, int(threads))
        if self.is_gpu:
            yield ChunkRunner(None, 1)
            return
        with blas_single_threaded():
            if n_threads == 1:
                yield ChunkRunner(None, 1)
                return
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                yield ChunkRunner(pool, n_threads)


def get_backend(
    config: Mapping[str, Any] | None = None,
    *,
    device: str | None = None,
    budget_mb: float | None = None,
) -> Backend:
    """Choose the array backend from the config (and ``BCELLMAP_DEVICE``) and log the choice.

    Parameters
    ----------
    config
        The merged bcellmap config; uses ``device`` and ``memory.{gpu,host}_budget_mb``.
    device
        Overrides ``config["device"]`` (the environment variable still wins over both).
    budget_mb
        Overrides the configured memory budget (megabytes, fractions allowed; tests use tiny
        budgets to force chunking).

    Returns
    -------
    Backend
    """
    config = config or {}
    chosen, reason = resolve_device(device if device is not None else config.get("device"))
    if budget_mb is None:
        memory = config.get("memory") or {}
        key = "gpu_budget_mb" if chosen == "gpu" else "host_budget_mb"
        budget_mb = memory.get(key, _DEFAULT_BUDGET_MB[chosen])
    try:
        budget_mb = float(budget_mb)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"memory budget {budget_mb!r} is not a number of megabytes") from exc
    if not budget_mb > 0:
        raise ConfigError(f"memory budget must be positive, got {budget_mb} MB")
    if chosen == "gpu":
        import cupy as xp
    else:
        xp = np
    log.info("%s (memory budget %.1f MB per kernel)", reason, budget_mb)
    return Backend(xp=xp, device=chosen, reason=reason, budget_bytes=int(budget_mb * 2**20))


def check_finite(backend: Backend, data: Any, *, what: str = "input") -> None:
    """Raise ``ValueError`` when ``data`` holds NaN or infinite values.

    Callers that know the file and sample turn this into an ``InputError``.
    """
    # A host array is checked on the host: no transfer just to look at it.
    mod = np if isinstance(data, np.ndarray) else backend.xp
    if data.size and not bool(mod.isfinite(data).all()):
        n_bad = int((~mod.isfinite(data)).sum())
        raise ValueError(f"{what} holds {n_bad} NaN or infinite value(s)")
