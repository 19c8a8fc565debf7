"""What the TSP benchmarks share: memory readings and one process per method, outputs compared with MONAI's.

Each method runs in a fresh process (the script itself, ``--worker METHOD``) so that its peak memory is its
own; it saves its output to ``<workdir>/<method>.pt`` and prints one JSON line of measurements.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["rss_bytes", "peak_rss_bytes", "build_released_autoencoder", "run_methods", "fmt"]


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm", encoding="utf-8") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_released_autoencoder(weights: Path):
    """The released (rflow-ct) autoencoder architecture with the weights saved in ``weights``, in eval mode."""
    from maisi.models.networks import build_autoencoder

    autoencoder = build_autoencoder("rflow-ct")
    autoencoder.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    return autoencoder.eval()


def _max_diff(got, want) -> float:
    """Largest absolute difference of two tensors, or of two equal-length tuples of tensors."""
    if isinstance(got, torch.Tensor):
        got, want = (got,), (want,)
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


def run_methods(
    script: str, methods: Sequence[str], args: Sequence[str], workdir: Path, reference: str = "monai"
) -> dict[str, dict]:
    """Run ``script --worker METHOD --out <workdir>/METHOD.pt *args`` for every method, each in its own process;
    add ``max_diff`` (against ``reference``'s output) to each result; a failed method gets an ``error``."""
    results: dict[str, dict] = {}
    for method in methods:
        cmd = [sys.executable, script, "--worker", method, "--out", str(workdir / f"{method}.pt"), *args]
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8")
        if proc.returncode != 0:
            results[method] = {"method": method, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = workdir / f"{reference}.pt"
    for method, r in results.items():
        out = workdir / f"{method}.pt"
        if "error" not in r and ref.exists() and out.exists():
            r["max_diff"] = _max_diff(torch.load(str(out)), torch.load(str(ref)))
    for method in methods:
        (workdir / f"{method}.pt").unlink(missing_ok=True)
    return results


def fmt(r: dict, width: int = 14) -> str:
    """One result as a line: time, extra memory, max diff (or the error)."""
    if "error" in r:
        return f"{r['method']:<{width}} {r['error']}"
    return (f"{r['method']:<{width}} time {r['seconds']:8.1f} s   extra memory {r['extra_bytes'] / 2**30:7.2f} GiB"
            f"   max diff {r.get('max_diff', float('nan')):.2e}")  # fmt: skip
