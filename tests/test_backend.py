"""Device choice and memory budget of bcellmap.kernels.backend."""

from __future__ import annotations

import numpy as np
import pytest

from bcellmap.errors import BcellmapError, ConfigError
from bcellmap.kernels import backend as backend_module
from bcellmap.kernels.backend import check_finite, get_backend, gpu_status, resolve_device


@pytest.fixture(autouse=True)
def _no_env_device(monkeypatch):
    monkeypatch.delenv("BCELLMAP_DEVICE", raising=False)


def test_cpu_is_numpy():
    chosen = get_backend({"device": "cpu", "memory": {"host_budget_mb": 2}})
    assert chosen.xp is np and chosen.device == "cpu"
    assert chosen.budget_bytes == 2 * 2**20


def test_environment_overrides_config(monkeypatch):
    monkeypatch.setattr(backend_module, "gpu_status", lambda: (False, "no CuPy in this test"))
    monkeypatch.setenv("BCELLMAP_DEVICE", "cpu")
    device, reason = resolve_device("gpu")
    assert device == "cpu" and "BCELLMAP_DEVICE" in reason


def test_auto_falls_back_to_cpu_without_device(monkeypatch):
    # A SLURM node with CUDA_VISIBLE_DEVICES set but no GPU: CuPy imports, count is 0.
    monkeypatch.setattr(backend_module, "gpu_status",
                        lambda: (False, "cupy.cuda.runtime.getDeviceCount() is 0"))
    device, reason = resolve_device("auto")
    assert device == "cpu" and "getDeviceCount" in reason


def test_gpu_without_device_is_an_error_that_says_why(monkeypatch):
    monkeypatch.setattr(backend_module, "gpu_status", lambda: (False, "CuPy does not import"))
    with pytest.raises(BcellmapError, match="no GPU is usable: CuPy does not import"):
        get_backend({"device": "gpu"})


def test_real_gpu_status_is_consistent():
    usable, reason = gpu_status()
    assert isinstance(reason, str) and reason
    if not usable:
        with pytest.raises(BcellmapError):
            resolve_device("gpu")


def test_unknown_device_and_bad_budget():
    with pytest.raises(ConfigError, match="not one of"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="positive"):
        get_backend({"device": "cpu"}, budget_mb=0)


def test_chunks_cover_rows_under_budget():
    chosen = get_backend({"device": "cpu"}, budget_mb=1000 / 2**20)  # 1000 bytes
    slices = list(chosen.chunks(95, bytes_per_row=100))
    assert [s.stop - s.start for s in slices] == [10] * 9 + [5]
    assert chosen.chunk_rows(bytes_per_row=10**9) == 1


def test_check_finite():
    chosen = get_backend({"device": "cpu"})
    check_finite(chosen, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2 NaN or infinite"):
        check_finite(chosen, np.array([[np.nan, 1.0], [np.inf, 0.0]]))
