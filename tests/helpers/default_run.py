"""The shared end-to-end run of the embedded default config, made in a thread by the first test that needs it.

The tests that need it are ordered after every other test (:func:`order_items`). Running the other tests
beside it (at normal priority, nice 19 or SCHED_IDLE) shortened the suite by up to 28 %, but twice left a
subprocess hanging (TotalSegmentator's worker processes, a signal test), so the run is made alone.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import slurm_runner
from helpers.paths import ROOT
from helpers.workflow_runner import make_workdir, snakemake

#: The fixtures through which a test uses the shared run (tests/workflow/conftest.py).
FIXTURE = "default_run_record"


@dataclass
class DefaultRunRecord:
    work: Path
    config: dict
    slurm: slurm_runner.SlurmRun | None  # None where the run went through profiles/local
    local_reason: str | None  # why it did (None for a SLURM run)


class DefaultRun:
    """One run of the embedded default config in a thread: :meth:`start`, then :meth:`result` and :meth:`close`."""

    KEY = pytest.StashKey["DefaultRun"]()

    def __init__(self, root: Path):
        self.root = root
        self._thread: threading.Thread | None = None
        self._record: DefaultRunRecord | None = None
        self._error: BaseException | None = None
        self._cluster_up = False
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="default-run", daemon=True)
        self._thread.start()

    def result(self) -> DefaultRunRecord:
        if self._thread is None:
            self.start()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the shared default run failed: {self._error}") from self._error
        return self._record

    def close(self) -> None:
        """Stop a run still going (a session ended early: its SLURM jobs are cancelled), then the cluster it started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._cluster_up:
            slurm_runner.cluster("down")
            self._cluster_up = False

    def _run(self) -> None:
        try:
            self._record = self._make()
        except BaseException as exc:  # re-raised by result() in the test that needs the run
            self._error = exc

    def _make(self) -> DefaultRunRecord:
        cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
        cfg["catalog"] = str(ROOT / "config/datasets.yaml")
        reason = slurm_runner.cluster_unavailable()
        if reason and os.environ.get("CI"):
            raise RuntimeError(f"CI runs the default config through SLURM, but {reason}")
        if reason:
            work = make_workdir(self.root / "work", cfg)
            snakemake(work, "--profile", str(ROOT / "profiles/local"), "all", timeout=2400)
            return DefaultRunRecord(work, cfg, None, reason)
        slurm_runner.cluster("up")
        self._cluster_up = True
        cfg["cluster"] = {"cpu_partition": "cpu", "gpu_partition": "gpu", "max_mem_mb": slurm_runner.node_memory_mb()}
        work = make_workdir(self.root / "work", cfg)
        env = slurm_runner.install_profiles(self.root / "xdg-config")
        run = slurm_runner.run_workflow(
            work,
            "all",
            env=env,
            cancel_rule="train_vae",
            cancel_after_s=8,
            stop=self._stop,  # cancelled mid-training
        )
        if run.returncode != 0:
            raise RuntimeError(f"snakemake --profile slurm all failed ({run.returncode}):\n{run.output[-8000:]}")
        return DefaultRunRecord(work, cfg, run, None)


def needs_default_run(item: pytest.Item) -> bool:
    return FIXTURE in getattr(item, "fixturenames", ())


def order_items(items: list[pytest.Item]) -> None:
    """Tests that need the shared run last, each group in its collected order (pytest_collection_modifyitems)."""
    items[:] = [i for i in items if not needs_default_run(i)] + [i for i in items if needs_default_run(i)]
