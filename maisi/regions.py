"""Body regions (MAISI's top/bottom region one-hot vectors) and the backends that derive them.

MAISI conditions its diffusion model on the first and last body region a scan covers, each as a
4-element one-hot vector in the order head-neck, chest, abdomen, lower body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from maisi.labels import label_id

__all__ = [
    "BODY_REGIONS",
    "REGION_LABELS",
    "RegionResult",
    "RegionError",
    "one_hot",
    "region_from_one_hot",
    "regions_from_label",
    "REGION_BACKENDS",
    "register_backend",
]

BODY_REGIONS: tuple[str, ...] = ("head_neck", "chest", "abdomen", "lower_body")

#: MAISI's reference rule: which label ids mark each region.
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "head_neck": (label_id("brain"), label_id("skull")),
    "chest": tuple(range(28, 33)),  # the five lung lobes
    "abdomen": (1, 2, 3, 4, 5, 14),  # liver, (old) kidney, spleen, pancreas, kidneys
    "lower_body": (label_id("left femur"), label_id("right femur")),
}


class RegionError(ValueError):
    """The body region of a case cannot be determined."""


@dataclass(frozen=True)
class RegionResult:
    top: str
    bottom: str
    backend: str
    present: tuple[str, ...] = ()

    @property
    def top_region_index(self) -> list[int]:
        return one_hot(self.top)

    @property
    def bottom_region_index(self) -> list[int]:
        return one_hot(self.bottom)


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


def regions_from_label(label: np.ndarray, min_voxels: int = 1) -> RegionResult:
    """Top and bottom region from a MAISI label map with MAISI's rule.

    A region is present when its marker labels cover at least ``min_voxels`` voxels; the top
    region is the first present in head-to-foot order and the bottom region the last.
    """
    ids, counts = np.unique(np.asarray(label), return_counts=True)
    count = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    present = tuple(
        region
        for region in BODY_REGIONS
        if sum(count.get(i, 0) for i in REGION_LABELS[region]) >= min_voxels
    )
    if not present:
        raise RegionError(
            "no region marker label (brain/skull, lung lobes, liver/spleen/pancreas/kidneys, femurs) "
            "in the label map; set a manual region for this case"
        )
    return RegionResult(top=present[0], bottom=present[-1], backend="labels", present=present)


#: Region backends by name: ``f(label_array | None, options) -> RegionResult``.
REGION_BACKENDS: dict[str, Callable[..., RegionResult]] = {}


def register_backend(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        REGION_BACKENDS[name] = fn
        return fn

    return deco


@register_backend("labels")
def _labels_backend(label: np.ndarray | None, options: Mapping) -> RegionResult:
    if label is None:
        raise RegionError("the 'labels' region backend needs a label map, and this case has none")
    return regions_from_label(label, min_voxels=int(options.get("min_voxels", 1)))


@register_backend("manual")
def _manual_backend(label: np.ndarray | None, options: Mapping) -> RegionResult:
    top, bottom = options.get("top"), options.get("bottom")
    if top is None or bottom is None:
        raise RegionError("the 'manual' region backend needs both 'top' and 'bottom'")
    one_hot(top), one_hot(bottom)
    if BODY_REGIONS.index(top) > BODY_REGIONS.index(bottom):
        raise RegionError(f"top region {top!r} lies below bottom region {bottom!r}")
    return RegionResult(top=top, bottom=bottom, backend="manual")


def derive_case_regions(case_id: str, label_path: str | None, cfg: Mapping) -> RegionResult:
    """Regions of one prepared case: a per-case override wins, else the configured backend.

    Errors are raised as :class:`maisi.checks.InputError` naming the label file (or the case).
    """
    from maisi.checks import InputError

    override = (cfg.get("overrides") or {}).get(case_id)
    try:
        if override:
            result = REGION_BACKENDS["manual"](None, override)
            return RegionResult(result.top, result.bottom, "manual-override")
        backend = cfg.get("backend", "labels")
        if backend not in REGION_BACKENDS:
            raise RegionError(f"unknown region backend {backend!r}; available: {', '.join(sorted(REGION_BACKENDS))}")
        label = None
        if label_path:
            import nibabel as nib

            label = np.asanyarray(nib.load(label_path).dataobj)
        return REGION_BACKENDS[backend](label, cfg)
    except RegionError as exc:
        raise InputError(label_path or f"case {case_id}", str(exc)) from exc
