"""What the release stage gathers from the run: released cases, label ids, source licences."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from maisi.core.tables import read_table

__all__ = ["released_cases", "labels_present", "source_records", "PHANTOM_LICENCE"]

PHANTOM_LICENCE = "CC0-1.0 (procedural phantom made by this workflow; no patient data)"


def released_cases(qc_cases: str | os.PathLike) -> pd.DataFrame:
    """Generated cases that QC lets into the release (``include``, or ``flagged`` under ``qc.on_fail: flag``),
    each with the files of its final attempt and ``qc_status`` ``pass`` or ``flagged`` as
    :func:`maisi.release.build_release` takes them."""
    qc = read_table(qc_cases)
    cases = qc[qc.release.isin(["include", "flagged"])].copy()
    cases["qc_status"] = np.where(cases.release == "include", "pass", "flagged")
    return cases[["case_id", "request", "image", "label", "qc_status", "qc_reasons"]].reset_index(drop=True)


def labels_present(paths: Sequence[str | os.PathLike]) -> list[int]:
    """Sorted label ids found in the label maps."""
    import nibabel as nib

    found: set[int] = set()
    for p in paths:
        found |= {int(v) for v in np.unique(np.asanyarray(nib.load(os.fspath(p)).dataobj))}
    return sorted(found)


def source_records(sources: Mapping[str, Mapping[str, Any]], catalog: Mapping[str, Any]) -> list[dict[str, str]]:
    """``{source, licence, citation}`` of every configured source (the catalog's for public datasets)."""
    out = []
    for name, src in sorted(sources.items()):
        if src["type"] == "phantom":
            out.append({"source": name, "licence": PHANTOM_LICENCE, "citation": "procedural CT phantom (maisi.sources.phantom)"})
        elif src["type"] == "dataset":
            entry = catalog[src["dataset"]]
            out.append({"source": f"{name} ({entry.name})", "licence": entry.licence, "citation": entry.citation})
        else:
            out.append({"source": name, "licence": src.get("licence", "unknown"), "citation": src.get("citation", "")})
    return out
