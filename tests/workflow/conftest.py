"""The one end-to-end run of the embedded default config that every workflow test inspecting outputs shares.

Where the machine can start a single-node SLURM (root, Debian's packages: tests/helpers/slurm_cluster.sh),
the run goes through ``snakemake --profile slurm`` exactly as on a cluster (the profiles installed by name
with ``python -m maisi.profiles install``), one job is cancelled mid-run with ``scancel``, and the SLURM
tests also check where each job went; elsewhere it runs with ``profiles/local``. CI always takes the SLURM
path. The run is a process of its own, started with the session (tests/helpers/default_run.py; the tests
that need it are ordered last), so the other tests run beside it. The runs made again from it (one more
case on a copy, the data stages in another directory) are made by the same process after it, and their
tests only inspect them (``default_run_record.derived``), so the shared run stays as it was made.
"""

from __future__ import annotations

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
