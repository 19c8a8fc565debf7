"""Quality control of generated CT: MAISI's per-organ HU check plus the checks MAISI lacks.

MAISI's check (paper, section on quality control): over the real training images, take the median
HU inside each organ; an organ's allowed range is ``[min(mean - 3 sd, 0.5th percentile),
max(mean + 3 sd, 99.5th percentile)]`` of those medians, bone capped at 1000 HU. A generated case
passes when the median HU of every organ present in its label map lies inside the organ's range.

Added here: organs lie inside the body (found from the image), no NaN, HU within the CT range
[-1024, 3071], and the label map on the image's grid. And, for every case, an intensity check
that needs no label map, so a case without a checkable organ (an image-only request) gets no free
pass: the share of the volume the body fills, and the shares of the body in the air, fat, soft-tissue
and bone bands (:data:`HU_BANDS`), each against the range the real cases give by MAISI's rule.
Pure noise, a constant image or an image without a body fails it with the band that is off. And the
"one body" check: tissue in pieces, a body that ends inside the field of view along z or a body of pieces
scattered across its slices can pass the shares, not the body's structure (:func:`body_structure`: the share of
the tissue in the largest connected part, the share of the axial slices holding body, its solidity), each
against the range the real cases give by the same rule.

The reference ranges are a versioned artefact (:data:`REFERENCE_VERSION`) computed from the prepared
data, so a release can cite them; or, with ``qc.reference: nvidia``, NVIDIA's released organ statistics
(``image_median_statistics_ct.json``) with NVIDIA's rules (:func:`nvidia_reference`), the intensity
ranges still from the prepared data (NVIDIA publishes none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from maisi.core.anatomy import body_mask
from maisi.core.checks import InputError
from maisi.core.holdout import HELD_OUT, case_key, check_not_held_out
from maisi.core.labels import BODY, label_name, maisi_labels
from maisi.core.schema import schema_default
from maisi.core.settings import ConfigSettings

__all__ = ["QCSettings", "OrganRange", "QCResult", "ORGAN_GROUPS", "NVIDIA_GROUPS", "HU_BANDS", "BODY_SHARE", "STRUCTURE", "BODY_LARGEST_SHARE", "BODY_EXTENT_Z", "BODY_SOLIDITY", "REFERENCE_VERSION", "CT_RANGE", "organ_groups", "organ_medians", "intensity_profile", "body_structure", "load_case", "reference_ranges", "intensity_ranges", "build_reference", "nvidia_reference", "Reference", "load_reference", "read_reference", "check_case", "check_files"]

#: Version of the reference format and of the range rule; bumped when either changes.
REFERENCE_VERSION = 3  # 3: the profiles and ranges of the body's structure (the "one body" check)


#: HU bands of the intensity check, as shares of the body's voxels: air (lungs, bowel gas), fat, soft tissue, bone.
HU_BANDS: dict[str, tuple[float, float]] = {
    "air": (-np.inf, -500.0), "fat": (-500.0, -30.0), "soft tissue": (-30.0, 200.0), "bone": (200.0, np.inf),
}  # fmt: skip


#: The intensity profile's entry for the share of the volume the body fills.
BODY_SHARE = "body"


#: The structure features of the body (:func:`body_structure`), checked as "one body": the share of the tissue
#: above the body threshold in the body, the share of the axial slices it reaches, and its solidity.
BODY_LARGEST_SHARE = "body_largest_share"
BODY_EXTENT_Z = "body_extent_z"
BODY_SOLIDITY = "body_solidity"
STRUCTURE = (BODY_LARGEST_SHARE, BODY_EXTENT_Z, BODY_SOLIDITY)


#: The HU range a CT scanner stores (12-bit, rescale intercept -1024).
CT_RANGE = (-1024.0, 3071.0)


_BONE_NAMES = ("vertebrae", "rib", "humerus", "scapula", "clavicula", "femur", "hip", "sacrum", "skull", "sternum")


def _bone_ids() -> tuple[int, ...]:
    return tuple(sorted(v for k, v in maisi_labels().items() if any(k.startswith(b) or f" {b}" in k for b in _BONE_NAMES)))


#: MAISI's organ groups (its QC script groups kidneys, lung lobes and bones); other classes are checked one by one.
ORGAN_GROUPS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "pancreas": (4,),
    "kidney": (5, 14),
    "lung": (28, 29, 30, 31, 32),
    "bone": _bone_ids(),
    "brain": (22,),
}


#: Upper cap of the bone range (MAISI).
BONE_CAP_HU = 1000.0


#: The organ groups of NVIDIA's released QC (its sampler's ``label_int_dict``): its lung list omits
#: lobe 32 (right lower lobe), and its bone list is ids 33-56, 63-97, 120, 122 and 127.
NVIDIA_GROUPS: dict[str, tuple[int, ...]] = {
    "liver": (1,), "spleen": (3,), "pancreas": (4,), "kidney": (5, 14), "lung": (28, 29, 30, 31), "brain": (22,),
    "bone": (*range(33, 57), *range(63, 98), 120, 122, 127),
}  # fmt: skip


@dataclass(frozen=True)
class QCSettings(ConfigSettings):
    """What QC checks and what happens to a case that fails it."""

    SECTION: ClassVar[str] = "qc"

    max_attempts: int = schema_default("qc.max_attempts")
    on_fail: str = schema_default("qc.on_fail")  # or "flag": kept in the release, marked as failed
    min_voxels: int = schema_default("qc.min_voxels")
    min_reference_cases: int = schema_default("qc.min_reference_cases")
    min_inside_body: float = schema_default("qc.min_inside_body")
    body_threshold_hu: float = schema_default("qc.body_threshold_hu")
    hu_range: tuple[float, float] = schema_default("qc.hu_range")
    check_organs: bool = schema_default("qc.check_organs")
    organs: str = schema_default("qc.organs")  # maisi: MAISI's seven QC organs; all: every organ with a range
    min_halfwidth_hu: float = schema_default("qc.min_halfwidth_hu")  # floor of a range's half-width about its mean
    min_halfwidth_share: float = schema_default("qc.min_halfwidth_share")  # the same floor for the one-body shares
    totalsegmentator: bool = schema_default("qc.totalsegmentator")  # image-only cases segmented where weights are set
    reference: str = schema_default("qc.reference")  # real | nvidia
    nvidia_statistics: str | None = schema_default("qc.nvidia_statistics")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QCSettings:
        """From ``config["qc"]``."""
        return cls.from_dict(config.get("qc", {}))

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> QCSettings:
        block = dict(block)
        if "hu_range" in block:
            block["hu_range"] = tuple(float(v) for v in block["hu_range"])
        return cls(**block)

    def reference_json(self) -> str:
        """The settings the reference ranges depend on."""
        d = {"min_voxels": self.min_voxels, "min_reference_cases": self.min_reference_cases, "body_threshold_hu": self.body_threshold_hu}
        if self.min_halfwidth_hu:
            d["min_halfwidth_hu"] = self.min_halfwidth_hu
        if self.min_halfwidth_share:
            d["min_halfwidth_share"] = self.min_halfwidth_share
        if self.reference != "real":  # the real-data reference's parameters stay as they were
            d.update(reference=self.reference, nvidia_statistics=self.nvidia_statistics)
        return json.dumps(d, sort_keys=True)

    def check_json(self) -> str:
        """The settings that decide whether a case passes (not the release policy ``on_fail``)."""
        d = asdict(self)
        d.pop("on_fail")
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class OrganRange:
    """Allowed median HU of one organ, with the statistics it came from."""

    organ: str
    labels: tuple[int, ...]
    n: int
    mean: float
    sd: float
    p005: float
    p995: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass
class QCResult:
    """The verdict on one case: ``passed``, the reasons when not, and the organ medians measured."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # the checks made: structure, intensity, one body, inside body, organ HU

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "reasons": list(self.reasons), "medians": dict(self.medians), "unchecked": list(self.unchecked),
            "checks": list(self.checks),
        }  # fmt: skip


