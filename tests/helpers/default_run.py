"""The shared end-to-end run of the embedded default config, made in a process of its own beside the other tests.

Most of that run's time is its jobs' Python start-ups, SLURM's status checks and single-threaded steps,
when a core is idle; so it starts when the session starts (if a collected test needs it), the tests that
need it are ordered after every other test (:func:`order_items`), and the others run meanwhile.

Two things made an earlier version of this (a thread of the pytest process, the other tests at nice 19
or SCHED_IDLE) unreliable, and both are designed out here:

- The run is a separate process (``python -m helpers.default_run``), so the pytest process has no
  second thread: a test that forks (TotalSegmentator's workers, the signal test) cannot inherit a lock
  held by the run's thread at the moment of the fork.
- Every process runs at normal priority, and OpenMP threads sleep instead of spinning while they wait
  for a partner thread (``OMP_WAIT_POLICY=PASSIVE``, set by tests/conftest.py before PyTorch loads and
  inherited by every Snakemake job, SLURM's included): two 2-thread PyTorch processes on two cores then
  share them instead of burning the other's time, and no test is starved by a lower priority.

The run's config is the embedded default with ``config/test.yaml`` on top (:func:`run_config`).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from helpers import slurm_runner
from helpers.paths import ROOT
from helpers.workflow_runner import PREPARED, make_workdir, planned_jobs, snakemake

#: The fixtures through which a test uses the shared run (tests/workflow/conftest.py).
FIXTURE = "default_run_record"
#: What the run's process leaves in its folder: the pickled record (or the traceback), its output, and a marker
#: written before it starts the SLURM cluster (so the session brings down even a part-started one).
RECORD, LOG, CLUSTER_MARKER = "record.pickle", "default_run.log", "cluster-up"


@dataclass
class DerivedRun:
    """A run made from the shared one by the same background process, for a test that only inspects it."""

    work: Path
    planned: dict[str, int]  # the jobs a dry run planned before it ran
    before: dict[str, int]  # st_mtime_ns of files that must stay untouched, by path relative to ``work``


@dataclass
class DefaultRunRecord:
    work: Path
    config: dict
    slurm: slurm_runner.SlurmRun | None  # None where the run went through profiles/local
    local_reason: str | None  # why it did (None for a SLURM run)
    derived: dict[str, DerivedRun] = field(default_factory=dict)


def run_config() -> dict:
    """The embedded default config with the test budget of ``config/test.yaml`` on top."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    update_config(cfg, yaml.safe_load((ROOT / "config/test.yaml").read_text(encoding="utf-8")) or {})  # as --configfile merges
    cfg["catalog"] = str(ROOT / "config/datasets.yaml")
    return cfg


