"""Body regions (MAISI's top/bottom region one-hot vectors) and the backends that derive them.

MAISI conditions its diffusion model on the first and last body region a scan covers, each as a
4-element one-hot vector in the order head-neck, chest, abdomen, lower body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from maisi.core.anatomy import BODY_REGIONS, REGION_LABELS, RegionError, one_hot
from maisi.core.labels import label_id

__all__ = ["VERTEBRA_LABELS", "VERTEBRA_MODES", "RegionResult", "RegionError", "regions_from_label", "REGION_BACKENDS", "register_backend"]

#: Vertebrae (and pelvic bones) by region, for scans whose marker organs are cut off.
VERTEBRA_LABELS: dict[str, tuple[int, ...]] = {
    "head_neck": tuple(label_id(f"vertebrae C{i}") for i in range(1, 8)),
    "chest": tuple(label_id(f"vertebrae T{i}") for i in range(1, 13)),
    "abdomen": tuple(label_id(f"vertebrae L{i}") for i in range(1, 6)),
    "lower_body": (label_id("sacrum"), label_id("vertebrae S1"), label_id("left hip"), label_id("right hip")),
}


#: How the vertebrae take part: ``off`` (MAISI's organ rule only), ``fallback`` (vertebrae only
#: when no marker organ is present) or ``union`` (a region counts when its organs or its
#: vertebrae are present, so a region whose organs are cut off at the scan's edge still counts).
VERTEBRA_MODES: tuple[str, ...] = ("off", "fallback", "union")




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


def _present(count: Mapping[int, int], markers: Mapping[str, tuple[int, ...]], min_voxels: int) -> tuple[str, ...]:
    return tuple(r for r in BODY_REGIONS if sum(count.get(i, 0) for i in markers[r]) >= min_voxels)


def regions_from_label(
    label: np.ndarray, min_voxels: int = 1, vertebrae: str = "fallback", backend: str = "labels"
) -> RegionResult:
    """Top and bottom region from a MAISI label map with MAISI's rule.

    A region is present when its marker labels (:data:`REGION_LABELS`) cover at least
    ``min_voxels`` voxels; the top region is the first present in head-to-foot order and the
    bottom region the last. ``vertebrae`` (one of :data:`VERTEBRA_MODES`) says how the vertebrae
    of :data:`VERTEBRA_LABELS` add to that.
    """
    if vertebrae not in VERTEBRA_MODES:
        raise RegionError(f"unknown vertebrae mode {vertebrae!r}; expected one of {', '.join(VERTEBRA_MODES)}")
    ids, counts = np.unique(np.asarray(label), return_counts=True)
    count = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    organs = _present(count, REGION_LABELS, min_voxels)
    bones = _present(count, VERTEBRA_LABELS, min_voxels) if vertebrae != "off" else ()
    if vertebrae == "union" or not organs:
        present = tuple(r for r in BODY_REGIONS if r in organs or r in bones)
    else:
        present = organs
    if not present:
        raise RegionError(
            "no region marker label (brain/skull, lung lobes, liver/spleen/pancreas/kidneys, femurs"
            + (", vertebrae, sacrum/hips" if vertebrae != "off" else "")
            + ") in the label map; set a manual region for this case"
        )
    return RegionResult(top=present[0], bottom=present[-1], backend=backend, present=present)


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
    return regions_from_label(label, min_voxels=int(options.get("min_voxels", 1)), vertebrae=options.get("vertebrae", "fallback"))


@register_backend("totalsegmentator")
def _totalseg_backend(label: np.ndarray | None, options: Mapping) -> RegionResult:
    """MAISI's rule on the mask TotalSegmentator made (see :mod:`maisi.prepare.totalsegmentator`)."""
    if label is None:
        raise RegionError("no TotalSegmentator mask for this case")
    return regions_from_label(
        label,
        min_voxels=int(options.get("min_voxels", 1)),
        vertebrae=options.get("vertebrae", "fallback"),
        backend="totalsegmentator",
    )


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

    Errors are raised as :class:`maisi.core.checks.InputError` naming the label file (or the case).
    """
    from maisi.core.checks import InputError

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


REGION_COLUMNS: tuple[str, ...] = (
    "case_id", "source", "status", "reason", "top_region", "bottom_region", "region_backend", "label", "label_source",
    "labels_present",
)  # fmt: skip


def shard_regions(prepared, segmented, cfg: Mapping, threads: int = 1, on_error: str = "stop", desc: str = "regions") -> list[dict]:
    """Region rows of one shard's prepared cases (a :func:`maisi.core.tables.read_table` frame).

    ``segmented`` is the shard's TotalSegmentator table when the source uses that backend (its
    masks replace the cases' labels, and its rejected cases stay rejected), else ``None``.
    """
    from maisi.core.checks import InputError
    from maisi.core.shards import run_cases

    ok = prepared[prepared.status == "ok"]
    masks: dict[str, Mapping] = {}
    if segmented is not None:
        masks = {r.case_id: r._asdict() for r in segmented.itertuples()}

    def one(row) -> dict:
        label, label_source, present = row.label or "", "source" if row.label else "", ""
        if segmented is not None:
            seg = masks.get(row.case_id)
            if seg is None:
                raise InputError(row.image, "no TotalSegmentator result for this case")
            if seg["status"] != "ok":
                raise InputError(None, f"totalsegmentator: {seg['reason']}")
            label, label_source, present = seg["label"], f"totalsegmentator:{seg['ts_mode']}", seg["labels_present"]
        result = derive_case_regions(row.case_id, label or None, cfg)
        return {
            "source": row.source, "top_region": result.top, "bottom_region": result.bottom,
            "region_backend": result.backend, "label": label, "label_source": label_source, "labels_present": present,
        }  # fmt: skip

    rows = run_cases(one, list(ok.itertuples()), case_id=lambda r: r.case_id, threads=threads, on_error=on_error, desc=desc)
    for row, case in zip(rows, ok.itertuples(), strict=True):
        row.setdefault("source", case.source)
    return rows
