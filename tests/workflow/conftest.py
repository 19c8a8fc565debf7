"""The one end-to-end run of the embedded default config that every workflow test inspecting outputs shares.

Where the machine can start a single-node SLURM (root, Debian's packages: tests/helpers/slurm_cluster.sh),
the run goes through ``profiles/slurm`` exactly as on a cluster, one job is cancelled mid-run with
``scancel``, and the SLURM tests also check where each job went; elsewhere it runs with
``profiles/local``. CI always takes the SLURM path. Tests that run the workflow again with another
config work on a copy (:func:`default_copy`), so the shared run stays as it was made.
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml
from helpers import slurm_runner
from helpers.paths import ROOT
from helpers.workflow_runner import make_workdir, snakemake


@pytest.fixture(scope="session")
def cluster():
    """A running single-node SLURM, or None where this machine cannot have one (never in CI)."""
    reason = slurm_runner.cluster_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the default config through SLURM, but {reason}")
        yield None
        return
    slurm_runner.cluster("up")
    try:
        yield slurm_runner.node_memory_mb()
    finally:
        slurm_runner.cluster("down")


@pytest.fixture(scope="session")
def default_run_record(cluster, tmp_path_factory):
    """The embedded default config run once (site settings added for the SLURM run): (workdir, config, SlurmRun or None)."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    cfg["catalog"] = str(ROOT / "config/datasets.yaml")
    if cluster:
        cfg["cluster"] = {"cpu_partition": "cpu", "gpu_partition": "gpu", "max_mem_mb": cluster}
    work = make_workdir(tmp_path_factory.mktemp("default") / "work", cfg)
    if cluster is None:
        snakemake(work, "--profile", str(ROOT / "profiles/local"), "all", timeout=2400)
        return work, cfg, None
    run = slurm_runner.run_workflow(work, "all", cancel_rule="train_vae", cancel_after_s=8)  # mid-training
    assert run.returncode == 0, run.output[-8000:]
    return work, cfg, run


@pytest.fixture(scope="session")
def default_run(default_run_record):
    """(workdir, config) of the shared default run. Tests may change its config to dry-run, and restore it."""
    return default_run_record[:2]


@pytest.fixture
def slurm_run(default_run_record):
    run = default_run_record[2]
    if run is None:
        pytest.skip("the default run went through profiles/local: " + str(slurm_runner.cluster_unavailable()))
    return run


@pytest.fixture
def default_copy(default_run, tmp_path):
    """A copy of the default run's working directory (outputs, file times and Snakemake's records), to run again."""
    work, _ = default_run
    copy = tmp_path / "work"
    shutil.copytree(work, copy, symlinks=True)
    return copy
