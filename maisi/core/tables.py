"""Stage tables: TSV files (with a provenance sidecar) that list a shard's or a stage's cases."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from maisi.core.io import atomic_path, write_json
from maisi.core.provenance import provenance

__all__ = ["write_table", "read_table", "numeric"]

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


def numeric(column: pd.Series) -> pd.Series:
    """A column of a table read by :func:`read_table` as floats: an empty cell (a value written as NaN, such as a
    Dice of 0/0) is NaN; any other cell that is not a number is a ``ValueError`` naming the column and the value."""
    text = column.astype(str).str.strip()
    values = pd.to_numeric(text.where(text != "", None), errors="coerce").astype(float)
    bad = values.isna() & (text != "") & (text.str.lower() != "nan")
    if bad.any():
        raise ValueError(f"table column {column.name!r}: {text[bad].iloc[0]!r} is not a number")
    return values


def read_tables(paths: Sequence[str | os.PathLike], columns: Sequence[str], by: Sequence[str] = ("request", "case_id")) -> pd.DataFrame:
    """Shard tables concatenated in ``columns`` and sorted by ``by`` (empty, with the columns, for no tables)."""
    frames = [read_table(p) for p in paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))
    return table.reindex(columns=list(columns)).sort_values(list(by)).reset_index(drop=True)
