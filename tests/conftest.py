"""Shared pytest fixtures (generic only)."""

from __future__ import annotations

from pathlib import Path

import pytest

REALFCS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realfcs"


@pytest.fixture
def realfcs_dir() -> Path:
    """The folder of real FCS test files beside the repository; skips when it is absent."""
    if not REALFCS_DIR.is_dir():
        pytest.skip(f"real FCS files not present at {REALFCS_DIR}")
    return REALFCS_DIR
