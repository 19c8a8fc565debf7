"""Several training processes in one job: torch.distributed ``DistributedDataParallel`` on one node.

A training stage decorated with :func:`data_parallel` and given ``settings.processes > 1``
(``model.resources.gpu``) starts that many worker processes (``python -m maisi.train.distributed``)
from inside its own job and waits for them; each runs the stage as rank ``r`` of the group, on
``cuda:r`` (NCCL) or on the CPU (gloo). The workers meet through a file store in a private temporary
folder, so no port is chosen and nothing outside the job's node is needed: the group lives inside the one
Snakemake job and its one SLURM allocation. Their output (log lines, tracebacks) is copied, one line at a
time and marked with the rank, to the stage's own stderr, which is the job's log file under Snakemake.

The batch: ``batch_size`` is the global batch. Every rank draws the whole global batch of a step (cases,
crops, latent noise, timesteps and diffusion noise) from the same step generator, exactly as one process
does, and computes the loss on its own slice :meth:`World.part`; DDP averages the gradients of the
equal slices, which is the gradient of the global batch's mean loss. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["World", "world", "batch_part", "rank_device", "backend_for", "launch", "data_parallel"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a worker gets to exit after SIGTERM (when another one failed) before it is killed.
TERMINATE_WAIT = 20.0


def batch_part(batch_size: int, rank: int, size: int, key: str = "batch_size") -> slice:
    """Rank ``rank``'s slice of a global batch of ``batch_size`` split over ``size`` processes; a batch
    that does not split evenly is a ``ValueError`` naming the config key ``key``."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not one of {size} processes")
    if batch_size % size:
        raise ValueError(
            f"config key '{key}' ({batch_size}) must be a multiple of model.resources.gpu ({size}), the number of "
            "training processes: each process computes an equal share of the global batch"
        )
    share = batch_size // size
    return slice(rank * share, (rank + 1) * share)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the only process that writes files."""
        return self.rank == 0

    def part(self, batch_size: int, key: str = "batch_size") -> slice:
        """This rank's slice of the global batch (see :func:`batch_part`)."""
        return batch_part(batch_size, self.rank, self.size, key)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (every rank gets it); the value itself with one process."""
        if self.size == 1:
            return float(value.detach().item())
        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return float(total.item()) / self.size

    def barrier(self) -> None:
        """Wait for every rank (nothing with one process)."""
        if self.size > 1:
            dist.barrier()


def world() -> World:
    """The current process group's rank and size, or a single process when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def rank_device(setting: str, rank: int | None = None, size: int | None = None) -> torch.device:
    """The device of one training process for ``model.device``: with one process the setting's device
    (:func:`maisi.models.networks.select_device`); with several, ``cuda:<rank>`` for ``auto`` (CUDA present)
    and ``cuda``, the CPU for ``cpu`` (and ``auto`` without CUDA). Rank and size default to :func:`world`'s."""
    from maisi.models.networks import select_device

    here = world()
    rank = here.rank if rank is None else rank
    size = here.size if size is None else size
    if size == 1:
        return select_device(setting)
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if setting not in ("auto", "cuda"):
        raise ValueError(
            f"config key 'model.device' is {setting!r}, one GPU, but model.resources.gpu asks for {size} training "
            "processes; set model.device to 'cuda' or 'auto' (process r uses cuda:r)"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"model.device {setting!r} requested but CUDA is not available")
    count = torch.cuda.device_count()
    if count < size:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise RuntimeError(
            f"model.resources.gpu asks for {size} training processes, one GPU each, but this job sees {count} "
            f"GPU(s) (CUDA_VISIBLE_DEVICES={visible})"
        )
    return torch.device("cuda", rank)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def _relay(stream: io.BufferedReader, rank: int, out: Any, lock: threading.Lock) -> None:
    """Copy a worker's output to ``out`` line by line (``\\r`` ends a line too: progress bars), marked with its rank."""
    for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=""):
        with lock:
            out.write(f"[rank {rank}] {line}" if line.strip() else line)
            out.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the workers still running, SIGKILL to those that outlive :data:`TERMINATE_WAIT`."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + TERMINATE_WAIT
    for p in alive:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(fn: Callable[..., T], processes: int, device: str, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in ``processes`` worker processes joined in one torch.distributed group
    (backend and device per rank from ``device``, see :func:`rank_device`); return rank 0's result.

    ``fn`` must be importable by name (a module-level function) and its arguments picklable. Each worker
    gets an equal share of this process's torch threads. A worker that fails stops the others, and the
    error names it; its traceback is in the copied output.
    """
    if processes < 2:
        raise ValueError(f"launch needs at least 2 processes, got {processes}")
    for rank in range(processes):  # device problems fail here, before any worker starts
        rank_device(device, rank, processes)
    threads = max(torch.get_num_threads() // processes, 1)
    folder = Path(tempfile.mkdtemp(prefix="maisi-ddp-"))
    spec = folder / "spec.pkl"
    with open(spec, "wb") as fh:
        pickle.dump({"fn": fn, "args": args, "kwargs": kwargs, "size": processes, "device": device, "threads": threads,
                     "store": str(folder / "store"), "result": str(folder / "result.pkl")}, fh)  # fmt: skip
    package_root = str(Path(__file__).resolve().parents[2])  # the workers import the same maisi as this process
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    out, lock = sys.stderr, threading.Lock()
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    log.info("%s: starting %d training processes (%s, %d threads each)", getattr(fn, "__name__", "stage"), processes,
             backend_for(rank_device(device, 0, processes)), threads)  # fmt: skip
    try:
        for rank in range(processes):
            proc = subprocess.Popen([sys.executable, "-m", "maisi.train.distributed", str(spec), str(rank)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
            procs.append(proc)
            relay = threading.Thread(target=_relay, args=(proc.stdout, rank, out, lock), daemon=True)
            relay.start()
            relays.append(relay)
        exits: queue.Queue[tuple[int, int]] = queue.Queue()  # (rank, exit code) in the order the workers end
        for rank, proc in enumerate(procs):
            threading.Thread(target=lambda r=rank, p=proc: exits.put((r, p.wait())), daemon=True).start()
        ended = 0
        while ended < processes:
            try:
                rank, code = exits.get(timeout=1.0)  # a timeout keeps this thread responsive to SIGTERM
            except queue.Empty:
                continue
            ended += 1
            if code != 0:  # the first worker to fail; the others' errors follow from it
                _stop(procs)
                raise RuntimeError(
                    f"training process {rank} of {processes} failed (exit code {code}); the others were stopped. "
                    f"Its traceback is in the lines marked [rank {rank}] above (the job's log under Snakemake)"
                )
        with open(folder / "result.pkl", "rb") as fh:
            return pickle.load(fh)  # noqa: S301 (written by this job's own rank 0)
    finally:
        _stop(procs)
        for relay, proc in zip(relays, procs, strict=False):
            relay.join(timeout=10)  # the rest of the output; a reader still blocked keeps its pipe
            if not relay.is_alive() and proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


def data_parallel(stage: Callable[..., T]) -> Callable[..., T]:
    """Run a training stage in ``settings.processes`` processes (its ``settings`` argument) when that is more
    than one and no process group runs yet; otherwise, and inside the workers, call it as it is."""
    signature = inspect.signature(stage)

    @functools.wraps(stage)
    def run(*args: Any, **kwargs: Any) -> T:
        settings = signature.bind(*args, **kwargs).arguments["settings"]
        processes = int(getattr(settings, "processes", 1))
        if processes > 1 and not (dist.is_available() and dist.is_initialized()):
            return launch(run, processes, settings.device, *args, **kwargs)
        return stage(*args, **kwargs)

    return run


def _worker(spec_path: str, rank: int) -> None:
    """One worker: join the group, run the function, rank 0 saves its result."""
    from maisi.core.io import atomic_path
    from maisi.core.logs import exit_on_sigterm

    with open(spec_path, "rb") as fh:
        spec = pickle.load(fh)  # noqa: S301 (written by the launching process)
    size = int(spec["size"])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)  # the other ranks would repeat rank 0's lines
    logging.captureWarnings(True)
    torch.set_num_threads(int(spec["threads"]))
    device = rank_device(spec["device"], rank, size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=f"file://{spec['store']}", rank=rank, world_size=size)
    try:
        with exit_on_sigterm():
            result = spec["fn"](*spec["args"], **spec["kwargs"])
        if rank == 0:
            with atomic_path(spec["result"], suffix=".pkl") as tmp, open(tmp, "wb") as fh:
                pickle.dump(result, fh)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
