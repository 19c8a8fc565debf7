"""Cluster placement resources, attempt-scaled memory, job provenance and clean exits on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import yaml
from helpers.paths import ROOT

from maisi.core.cluster import attempt_memory, job_environment, slurm_resources
from maisi.core.provenance import provenance

SITE = {"cpu_partition": "short", "gpu_partition": "a100q,h100q", "gpu_model": "a100", "account": "radiology", "max_mem_mb": None}


def test_gpu_and_cpu_placement():
    assert slurm_resources(SITE, 2) == {"gpu": 2, "slurm_partition": "a100q,h100q", "slurm_account": "radiology", "gpu_model": "a100"}
    assert slurm_resources(SITE, 0) == {"slurm_partition": "short", "slurm_account": "radiology"}  # no GPU model off GPUs


def test_unset_site_keys_leave_slurm_defaults():
    assert slurm_resources({}, 1) == {"gpu": 1} and slurm_resources({"cpu_partition": None}, 0) == {}


def test_memory_grows_with_the_attempt_up_to_the_cap():
    mem = attempt_memory(8000, {})
    assert [mem(None, attempt=a) for a in (1, 2, 3)] == [8000, 16000, 24000]
    capped = attempt_memory(8000, {"max_mem_mb": 20000})
    assert [capped(None, attempt=a) for a in (1, 2, 3)] == [8000, 16000, 20000]


def test_job_environment_only_inside_a_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert job_environment() == {} and "job" not in provenance("x")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert provenance("x")["job"] == {"slurm_job_id": "42", "slurm_partition": "gpu", "cuda_visible_devices": "0"}


def test_sigterm_mid_write_leaves_no_temporary_file(tmp_path):
    """A job cancelled while writing (scancel sends SIGTERM) exits through the atomic writer's cleanup."""
    dest = tmp_path / "out" / "volume.nii.gz"
    code = f"""
import sys, time
from pathlib import Path
from maisi.core.io import atomic_path
from maisi.core.logs import exit_on_sigterm
with exit_on_sigterm(), atomic_path(Path({str(dest)!r})) as tmp:
    tmp.write_bytes(b"partial")
    print("writing", flush=True)
    time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, encoding="utf-8", cwd=ROOT)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    # generous: beside the shared run this test gets only idle CPU (SCHED_IDLE); the writer would sleep 600 s
    assert proc.wait(timeout=300) != 0 and time.monotonic() - start < 300
    assert list(dest.parent.iterdir()) == []  # neither the output nor its temporary file


def test_slurm_profile_is_complete():
    """The cluster profile names the executor, job limits, retries and default resources, and no site setting."""
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "profile.yaml").read_text(encoding="utf-8"))
    assert profile["executor"] == "slurm" and profile["jobs"] >= 1 and profile["retries"] >= 1
    assert profile["latency-wait"] >= 30 and "attempt" in str(profile["default-resources"]["mem_mb"])
    text = yaml.safe_dump(profile)
    assert "slurm_partition" not in text and "slurm_account" not in text  # site settings live in the config
