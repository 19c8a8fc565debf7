"""Shared fixtures; the helpers they and the tests use live in ``tests/helpers/``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.paths import REAL_CT


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The two real chest CTs (pyradiomics test data) beside the checkout."""
    if not (REAL_CT / "lung1_image.nrrd").exists():
        pytest.skip(f"real CT folder {REAL_CT} is absent (expected ../shared/data/real-ct beside the checkout)")
    return REAL_CT
