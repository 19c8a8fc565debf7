"""Anatomy vocabulary every stage shares: MAISI's body regions, their one-hot vectors, the body mask.

MAISI conditions its diffusion model on the first and last body region a scan covers, each as a
4-element one-hot vector in the order head-neck, chest, abdomen, lower body. The body mask is the
patient's outline in a CT volume (TotalSegmentator's masks and generated cases without a mask use it).
"""

from __future__ import annotations

import numpy as np

from maisi.core.labels import label_id

__all__ = ["RegionError", "BODY_THRESHOLD_HU", "BODY_REGIONS", "REGION_LABELS", "one_hot", "region_from_one_hot", "body_mask"]

BODY_REGIONS: tuple[str, ...] = ("head_neck", "chest", "abdomen", "lower_body")
#: Voxels above this HU value count towards the body mask (air is about -1000 HU, fat about -100 HU).
BODY_THRESHOLD_HU = -500.0

class RegionError(ValueError):
    """The body region of a case cannot be determined."""


#: MAISI's reference rule: which label ids mark each region.
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "head_neck": (label_id("brain"), label_id("skull")),
    "chest": tuple(range(28, 33)),  # the five lung lobes
    "abdomen": (1, 2, 3, 4, 5, 14),  # liver, (old) kidney, spleen, pancreas, kidneys
    "lower_body": (label_id("left femur"), label_id("right femur")),
}


def one_hot(region: str) -> list[int]:
    """``"chest"`` -> ``[0, 1, 0, 0]``."""
    if region not in BODY_REGIONS:
        raise RegionError(f"unknown body region {region!r}; expected one of {', '.join(BODY_REGIONS)}")
    return [int(r == region) for r in BODY_REGIONS]


def region_from_one_hot(vec) -> str:
    vec = [int(v) for v in vec]
    if len(vec) != 4 or sorted(vec) != [0, 0, 0, 1]:
        raise RegionError(f"not a body-region one-hot vector: {vec}")
    return BODY_REGIONS[vec.index(1)]


def body_mask(hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The patient's body: voxels above ``threshold_hu``, largest connected component, with
    the holes of each axial slice filled (lungs and bowel gas belong to the body)."""
    from scipy import ndimage

    mask = np.asarray(hu) > threshold_hu
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask
