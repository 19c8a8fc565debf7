"""Sharding: stable case-to-shard assignment and running a shard's cases in parallel.

A workflow with one job per case per stage grows past 40,000 jobs for MAISI-sized collections,
and Snakemake then spends about a minute only planning the DAG. Cases are therefore grouped into
shards (one job per shard per stage) while every case keeps its own output files. The shard of a
case is a stable hash of its id, so adding a case changes one shard's inputs and reruns only it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import dask
from tqdm.dask import TqdmCallback

from maisi.core.checks import InputError
from maisi.core.logs import TERMINATED

__all__ = ["shard_of", "shard_name", "group_by_shard", "run_cases", "CaseFailure", "run_in_turn", "raise_first"]

log = logging.getLogger(__name__)


T = TypeVar("T")


def shard_of(case_id: str, n_shards: int) -> int:
    """Stable shard index of ``case_id`` in ``range(n_shards)`` (independent of the other cases)."""
    digest = hashlib.sha1(case_id.encode("utf-8"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


def shard_name(index: int) -> str:
    return f"{index:04d}"


def group_by_shard(items: Iterable[T], n_shards: int, key: Callable[[T], str]) -> dict[str, list[T]]:
    """Group ``items`` by shard name; only non-empty shards appear, in name order."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(shard_name(shard_of(key(item), n_shards)), []).append(item)
    return {name: sorted(groups[name], key=key) for name in sorted(groups)}


class CaseFailure(RuntimeError):
    """A case failed while ``on_error`` is ``stop``."""


def run_cases(
    func: Callable[[Any], Mapping[str, Any]],
    cases: Sequence[Any],
    case_id: Callable[[Any], str],
    threads: int = 1,
    on_error: str = "stop",
    desc: str = "cases",
) -> list[dict[str, Any]]:
    """Run ``func`` on every case with dask's threaded scheduler and a progress bar.

    ``func`` returns the case's table row. A case raising :class:`InputError` is recorded with
    ``status = "rejected"`` and its reason when ``on_error == "skip"``; with ``"stop"`` the first
    such error is re-raised once all cases have finished, so that the cases already done keep
    their outputs. Any other exception is a bug and always propagates.
    """

    def one(case):
        if TERMINATED.is_set():  # SIGTERM: start no further case
            raise SystemExit(f"case {case_id(case)} not started: the job was terminated")
        try:
            return {"case_id": case_id(case), "status": "ok", "reason": "", **func(case)}
        except InputError as exc:
            log.error("case %s rejected: %s", case_id(case), exc)
            return {"case_id": case_id(case), "status": "rejected", "reason": str(exc), "_error": exc}

    tasks = [dask.delayed(one, pure=False)(case) for case in cases]
    with TqdmCallback(desc=desc, unit="case", mininterval=1.0):
        rows = list(dask.compute(*tasks, scheduler="threads", num_workers=max(1, threads)))
    errors = [row.pop("_error") for row in rows if "_error" in row]
    if errors and on_error == "stop":
        first = errors[0]
        more = f" ({len(errors) - 1} more case(s) failed; see the log)" if len(errors) > 1 else ""
        raise CaseFailure(f"{first}{more}. Set 'on_error: skip' to leave bad cases out.") from first
    return rows


def run_in_turn(
    func: Callable[[T], Mapping[str, Any]],
    items: Sequence[T],
    case_id: Callable[[T], str],
    errors: tuple[type[Exception], ...],
    failed: Callable[[T, Exception], Mapping[str, Any]],
    desc: str = "cases",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[Exception]]:
    """Run ``func`` on each item in turn (one model on one device), with a progress bar.

    An item raising one of ``errors`` is logged and gets the row ``failed(item, exc)`` (which also
    removes what it left behind); the other items still run and keep their outputs. Returns the rows
    and the errors, for :func:`raise_first` once the shard's table is written. Any other exception is
    a bug and propagates.
    """
    from tqdm.auto import tqdm

    rows, raised = [], []
    for item in tqdm(items, desc=desc, unit="case", disable=not progress):
        try:
            rows.append(dict(func(item)))
        except errors as exc:
            log.error("case %s failed: %s", case_id(item), exc)
            raised.append(exc)
            rows.append(dict(failed(item, exc)))
    return rows, raised


def raise_first(errors: Sequence[Exception], on_error: str, what: str) -> None:
    """With ``on_error: stop``, raise the first case error (call it after the shard's table is written)."""
    if errors and on_error == "stop":
        raise CaseFailure(f"{len(errors)} case(s) of {what} failed, first: {errors[0]}. Set 'on_error: skip' to keep going.") from errors[0]
