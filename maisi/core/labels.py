"""The MAISI label dictionary (132 classes plus ``body`` = 200) and helpers around it."""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np
from scipy import ndimage

__all__ = ["maisi_labels", "label_id", "label_name", "BODY", "resolve_label", "TUMOUR_TO_ORGAN", "remove_tumours"]

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


#: Tumours that :func:`remove_tumours` gives to their host organ outright (hepatic -> liver, pancreatic ->
#: pancreas, colon cancer -> colon, kidney cyst -> left / right kidney; brain tumours -> brain).
TUMOUR_TO_ORGAN = {26: 1, 24: 4, 27: 62, 116: 14, 117: 5}
_BRAIN_TUMOURS_TO_BRAIN = {176: 22}
_LUNG_TUMOUR, _LUNG_LOBES = 23, (28, 29, 30, 31, 32)


def remove_tumours(label: np.ndarray) -> np.ndarray:
    """The label map with its tumours replaced by organ: the unconditional mask of NVIDIA's classifier-free guidance.

    As NVIDIA's ``remove_tumors``: hepatic, pancreatic and colon tumours and kidney cysts become their
    organ; every lung-tumour voxel becomes the most frequent lung lobe of the one-voxel ring around the
    tumours (3x3x3 dilation, the volume's border counted as tumour; ties: the lowest id), or, with no
    lobe in that ring, the most frequent lobe of the whole map (lobe 28 when there is none).
    """
    out = label.copy()
    for tumour, organ in TUMOUR_TO_ORGAN.items():
        out[label == tumour] = organ
    tumour = out == _LUNG_TUMOUR
    if tumour.any():
        ring = ndimage.binary_dilation(tumour, structure=np.ones((3,) * tumour.ndim, bool), border_value=1) & ~tumour
        ring &= np.isin(out, _LUNG_LOBES)
        values = out[ring].astype(np.int64)
        if values.size:
            fill = int(np.bincount(values).argmax())
        else:
            counts = [int((out == lobe).sum()) for lobe in _LUNG_LOBES]
            fill = _LUNG_LOBES[int(np.argmax(counts))]
        out[tumour] = fill
    for tumour_id, organ in _BRAIN_TUMOURS_TO_BRAIN.items():
        out[out == tumour_id] = organ
    return out
