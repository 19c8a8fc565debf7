"""Logging set-up shared by the workflow scripts."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator

__all__ = ["log_to_file", "from_snakemake", "exit_on_sigterm", "TERMINATED"]

#: Set when this process got SIGTERM or SIGINT inside :func:`exit_on_sigterm`. A signal is process state:
#: the main thread leaves with ``SystemExit``, and the shard's worker threads, which Python cannot
#: interrupt, read this flag: no new case starts, and the case in flight renames nothing into place.
TERMINATED = threading.Event()

@contextlib.contextmanager
def log_to_file(path: str | os.PathLike | None) -> Iterator[None]:
    """Send logging, warnings, stdout and stderr (progress bars included) to ``path``.

    Snakemake shows a failed job's log with ``--show-failed-logs``; writing everything there keeps
    the terminal readable when many shard jobs run at once.
    """
    if not path:
        yield
        return
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", buffering=1) as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        except BaseException:
            logging.getLogger("maisi").exception("job failed")
            raise
        finally:
            root.removeHandler(handler)
            logging.captureWarnings(False)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (``scancel``, a job's time limit, Snakemake stopping its jobs) and SIGINT into ``SystemExit``.

    Python's default for SIGTERM ends the process at once; raising instead runs the ``finally``
    blocks of the atomic writers (:func:`maisi.core.io.atomic_path`), so a cancelled job leaves no
    temporary files beside its outputs. It also sets :data:`TERMINATED`: a shard's worker threads then
    start no case, and the cases in flight are abandoned at their next write (nothing is renamed into
    place after the signal), so a job stops within one case's longest stretch between two writes.
    """
    global _OWNER
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        TERMINATED.set()
        raise SystemExit(f"terminated by {signal.Signals(signum).name} (job cancelled or out of time)")

    TERMINATED.clear()
    previous = {sig: signal.signal(sig, terminate) for sig in _SIGNALS}
    _OWNER = os.getpid()
    try:
        yield
    finally:
        _OWNER = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# A process forked inside exit_on_sigterm (a library's worker pool: nnU-Net's and TotalSegmentator's use
# multiprocessing.Pool) must not keep its handler. CPython drops a signal that reaches a child between fork()
# and its own after-fork clean-up, and a pool terminated right after it started (Pool.__exit__) sends its
# SIGTERM in that window: the worker, waiting on the task-queue lock the terminating pool holds, then never
# ends, and the job hangs in Pool.__exit__ for good. So the forking thread blocks SIGTERM and SIGINT across
# fork(); the child takes Python's defaults back and then unblocks them, so a signal sent meanwhile is
# delivered to the default action instead of being lost.
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The process whose signals :func:`exit_on_sigterm` handles (None outside it).
_OWNER: int | None = None
_FORK_MASK = threading.local()


def _before_fork() -> None:
    if _OWNER is not None:
        _FORK_MASK.saved = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _after_fork_in_parent() -> None:
    saved = getattr(_FORK_MASK, "saved", None)
    if saved is not None:
        _FORK_MASK.saved = None
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _after_fork_in_child() -> None:
    saved = getattr(_FORK_MASK, "saved", None)
    if saved is None:
        return
    _FORK_MASK.saved = None
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, saved)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def from_snakemake(smk) -> Iterator[None]:
    """``log_to_file`` for a Snakemake ``script:`` object (its first log file), exiting cleanly on SIGTERM."""
    with log_to_file(smk.log[0] if len(smk.log) else None), exit_on_sigterm():
        yield
