"""What produced an output: package versions, platform and time, recorded in every sidecar."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from maisi.core.cluster import job_environment

__all__ = ["package_versions", "provenance", "utc_now", "git_state", "TRACKED_PACKAGES"]

#: Packages whose versions decide what the factory's outputs contain.
TRACKED_PACKAGES: tuple[str, ...] = (
    "maisi-ct-factory",
    "torch",
    "monai",
    "numpy",
    "nibabel",
    "SimpleITK",
    "pynrrd",
    "pydicom",
    "scipy",
    "snakemake",
    "TotalSegmentator",
    "nnunetv2",
    "pandas",
    "dask",
)


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of :data:`TRACKED_PACKAGES` (``"absent"`` when not installed)."""
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def provenance(step: str) -> dict:
    """Provenance block for a sidecar: the step, tool versions, host and UTC time, and the
    scheduler job (SLURM job id, partition, visible GPUs) when it ran in one."""
    out = {
        "step": step,
        "versions": package_versions(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "argv0": sys.argv[0] if sys.argv else "",
        "created_utc": utc_now(),
    }
    job = job_environment()
    if job:
        out["job"] = job
    return out


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (as every sidecar records it)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def git_state(repo_dir: str | os.PathLike) -> dict[str, Any]:
    """Commit of the workflow checkout and whether its tracked files differ from it; ``"unknown"``
    when ``repo_dir`` is not a git checkout or git is missing."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, encoding="utf-8", timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": "unknown" if status is None else bool(status.strip())}
