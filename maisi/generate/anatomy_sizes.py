"""The anatomy sizes NVIDIA's mask-generation model is conditioned on: names, checks, and the full condition.

A request names the sizes it controls (``controllable_anatomy_size``: organs, and at most one tumour,
checked as NVIDIA's ``check_input_ct`` checks them); the other sizes come from the closest entry of
NVIDIA's database of real anatomy-size combinations (``all_anatomy_size_conditions.json``: the least
L1 distance over the given sizes, the first on ties), and the given sizes overwrite it.

Torch-free: requests are checked while the workflow is planned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["ANATOMY_SIZE_ORDER", "CONTROLLABLE_ORGANS", "CONTROLLABLE_TUMOURS", "check_anatomy_sizes", "read_size_conditions", "anatomy_size_condition"]

#: The ten anatomy sizes the mask model is conditioned on, in its order.
ANATOMY_SIZE_ORDER = (
    "gallbladder", "liver", "stomach", "pancreas", "colon", "lung tumor", "pancreatic tumor", "hepatic tumor",
    "colon cancer primaries", "bone lesion",
)  # fmt: skip


#: Which of them a request may set (NVIDIA's lists).
CONTROLLABLE_ORGANS = ("liver", "gallbladder", "stomach", "pancreas", "colon")
CONTROLLABLE_TUMOURS = ("hepatic tumor", "bone lesion", "lung tumor", "colon cancer primaries", "pancreatic tumor")


def check_anatomy_sizes(pairs: Sequence[Sequence], where: str = "controllable_anatomy_size") -> list[tuple[str, float]]:
    """``[(name, size), ...]`` checked as NVIDIA checks them: at most 10 entries, known names, each once,
    at most one tumour, sizes in [0, 1] or -1 (remove). A ``ValueError`` names the key and the entry."""
    if len(pairs) > 10:
        raise ValueError(f"{where}: at most 10 entries, got {len(pairs)}")
    out: list[tuple[str, float]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"{where}[{i}]: expected [name, size], got {pair!r}")
        name, size = pair
        if name not in CONTROLLABLE_ORGANS + CONTROLLABLE_TUMOURS:
            raise ValueError(f"{where}[{i}]: {name!r} is not controllable; choose from {', '.join(CONTROLLABLE_ORGANS + CONTROLLABLE_TUMOURS)}")
        if isinstance(size, bool) or not isinstance(size, (int, float)) or (size != -1 and not 0.0 <= size <= 1.0):
            raise ValueError(f"{where}[{i}]: size of {name} must be in [0, 1] or -1 (remove), got {size!r}")
        out.append((str(name), float(size)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: each anatomy at most once, got {names}")
    tumours = [n for n in names if n in CONTROLLABLE_TUMOURS]
    if len(tumours) > 1:
        raise ValueError(f"{where}: at most one tumour, got {tumours}")
    return out


def read_size_conditions(path: str | os.PathLike) -> list[list[float]]:
    """NVIDIA's database of real anatomy-size combinations (a list of ``{"organ_size": [10 numbers]}``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            rows = [list(map(float, r["organ_size"])) for r in json.load(fh)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an anatomy-size database ({type(exc).__name__}: {exc})") from None
    bad = [i for i, r in enumerate(rows) if len(r) != len(ANATOMY_SIZE_ORDER)]
    if not rows or bad:
        raise ValueError(f"{path}: every entry needs {len(ANATOMY_SIZE_ORDER)} sizes" + (f" (entry {bad[0]} has not)" if bad else ""))
    return rows


def anatomy_size_condition(pairs: Sequence[tuple[str, float]], database: Sequence[Sequence[float]]) -> list[float]:
    """The ten sizes for a request: the database entry closest to the given sizes (L1 over those given;
    the first on ties), with the given sizes written over it."""
    index = {name: i for i, name in enumerate(ANATOMY_SIZE_ORDER)}
    given = {index[name]: size for name, size in pairs}
    best = min(range(len(database)), key=lambda k: sum(abs(size - database[k][i]) for i, size in given.items()))
    out = [float(v) for v in database[best]]
    for i, size in given.items():
        out[i] = size
    return out