class DefaultRun:
    """The shared run as a child process: :meth:`start`, then :meth:`result` and :meth:`close`."""

    KEY = pytest.StashKey["DefaultRun"]()

    def __init__(self, root: Path):
        self.root = root
        self._proc: subprocess.Popen | None = None
        self._record: DefaultRunRecord | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        log = open(self.root / LOG, "w", encoding="utf-8")  # noqa: SIM115 - the child holds it
        with log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "helpers.default_run", str(self.root)], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def result(self) -> DefaultRunRecord:
        if self._record is not None:
            return self._record
        if self._proc is None:
            self.start()
        self._proc.wait()
        record = self.root / RECORD
        outcome = pickle.loads(record.read_bytes()) if record.is_file() else None
        if not isinstance(outcome, DefaultRunRecord):
            log = (self.root / LOG).read_text(encoding="utf-8", errors="replace")[-8000:]
            raise RuntimeError(f"the shared default run failed (exit {self._proc.returncode}):\n{outcome or ''}\n{log}")
        self._record = outcome
        return outcome

    def close(self) -> None:
        """Stop a run still going (a session ended early: its SLURM jobs are cancelled), then the cluster it started."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        marker = self.root / CLUSTER_MARKER
        if marker.exists():
            slurm_runner.cluster("down")
            marker.unlink()


def _make(root: Path) -> DefaultRunRecord:
    cfg = run_config()
    reason = slurm_runner.cluster_unavailable()
    if reason and os.environ.get("CI"):
        raise RuntimeError(f"CI runs the default config through SLURM, but {reason}")
    if reason:
        work = make_workdir(root / "work", cfg)
        snakemake(work, "--profile", str(ROOT / "profiles/local"), "all", timeout=2400)
        record = DefaultRunRecord(work, cfg, None, reason)
    else:
        (root / CLUSTER_MARKER).touch()  # before "up": a part-started cluster is brought down too
        slurm_runner.cluster("up")
        cfg["cluster"] = {"cpu_partition": "cpu", "gpu_partition": "gpu", "max_mem_mb": slurm_runner.node_memory_mb()}
        work = make_workdir(root / "work", cfg)
        env = slurm_runner.install_profiles(root / "xdg-config")
        run = slurm_runner.run_workflow(work, "all", env=env, cancel_rule="train_vae", cancel_after_s=8)  # cancelled mid-training
        if run.returncode != 0:
            raise RuntimeError(f"snakemake --profile slurm all failed ({run.returncode}):\n{run.output[-8000:]}")
        record = DefaultRunRecord(work, cfg, run, None)
    # Runs the workflow tests would otherwise make after the shared one, while the other tests still go on.
    record.derived = {"more_cases": _more_cases(root, work), "prepared_again": _prepared_again(root, cfg)}
    return record


def image_only_request(cfg: dict) -> str:
    """The first request of ``cfg`` generated without masks."""
    return next(name for name, r in cfg["generate"]["requests"].items() if r.get("masks") is False)


def _more_cases(root: Path, work: Path) -> DerivedRun:
    """A copy of the shared run with one more case of the image-only request and a new release version, run with `all`."""
    copy = root / "more-cases"
    shutil.copytree(work, copy, symlinks=True)  # outputs, file times and Snakemake's records
    path = copy / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    free = image_only_request(cfg)
    first = f"results/generated/{free}/imagesTr/{free}_00000.nii.gz"
    cfg["generate"]["requests"][free]["n_cases"] += 1
    cfg["release"] = {"version": "0.2.0"}  # new content, new release version
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    before = {first: (copy / first).stat().st_mtime_ns}
    planned = planned_jobs(copy, "all")
    snakemake(copy, "all", timeout=900)
    return DerivedRun(copy, planned, before)


def _prepared_again(root: Path, cfg: dict) -> DerivedRun:
    """The data stages of the same config, with one phantom case, in another working directory."""
    small = dict(cfg, sources={"phantom": dict(cfg["sources"]["phantom"], n_cases=1)})
    small.pop("cluster", None)
    other = make_workdir(root / "prepared-again", small)
    snakemake(other, *PREPARED)
    return DerivedRun(other, {}, {})


def _terminate(signum, frame):  # SIGTERM from close(): unwind, so run_workflow kills Snakemake and cancels its jobs
    raise KeyboardInterrupt


def main(root: Path) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    start = time.monotonic()
    try:
        outcome: object = _make(root)
    except BaseException:  # noqa: BLE001 - reported by result() in the test that needs the run
        outcome = traceback.format_exc()
    tmp = root / f"{RECORD}.tmp"
    tmp.write_bytes(pickle.dumps(outcome))
    tmp.replace(root / RECORD)
    print(f"default run: {'done' if isinstance(outcome, DefaultRunRecord) else 'failed'} in {time.monotonic() - start:.0f} s", flush=True)
    return 0 if isinstance(outcome, DefaultRunRecord) else 1


def needs_default_run(item: pytest.Item) -> bool:
    return FIXTURE in getattr(item, "fixturenames", ())


def order_items(items: list[pytest.Item]) -> None:
    """Tests that need the shared run last, each group in its collected order (pytest_collection_modifyitems)."""
    items[:] = [i for i in items if not needs_default_run(i)] + [i for i in items if needs_default_run(i)]


if __name__ == "__main__":
    from helpers.default_run import main as _main  # the record's classes pickled by their importable names

    sys.exit(_main(Path(sys.argv[1])))
