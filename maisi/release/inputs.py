"""What the release stage gathers from the run: released cases, label ids, source licences."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from maisi.evaluate.qc_report import released_cases

__all__ = ["released_cases", "labels_present", "source_records", "PHANTOM_LICENCE"]

PHANTOM_LICENCE = "CC0-1.0 (procedural phantom made by this workflow; no patient data)"


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
