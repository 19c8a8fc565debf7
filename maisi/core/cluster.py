"""Where a job runs on a cluster: SLURM placement resources from the config's ``cluster`` block.

Snakemake's SLURM executor (``snakemake-executor-plugin-slurm``) reads a job's ``slurm_partition``,
``slurm_account``, ``gpu`` and ``gpu_model`` resources. The workflow sets them per rule from the
site settings in the config, so that one ``profiles/slurm`` serves every site: GPU rules go to the
GPU partition with a GPU request, all other rules to the CPU partition without one. Memory grows
with the attempt number, so a job killed for memory is retried with more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["slurm_resources", "attempt_memory", "job_environment"]

def slurm_resources(cluster: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """The placement of a rule's jobs: for ``gpus > 0`` the ``gpu`` count, GPU partition and GPU model,
    otherwise the CPU partition; the account either way.

    Keys left ``null`` in the config are not set, so SLURM's defaults (or a profile's) apply.
    """
    kind = "gpu" if gpus > 0 else "cpu"
    out: dict[str, Any] = {"gpu": gpus} if gpus > 0 else {}
    partition = cluster.get(f"{kind}_partition")
    if partition:
        out["slurm_partition"] = partition
    if cluster.get("account"):
        out["slurm_account"] = cluster["account"]
    if gpus > 0 and cluster.get("gpu_model"):
        out["gpu_model"] = cluster["gpu_model"]
    return out


def attempt_memory(mem_mb: int, cluster: Mapping[str, Any]) -> Callable[..., int]:
    """A ``mem_mb`` resource that grows with the attempt (``mem_mb * attempt``), capped at
    ``cluster.max_mem_mb`` when that is set (the largest node's memory)."""
    cap = cluster.get("max_mem_mb")

    def mem(wildcards, attempt: int = 1) -> int:
        value = int(mem_mb) * int(attempt)
        return min(value, int(cap)) if cap else value

    return mem


def job_environment() -> dict[str, str]:
    """The scheduler job this process runs in (SLURM job id, partition, node, visible GPUs); empty outside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    keys = {
        "slurm_job_id": "SLURM_JOB_ID",
        "slurm_partition": "SLURM_JOB_PARTITION",
        "slurm_node": "SLURMD_NODENAME",
        "slurm_restart_count": "SLURM_RESTART_COUNT",
        "cuda_visible_devices": "CUDA_VISIBLE_DEVICES",
    }
    return {k: os.environ[v] for k, v in keys.items() if v in os.environ}
