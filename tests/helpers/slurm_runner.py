"""A real single-node SLURM for the tests (``tests/helpers/slurm_cluster.sh``) and the workflow run through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.paths import ROOT

SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
STEADY_POLLING = Path(__file__).with_name("snakemake_steady_polling.py")
#: The site arguments the README gives for a cluster without accounting (no slurmdbd, so no sacct).
SITE_ARGS = ("--slurm-no-account", "--slurm-status-command", "squeue")
#: What the test run adds: a first status check after 2 s (the plugin's default waits 40 s) and a short
#: latency wait (the test cluster's file system is local).
QUICK_ARGS = ("--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "10")


def cluster_unavailable() -> str | None:
    """Why this machine cannot start the test cluster (None when it can)."""
    if sys.platform != "linux":
        return "a single-node SLURM needs Linux"
    if os.geteuid() != 0:
        return "starting a single-node SLURM needs root (tests/helpers/slurm_cluster.sh)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is absent (tests/helpers/slurm_cluster.sh installs Debian's packages)"
    return None


def cluster(action: str) -> subprocess.CompletedProcess:
    """Run ``slurm_cluster.sh up|down|status``; ``down`` stops every daemon ``up`` started (munged, slurmctld, slurmd).

    An ``up`` that fails or times out part-way is followed by a ``down``, so no daemon it started is left running.
    """
    try:
        proc = subprocess.run(["bash", str(SCRIPT), action], capture_output=True, encoding="utf-8", timeout=900)
    except subprocess.TimeoutExpired:
        if action == "up":
            subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, encoding="utf-8", timeout=120)
        raise
    if proc.returncode != 0:
        if action == "up":
            subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, encoding="utf-8", timeout=120)
        raise RuntimeError(f"tests/helpers/slurm_cluster.sh {action} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def node_memory_mb() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%m"], capture_output=True, encoding="utf-8", check=True).stdout.split()
    return int(out[0].rstrip("+"))


@dataclass
class SlurmJob:
    job_id: str
    rule: str
    partition: str
    gpus: str
    state: str


@dataclass
class SlurmRun:
    returncode: int
    output: str
    jobs: dict[str, SlurmJob]
    cancelled: list[str]
    env: dict[str, str]  # the environment it ran in (the installed profiles)

    def of_rule(self, rule: str) -> list[SlurmJob]:
        return [j for j in self.jobs.values() if j.rule == rule]


def rule_of(comment: str) -> str:
    """The rule of a job from the comment the SLURM executor gives it (``rule_<name>[_wildcards_...]``)."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def all_jobs() -> dict[str, SlurmJob]:
    """Every job slurmctld still knows (the test cluster keeps finished ones for an hour: MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, encoding="utf-8").stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobId" not in fields:
            continue
        rule = rule_of(fields.get("Comment", ""))
        gpus = ",".join(v for k, v in fields.items() if k in ("TresPerJob", "TresPerNode") and v != "(null)")
        jobs[fields["JobId"]] = SlurmJob(fields["JobId"], rule, fields.get("Partition", ""), gpus, fields.get("JobState", ""))
    return jobs


def install_profiles(home: Path) -> dict[str, str]:
    """Install the factory's profiles by name (``python -m maisi.profiles install``, as the README says) into
    ``home``; returns the environment under which ``snakemake --profile slurm`` finds them."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(home), "PYTHONIOENCODING": "utf-8"}
    subprocess.run(
        [sys.executable, "-m", "maisi.profiles", "install"], check=True, env=env, capture_output=True, encoding="utf-8"
    )
    return env


def command(*args: str, steady_polling: bool = True) -> list[str]:
    """The README's command for a working directory of one's own, run in that directory.

    ``snakemake --snakefile <checkout>/Snakefile --profile slurm --slurm-no-account --slurm-status-command squeue ARGS``
    with the ``snakemake`` program itself; with ``steady_polling``, through Snakemake's own command line with a
    steady status interval (tests/helpers/snakemake_steady_polling.py) and :data:`QUICK_ARGS`.
    """
    if steady_polling:
        return [
            sys.executable,
            str(STEADY_POLLING),
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--profile",
            "slurm",
            *SITE_ARGS,
            *QUICK_ARGS,
            *args,
        ]
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    return [snakemake, "--snakefile", str(ROOT / "Snakefile"), "--profile", "slurm", *SITE_ARGS, *args]


def run_workflow(
    workdir: Path,
    *args: str,
    env: dict[str, str],
    steady_polling: bool = True,
    cancel_rule: str | None = None,
    cancel_after_s: float = 3.0,
    timeout: int = 3000,
    stop: threading.Event | None = None,
) -> SlurmRun:
    """Run ``snakemake --profile slurm ARGS`` (:func:`command`) in ``workdir``; returns the SLURM jobs it submitted.

    ``env`` is the environment of :func:`install_profiles`. With ``cancel_rule``, the first job of that
    rule that has been running for ``cancel_after_s`` seconds is cancelled with ``scancel``, as an
    operator or a failing node would. A set ``stop`` ends the run and cancels its jobs.
    """
    cmd = command(*args, steady_polling=steady_polling)
    log = workdir / "slurm_run.log"
    before = set(all_jobs())
    running_since: dict[str, float] = {}
    cancelled: list[str] = []
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"the SLURM run did not finish in {timeout} s; see {log}")
                if stop is not None and stop.is_set():
                    raise RuntimeError(f"the SLURM run was stopped before it finished; see {log}")
                if cancel_rule and not cancelled:
                    queue = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, encoding="utf-8").stdout
                    for line in queue.splitlines():
                        job_id, comment, state = line.split("|")
                        if state != "RUNNING" or rule_of(comment) != cancel_rule:
                            continue
                        since = running_since.setdefault(job_id, time.monotonic())
                        if time.monotonic() - since >= cancel_after_s:
                            subprocess.run(["scancel", job_id], check=True)
                            cancelled.append(job_id)
                            break
                time.sleep(1)
        finally:
            if proc.poll() is None:
                proc.kill()
                subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    jobs = {k: v for k, v in all_jobs().items() if k not in before}
    return SlurmRun(proc.returncode, log.read_text(encoding="utf-8", errors="replace"), jobs, cancelled, env)
