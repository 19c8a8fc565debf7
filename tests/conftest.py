"""Shared fixtures; the helpers they and the tests use live in ``tests/helpers/``."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads wait for a partner thread asleep rather than spinning (read when PyTorch loads; every
# Snakemake and SLURM job inherits it): the shared default run's jobs and the tests beside it share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from helpers.default_run import DefaultRun, DefaultRunRecord, needs_default_run, order_items  # noqa: E402
from helpers.paths import REAL_CT  # noqa: E402


def pytest_collection_modifyitems(config, items):
    order_items(items)  # the tests that need the shared default run last, after every other test


@pytest.fixture(scope="session", autouse=True)
def _shared_default_run(request, tmp_path_factory):
    """The shared default run (tests/helpers/default_run.py): started with the session where a collected
    test needs it, so the other tests run beside it; its cluster stopped at the end."""
    run = DefaultRun(tmp_path_factory.mktemp("default"))
    request.config.stash[DefaultRun.KEY] = run
    if any(needs_default_run(item) for item in request.session.items):
        run.start()
    yield
    run.close()


@pytest.fixture(scope="session")
def default_run_record(request) -> DefaultRunRecord:
    """The embedded default config run once (see :class:`helpers.default_run.DefaultRunRecord`); tests/workflow/conftest.py
    builds the fixtures the workflow tests use on it."""
    run: DefaultRun = request.config.stash[DefaultRun.KEY]
    return run.result()


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The two real chest CTs (pyradiomics test data) beside the checkout."""
    if not (REAL_CT / "lung1_image.nrrd").exists():
        pytest.skip(f"real CT folder {REAL_CT} is absent (expected ../shared/data/real-ct beside the checkout)")
    return REAL_CT
