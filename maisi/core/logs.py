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
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        TERMINATED.set()
        raise SystemExit(f"terminated by {signal.Signals(signum).name} (job cancelled or out of time)")

    TERMINATED.clear()
    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def from_snakemake(smk) -> Iterator[None]:
    """``log_to_file`` for a Snakemake ``script:`` object (its first log file), exiting cleanly on SIGTERM."""
    with log_to_file(smk.log[0] if len(smk.log) else None), exit_on_sigterm():
        yield