def organ_groups(label: np.ndarray, groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """The organ groups present in ``label``: ``groups`` (MAISI's, :data:`ORGAN_GROUPS`, by default), then
    every other class by its name (``body`` and placeholder classes excluded)."""
    present = {int(v) for v in np.unique(label)} - {0, BODY}
    out: dict[str, tuple[int, ...]] = {}
    grouped: set[int] = set()
    for name, ids in (ORGAN_GROUPS if groups is None else groups).items():
        hit = tuple(i for i in ids if i in present)
        grouped |= set(ids)
        if hit:
            out[name] = tuple(hit)
    for i in sorted(present - grouped):
        name = label_name(i)
        if not name.startswith("dummy"):
            out[name] = (i,)
    return out


def organ_medians(hu: np.ndarray, label: np.ndarray, min_voxels: int = 20) -> dict[str, float]:
    """Median HU inside each organ group present in ``label`` with at least ``min_voxels`` voxels."""
    out = {}
    for name, ids in organ_groups(label).items():
        values = hu[np.isin(label, ids)]
        if values.size >= min_voxels:
            out[name] = float(np.median(values))
    return out


def load_case(image: str | os.PathLike, label: str | os.PathLike, scaled: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read an image and its label map as (hu float32, label, image affine, label affine).

    ``scaled`` images hold MAISI's [0, 1] intensities (``(HU + 1000) / 2000``) and are mapped back.
    Unreadable files raise :class:`InputError` naming the file.
    """
    import nibabel as nib

    arrays = []
    for path in (image, label):
        try:
            img = nib.load(os.fspath(path))
            arrays.append((np.asanyarray(img.dataobj), img.affine))
        except Exception as exc:  # nibabel raises many types for truncated or foreign files
            raise InputError(path, f"cannot be read as NIfTI ({exc})") from exc
    (hu, aff_i), (lab, aff_l) = arrays
    hu = hu.astype(np.float32)
    if scaled:
        hu = hu * 2000.0 - 1000.0
    if lab.ndim != 3 or not np.issubdtype(lab.dtype, np.integer) and not np.allclose(lab, np.rint(lab)):
        raise InputError(label, "not a 3-D integer label map")
    return hu, lab.astype(np.int32), aff_i, aff_l


def _maisi_range(
    name: str, values: Sequence[float], labels: tuple[int, ...] = (), cap: tuple[float, float] = (-np.inf, np.inf), min_halfwidth: float = 0.0
) -> OrganRange:
    """MAISI's rule on one set of per-case values: ``[min(mean - 3 sd, p0.5), max(mean + 3 sd, p99.5)]``, at least
    ``mean -/+ min_halfwidth``, clipped to ``cap``."""
    v = np.asarray(values, dtype=np.float64)
    mean, sd = float(v.mean()), float(v.std())
    p005, p995 = (float(x) for x in np.percentile(v, [0.5, 99.5]))
    low = max(min(mean - 3 * sd, p005, mean - min_halfwidth), cap[0])
    high = min(max(mean + 3 * sd, p995, mean + min_halfwidth), cap[1])
    return OrganRange(name, labels, int(v.size), mean, sd, p005, p995, low, high)


def reference_ranges(
    medians: Mapping[str, Sequence[float]], groups: Mapping[str, Sequence[int]], min_cases: int = 3, min_halfwidth: float = 0.0
) -> dict[str, OrganRange]:
    """MAISI's allowed ranges from the per-case medians of each organ (organs with fewer than
    ``min_cases`` cases get none: their spread is unknown), each at least ``min_halfwidth`` HU either side of
    its mean (a floor for data whose organs barely vary, such as a phantom's)."""
    return {
        organ: _maisi_range(organ, values, tuple(int(i) for i in groups[organ]),
                            (-np.inf, BONE_CAP_HU if organ == "bone" else np.inf), min_halfwidth)  # fmt: skip
        for organ, values in sorted(medians.items())
        if len(values) >= max(1, min_cases)
    }


def intensity_profile(hu: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """The share of the volume in ``body`` (:data:`BODY_SHARE`) and the shares of the body's voxels in each of
    :data:`HU_BANDS` (absent where the body is empty)."""
    n = int(body.sum())
    out = {BODY_SHARE: n / body.size}
    if n:
        inside = hu[body]
        out.update({band: float(np.mean((inside >= lo) & (inside < hi))) for band, (lo, hi) in HU_BANDS.items()})
    return out


def body_structure(hu: np.ndarray, body: np.ndarray, threshold_hu: float = -500.0) -> dict[str, float]:
    """The structure of the body (:data:`STRUCTURE`, each a fraction in [0, 1]; empty where the body is empty).

    ``body`` is :func:`~maisi.core.anatomy.body_mask`'s: the largest 6-connected component of the voxels above
    ``threshold_hu``, the holes of each axial slice filled. :data:`BODY_LARGEST_SHARE`: the share of the
    voxels above ``threshold_hu`` that lie in it (tissue in other components, blobs beside the body, lowers
    it; tissue in a hole of the body, a bone fragment in a lung, belongs to it). :data:`BODY_EXTENT_Z`: the
    share of the axial slices (the third array axis) that hold body, the length of its bounding box along z
    over the volume's, since a connected body leaves no slice out between its ends: a CT's field of view lies
    within the patient along the body axis, so it is 1 but where the head's top or the feet lie inside it.
    :data:`BODY_SOLIDITY`: its area over the area of the convex hull of its cross-section (the union of its
    pixels' squares), summed over the axial slices holding it: a cross-section of a trunk is solid and near
    convex (0.92-0.99 on the phantoms; two legs 0.83-0.85), pieces scattered in the slice are not. The sums weigh
    each slice by its size, so a few stray pixels in an end slice weigh little. All three are ratios of voxel
    counts on the array's grid, the same on any voxel spacing.
    """
    from scipy.spatial import ConvexHull

    body = np.asarray(body, dtype=bool)
    areas = np.count_nonzero(body, axis=(0, 1))
    if not areas.any():
        return {}
    above = np.asarray(hu) > threshold_hu
    n_above = np.count_nonzero(above)
    above &= body
    out = {BODY_LARGEST_SHARE: np.count_nonzero(above) / n_above, BODY_EXTENT_Z: np.count_nonzero(areas) / body.shape[2]}
    # The hull of a slice's pixels is the hull of the outer corners of each row's first and last pixel.
    rows = body.any(axis=1)  # (x, z)
    first = np.argmax(body, axis=1)
    last = body.shape[1] - np.argmax(body[:, ::-1, :], axis=1)  # one past the last pixel
    hull = 0.0
    for z in np.flatnonzero(areas):
        x = np.flatnonzero(rows[:, z])
        lo, hi = first[x, z], last[x, z]
        pts = np.concatenate([np.stack([x, lo], 1), np.stack([x + 1, lo], 1), np.stack([x, hi], 1), np.stack([x + 1, hi], 1)])
        hull += ConvexHull(pts.astype(np.float64)).volume  # in 2-D, qhull's volume is the area
    out[BODY_SOLIDITY] = min(float(areas.sum()) / hull, 1.0)
    return {k: float(v) for k, v in out.items()}


def intensity_ranges(profiles: Mapping[str, Mapping[str, float]], min_cases: int = 3, min_halfwidth_share: float = 0.0) -> dict[str, OrganRange]:
    """MAISI's rule applied to each entry of the real cases' intensity profiles (shares, so clipped to [0, 1]),
    and to the body's :data:`STRUCTURE` where the profiles hold it (:func:`body_structure`; those ranges at least
    ``min_halfwidth_share`` each side of the mean); none with fewer than ``min_cases`` cases."""
    if len(profiles) < max(1, min_cases):
        return {}
    keys = (BODY_SHARE, *HU_BANDS, *(k for k in STRUCTURE if any(k in p for p in profiles.values())))
    return {k: _maisi_range(k, [p.get(k, 0.0) for p in profiles.values()], cap=(0.0, 1.0),
                            min_halfwidth=min_halfwidth_share if k in STRUCTURE else 0.0) for k in keys}  # fmt: skip


def build_reference(cases: Iterable[Mapping[str, str]], settings: QCSettings, progress: bool = True) -> dict[str, Any]:
    """Per-organ median-HU statistics and ranges over the real cases (rows with ``case_id``,
    ``image_hu`` or ``image`` and ``label``; a row of the held-out ``split`` is refused); the returned dict is
    what :func:`read_reference` reads."""
    from tqdm.auto import tqdm

    medians: dict[str, list[float]] = {}
    groups: dict[str, tuple[int, ...]] = {}
    per_case: dict[str, dict[str, float]] = {}
    profiles: dict[str, dict[str, float]] = {}
    rows = [r for r in cases if r.get("label")]
    leaked = {case_key(r.get("source", ""), r["case_id"]): r["label"] for r in rows if r.get("split") == HELD_OUT}
    check_not_held_out(leaked, set(leaked), "QC reference")  # the held-out split never sets the ranges
    for r in tqdm(rows, desc="QC reference", unit="case", disable=not progress):
        scaled = not r.get("image_hu")
        hu, lab, _, _ = load_case(r.get("image_hu") or r["image"], r["label"], scaled=scaled)
        if hu.shape != lab.shape:
            raise InputError(r["label"], f"label grid {lab.shape} differs from image grid {hu.shape}")
        found = organ_medians(hu, lab, settings.min_voxels)
        groups.update({k: v for k, v in organ_groups(lab).items() if k in found})
        per_case[r["case_id"]] = found
        body = body_mask(hu, settings.body_threshold_hu)
        profiles[r["case_id"]] = {**intensity_profile(hu, body), **body_structure(hu, body, settings.body_threshold_hu)}
        for organ, value in found.items():
            medians.setdefault(organ, []).append(value)
    ranges = reference_ranges(medians, groups, settings.min_reference_cases, settings.min_halfwidth_hu)
    floor = f", at least mean -/+ {settings.min_halfwidth_hu:g} HU" if settings.min_halfwidth_hu else ""
    return {
        "version": REFERENCE_VERSION,
        "rule": f"range = [min(mean - 3 sd, p0.5), max(mean + 3 sd, p99.5)] of per-case organ medians{floor}; bone capped at 1000 HU",
        "n_cases": len(rows),
        "ranges": {k: asdict(v) for k, v in ranges.items()},
        "too_few_cases": sorted(set(medians) - set(ranges)),
        "medians": per_case,
        "intensity": _intensity_record(profiles, settings),
    }


def _intensity_record(profiles: Mapping[str, Mapping[str, float]], settings: QCSettings) -> dict[str, Any]:
    return {
        "rule": f"the same rule on the share of the volume inside the body (> {settings.body_threshold_hu:g} HU, largest component, "
                "holes filled), on the shares of the body in each HU band and on the body's structure (the share of the "
                f"voxels above {settings.body_threshold_hu:g} HU in the body, the share of the axial slices holding body, the "
                "body's area over its convex hull's summed over the axial slices); all clipped to [0, 1]",
        "bands": {k: [lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None] for k, (lo, hi) in HU_BANDS.items()},
        "ranges": {k: asdict(v) for k, v in intensity_ranges(profiles, settings.min_reference_cases, settings.min_halfwidth_share).items()},
        "profiles": {k: dict(v) for k, v in profiles.items()},
    }  # fmt: skip


def nvidia_reference(path: str | os.PathLike, intensity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A reference (:func:`read_reference`'s format) from NVIDIA's released statistics
    (``configs/image_median_statistics_ct.json``), with NVIDIA's rule: an organ's range is
    ``[min(sigma_6_low, percentile_0_5), max(sigma_6_high, percentile_99_5)]``, bone's upper limit 1000 HU
    whatever the statistics say, organs grouped as NVIDIA groups them (:data:`NVIDIA_GROUPS`). ``intensity``:
    the intensity record of :func:`build_reference` on the real data (NVIDIA publishes no such ranges)."""
    try:
        with open(path, encoding="utf-8") as fh:
            stats = json.load(fh)
        ranges = {}
        for organ, st in sorted(stats.items()):
            if organ not in NVIDIA_GROUPS:
                raise InputError(path, f"organ {organ!r} is not one of NVIDIA's QC groups ({', '.join(NVIDIA_GROUPS)})")
            lo6, hi6, p005, p995 = (float(st[k]) for k in ("sigma_6_low", "sigma_6_high", "percentile_0_5", "percentile_99_5"))
            low, high = min(lo6, p005), max(hi6, p995)
            if organ == "bone":
                high = BONE_CAP_HU
            ranges[organ] = OrganRange(organ, NVIDIA_GROUPS[organ], 0, (lo6 + hi6) / 2, (hi6 - lo6) / 6, p005, p995, low, high)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not NVIDIA's organ statistics file ({type(exc).__name__}: {exc})") from None
    return {
        "version": REFERENCE_VERSION, "source": "nvidia", "statistics_file": str(path),
        "rule": "NVIDIA's: range = [min(sigma_6_low, p0.5), max(sigma_6_high, p99.5)]; bone's upper limit 1000 HU",
        "n_cases": None, "ranges": {k: asdict(v) for k, v in ranges.items()}, "too_few_cases": [], "medians": {},
        "groups": {k: list(v) for k, v in NVIDIA_GROUPS.items()}, "intensity": dict(intensity or {}),
    }  # fmt: skip


def _read_versioned(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("version") != REFERENCE_VERSION:
        raise InputError(path, f"QC reference version {data.get('version')} is not {REFERENCE_VERSION}; rebuild it")
    return data


def _ranges(block: Mapping[str, Any]) -> dict[str, OrganRange]:
    return {k: OrganRange(**{**v, "labels": tuple(v["labels"])}) for k, v in block.items()}


@dataclass(frozen=True)
class Reference:
    """What a QC reference file (:func:`build_reference`, :func:`nvidia_reference`) holds for checking cases."""

    ranges: dict[str, OrganRange]  # organ median-HU ranges
    groups: dict[str, tuple[int, ...]] | None  # the organ groups it was made with (NVIDIA's), or None: MAISI's
    intensity: dict[str, OrganRange]  # BODY_SHARE, HU_BANDS and STRUCTURE; empty where the real data had too few cases


def load_reference(path: str | os.PathLike) -> Reference:
    """A QC reference file, read once."""
    data = _read_versioned(path)
    groups = data.get("groups")
    return Reference(
        _ranges(data["ranges"]),
        None if groups is None else {k: tuple(v) for k, v in groups.items()},
        _ranges(data.get("intensity", {}).get("ranges", {})),
    )


def read_reference(path: str | os.PathLike) -> dict[str, OrganRange]:
    """The organ ranges of a reference written by :func:`build_reference`."""
    return load_reference(path).ranges


def check_case(
    hu: np.ndarray,
    label: np.ndarray,
    ranges: Mapping[str, OrganRange],
    settings: QCSettings,
    affines: tuple[np.ndarray, np.ndarray] | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    intensity: Mapping[str, OrganRange] | None = None,
) -> QCResult:
    """Check one generated case; every failed check adds a reason and :attr:`QCResult.checks` names the checks made.
    ``groups``: the reference's organ groups; ``intensity``: the ranges of the checks that need no label map
    (:attr:`Reference.intensity`): the intensity check on :data:`BODY_SHARE` and :data:`HU_BANDS`, and the
    "one body" check on :data:`STRUCTURE` where they hold its ranges."""
    reasons: list[str] = []
    checks = ["structure"]
    if hu.shape != label.shape:
        return QCResult(False, [f"label grid {label.shape} differs from image grid {hu.shape}"], checks=checks)
    if affines is not None and not np.allclose(affines[0], affines[1], atol=1e-3):
        reasons.append("label affine differs from image affine")
    n_nan = int(np.isnan(hu).sum())
    if n_nan:
        return QCResult(False, [*reasons, f"{n_nan} NaN voxels"], checks=checks)
    lo, hi = float(hu.min()), float(hu.max())
    if lo < settings.hu_range[0] or hi > settings.hu_range[1]:
        reasons.append(f"HU {lo:g}..{hi:g} outside [{settings.hu_range[0]:g}, {settings.hu_range[1]:g}]")
    body = body_mask(hu, settings.body_threshold_hu)
    shares = {k: v for k, v in (intensity or {}).items() if k not in STRUCTURE}
    structure = {k: v for k, v in (intensity or {}).items() if k in STRUCTURE}
    if shares:
        checks.append("intensity")
        reasons += _intensity_reasons(intensity_profile(hu, body), shares, settings.body_threshold_hu)
    if structure:
        checks.append("one body")
        threshold = settings.body_threshold_hu
        reasons += _structure_reasons(body_structure(hu, body, threshold), structure, hu.shape, threshold)
    medians: dict[str, float] = {}
    unchecked: list[str] = []
    present = organ_groups(label, groups)
    if present:
        checks.append("inside body")
    if present and settings.check_organs:
        checks.append("organ HU")
    for organ, ids in present.items():
        inside = np.isin(label, ids)
        n = int(inside.sum())
        if n < settings.min_voxels:
            continue
        frac = float(body[inside].mean())
        if frac < settings.min_inside_body:
            reasons.append(f"{organ}: {100 * frac:.0f}% inside the body (< {100 * settings.min_inside_body:.0f}%)")
        medians[organ] = median = float(np.median(hu[inside]))
        if not settings.check_organs or (settings.organs == "maisi" and organ not in ORGAN_GROUPS):
            continue
        rng = ranges.get(organ)
        if rng is None:
            unchecked.append(organ)
        elif not rng.contains(median):
            reasons.append(f"{organ}: median {median:.1f} HU outside [{rng.low:.1f}, {rng.high:.1f}]")
    return QCResult(not reasons, reasons, medians, unchecked, checks)


def _intensity_reasons(profile: Mapping[str, float], ranges: Mapping[str, OrganRange], threshold_hu: float) -> list[str]:
    """Why an intensity profile lies outside the real data's ranges (empty when it does not)."""
    if profile[BODY_SHARE] == 0:
        return [f"no body: no voxel above {threshold_hu:g} HU"]
    out = []
    for key, value in profile.items():
        rng = ranges.get(key)
        if rng is None or rng.contains(value):
            continue
        what = "the body fills" if key == BODY_SHARE else f"{key} band ({_band_text(HU_BANDS[key])}):"
        whole = "the volume" if key == BODY_SHARE else "the body"
        out.append(f"{what} {100 * value:.1f}% of {whole}; real cases {100 * rng.low:.1f}-{100 * rng.high:.1f}%")
    return out


def _structure_reasons(
    structure: Mapping[str, float], ranges: Mapping[str, OrganRange], shape: Sequence[int], threshold_hu: float
) -> list[str]:
    """Why the body's structure (:func:`body_structure`) lies outside the real data's ranges; empty where there is
    no body (the intensity check says so)."""
    out = []
    for key, value in structure.items():
        rng = ranges.get(key)
        if rng is None or rng.contains(value):
            continue
        measured, real = _percents(value, rng)
        if key == BODY_LARGEST_SHARE:
            what = f"not one body: the largest connected part holds {measured} of the tissue above {threshold_hu:g} HU"
        elif key == BODY_SOLIDITY:
            what = f"body solidity: the body fills {measured} of the convex hulls of its axial slices"
        else:
            what = f"body extent along z: the body reaches {round(value * shape[2])} of {shape[2]} axial slices ({measured})"
        out.append(f"{what}; real cases {real}")
    return out


def _percents(value: float, rng: OrganRange) -> tuple[str, str]:
    """``value`` and ``rng`` as percentages, with as many decimals as it takes to tell the value from the bounds."""
    for digits in range(1, 6):
        v, lo, hi = (f"{100 * x:.{digits}f}" for x in (value, rng.low, rng.high))
        if v not in (lo, hi):
            break
    return f"{v}%", f"{lo}-{hi}%"


def _band_text(band: tuple[float, float]) -> str:
    lo, hi = band
    if not np.isfinite(lo):
        return f"< {hi:g} HU"
    return f">= {lo:g} HU" if not np.isfinite(hi) else f"{lo:g} to {hi:g} HU"


def check_files(
    image: str | os.PathLike, label: str | os.PathLike, ranges: Mapping[str, OrganRange], settings: QCSettings,
    groups: Mapping[str, Sequence[int]] | None = None, intensity: Mapping[str, OrganRange] | None = None,
) -> QCResult:  # fmt: skip
    """:func:`check_case` on files; an unreadable file fails the case with its reason."""
    try:
        hu, lab, aff_i, aff_l = load_case(image, label)
    except InputError as exc:
        return QCResult(False, [str(exc)])
    return check_case(hu, lab, ranges, settings, (aff_i, aff_l), groups, intensity)
