"""What produced an output: package versions, platform and time, recorded in every sidecar."""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import sys
from importlib import metadata

from maisi.cluster import job_environment

__all__ = ["package_versions", "provenance", "TRACKED_PACKAGES"]

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
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    job = job_environment()
    if job:
        out["job"] = job
    return out
