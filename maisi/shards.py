"""Sharding: stable case-to-shard assignment and running a shard's cases in parallel.

A workflow with one job per case per stage grows past 40,000 jobs for MAISI-sized collections,
and Snakemake then spends about a minute only planning the DAG. Cases are therefore grouped into
shards (one job per shard per stage) while every case keeps its own output files. The shard of a
case is a stable hash of its id, so adding a case changes one shard's inputs and reruns only it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import dask
import pandas as pd
from tqdm.dask import TqdmCallback

from maisi.checks import InputError
from maisi.io import atomic_path, write_json
from maisi.provenance import provenance

__all__ = ["shard_of", "shard_name", "group_by_shard", "run_cases", "write_table", "read_table", "CaseFailure"]

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


def write_table(rows: Sequence[Mapping[str, Any]], dest: str | os.PathLike, step: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """Atomically write ``rows`` as a TSV (plus a JSON sidecar with the provenance)."""
    frame = pd.DataFrame(list(rows), columns=list(columns) or None)
    if columns:
        frame = frame.reindex(columns=list(columns))
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)
    write_json(f"{dest}.json", {"rows": len(frame), "provenance": provenance(step)})
    return frame


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def read_tables(paths: Sequence[str | os.PathLike], columns: Sequence[str], by: Sequence[str] = ("request", "case_id")) -> pd.DataFrame:
    """Shard tables concatenated in ``columns`` and sorted by ``by`` (empty, with the columns, for no tables)."""
    frames = [read_table(p) for p in paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))
    return table.reindex(columns=list(columns)).sort_values(list(by)).reset_index(drop=True)
