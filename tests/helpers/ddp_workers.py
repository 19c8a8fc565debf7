"""Functions the multi-process training tests run in worker processes (importable by name there)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from maisi.train.distributed import world


def fail_on(rank: int, pids: str) -> str:
    """Raise on ``rank``; the other ranks wait far longer than a test may (the launcher must stop them). Each rank
    writes its process id to ``<pids>/<rank>.pid``."""
    here = world()
    (Path(pids) / f"{here.rank}.pid").write_text(str(os.getpid()), encoding="utf-8")
    if here.rank == rank:
        time.sleep(1.0)  # the others have joined the group by then
        raise RuntimeError(f"rank {rank} fails on purpose")
    time.sleep(600)
    return "not stopped"
