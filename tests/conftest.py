"""Shared pytest fixtures (generic only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bcellmap.kernels.backend import gpu_status

REALFCS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realfcs"
FLOWATLAS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "workspaces" / "flowatlas"


@pytest.fixture
def realfcs_dir() -> Path:
    """The folder of real FCS test files beside the repository; skips when it is absent."""
    if not REALFCS_DIR.is_dir():
        pytest.skip(f"real FCS files not present at {REALFCS_DIR}")
    return REALFCS_DIR


@pytest.fixture
def flowatlas_dir() -> Path:
    """The real FlowJo workspace with its FCS files beside the repository; skips when absent."""
    if not (FLOWATLAS_DIR / "workspace.wsp").is_file():
        pytest.skip(f"the FlowJo workspace is not present at {FLOWATLAS_DIR}")
    return FLOWATLAS_DIR


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    """Run a test on NumPy and, where CuPy sees a GPU, on CuPy (marked ``gpu``)."""
    monkeypatch.delenv("BCELLMAP_DEVICE", raising=False)
    if request.param == "gpu" and not gpu_status()[0]:
        pytest.skip(gpu_status()[1])
    return request.param
