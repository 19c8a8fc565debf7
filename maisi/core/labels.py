"""The MAISI label dictionary (132 classes plus ``body`` = 200) and helpers around it."""

from __future__ import annotations

import functools
import json
from importlib import resources

__all__ = ["maisi_labels", "label_id", "label_name", "BODY", "resolve_label"]

#: Label of all body voxels not covered by another class (newer MAISI release).
BODY = 200


@functools.lru_cache(maxsize=1)
def maisi_labels() -> dict[str, int]:
    """Class name -> MAISI label id, read from ``maisi/data/maisi_labels.json``."""
    text = resources.files("maisi").joinpath("data/maisi_labels.json").read_text(encoding="utf-8")
    return dict(json.loads(text)["labels"])


@functools.lru_cache(maxsize=1)
def _names_by_id() -> dict[int, str]:
    return {v: k for k, v in maisi_labels().items()}


def label_id(name: str) -> int:
    """MAISI id of a class name (``"spleen"`` -> 3); ``KeyError`` names the unknown class."""
    try:
        return maisi_labels()[name]
    except KeyError:
        raise KeyError(f"unknown MAISI class {name!r}") from None


def label_name(idx: int) -> str:
    return _names_by_id().get(int(idx), f"label_{int(idx)}")


def resolve_label(value: int | str) -> int:
    """Accept a MAISI id or class name (as written in configs and catalogs) and return the id."""
    if isinstance(value, bool):
        raise ValueError(f"invalid label {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= 255:
            raise ValueError(f"label id {value} outside 0..255")
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return resolve_label(int(value))
    return label_id(str(value))
