"""Running the real Snakemake workflow on tiny configs, in a temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers.paths import ROOT
from maisi.dryrun import jobs_by_rule

#: Targets of the data-preparation stages only (tests of sources and labels need no training).
PREPARED = ("results/prepared/datalist.json", "results/prepared/summary/summary.html")
#: Few training steps for every stage (the end-to-end training and generation runs).
TRAINING = {
    "train_vae": {"steps": 4, "checkpoint_every": 2},
    "train_diffusion": {"steps": 4, "checkpoint_every": 2},
    "train_controlnet": {"steps": 3, "checkpoint_every": 2},
}


def make_workdir(path: Path, config: dict) -> Path:
    """A working directory holding ``config/config.yaml`` (read by the Snakefile's ``configfile:``)."""
    (path / "config").mkdir(parents=True, exist_ok=True)
    config.setdefault("catalog", str(ROOT / "config" / "datasets.yaml"))
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 900, snakefile: Path = ROOT / "Snakefile"
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
        "--cores", "2", "--show-failed-logs", *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # progress bars print non-ASCII even under a C locale
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str, snakefile: Path = ROOT / "Snakefile") -> dict[str, int]:
    """Jobs a dry run would execute, by rule (empty when nothing is to be done)."""
    proc = snakemake(workdir, "--dry-run", *args, snakefile=snakefile)
    return jobs_by_rule(proc.stdout + proc.stderr)


def edit_config(work: Path, section: str, **values) -> None:
    """Update ``section`` of ``work``'s ``config/config.yaml`` with ``values``."""
    path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
