"""The one end-to-end run of the embedded default config that every workflow test inspecting outputs shares.

Where the machine can start a single-node SLURM (root, Debian's packages: tests/helpers/slurm_cluster.sh),
the run goes through ``snakemake --profile slurm`` exactly as on a cluster (the profiles installed by name
with ``python -m maisi.profiles install``), one job is cancelled mid-run with ``scancel``, and the SLURM
tests also check where each job went; elsewhere it runs with ``profiles/local``. CI always takes the SLURM
path. The run starts in the background when the session's first test starts (tests/helpers/default_run.py;
the tests that need it are ordered last), so the other tests use the time its jobs spend queued. Tests that
run the workflow again with another config work on a copy (:func:`default_copy`), so the shared run stays
as it was made.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def default_run(default_run_record):
    """(workdir, config) of the shared default run. Tests may change its config to dry-run, and restore it."""
    return default_run_record.work, default_run_record.config


@pytest.fixture
def slurm_run(default_run_record):
    if default_run_record.slurm is None:
        pytest.skip(f"the default run went through profiles/local: {default_run_record.local_reason}")
    return default_run_record.slurm


@pytest.fixture
def default_copy(default_run, tmp_path):
    """A copy of the default run's working directory (outputs, file times and Snakemake's records), to run again."""
    work, _ = default_run
    copy = tmp_path / "work"
    shutil.copytree(work, copy, symlinks=True)
    return copy
