"""MAISI's mask database and the retrieval of a label map for ControlNet-conditioned generation.

MAISI does not draw label maps from scratch: it takes a real (pseudo-)label map from a database
whose entries record the grid, the body regions and the classes each map contains, filters it
by the anatomy the user asks for, and resamples the chosen map to the requested grid when no
map matches it exactly (``find_masks`` and ``LDMSampler.find_closest_masks`` in MAISI's
reference code). This module builds that database from the prepared dataset table and
implements the same selection:

* :func:`candidates` is MAISI's exact filter: every requested anatomy present, the requested
  body regions, MAISI's tumour rule and the requested grid (same dims, spacing within
  :data:`SPACING_TOLERANCE_MM` per axis).
* :func:`rank_fallback` ranks the maps that carry the anatomy by how far their field of view,
  dims and spacing are from the request, for resampling.
* :func:`select_mask` draws uniformly among the exact candidates, else takes the best fallback.
* :func:`load_mask` loads a map on the requested grid (nearest-neighbour resampling) and checks
  that the requested anatomy survived it.

NVIDIA's released candidate database (``candidate_masks_flexible_size_and_spacing_4000.json`` with its
mask archive) is read in its own format by :func:`read_nvidia_candidates`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.checks import InputError
from maisi.core.holdout import LabelMapRef, check_held_out_label_maps
from maisi.core.io import sha256_file, write_json
from maisi.core.labels import label_name, resolve_label
from maisi.core.provenance import provenance

__all__ = ["TUMOUR_LABELS", "BONE_LESION", "SPACING_TOLERANCE_MM", "MaskEntry", "MaskQuery", "NoMaskError", "build_mask_database", "check_held_out_masks", "write_mask_database", "read_mask_database", "candidates", "rank_fallback", "select_mask", "load_mask", "on_query_grid", "mask_summary", "read_nvidia_candidates", "NVIDIA_REGIONS"]

#: Lung tumor, pancreatic tumor, hepatic tumor, colon cancer primaries, bone lesion, kidney mass.
TUMOUR_LABELS: tuple[int, ...] = (23, 24, 26, 27, 128, 129)


BONE_LESION = 128


#: Largest per-axis spacing difference (mm) for a map to count as on the requested grid. MAISI
#: compares spacings for equality; prepared maps have the spacing that MAISI's resize gives
#: (``old_spacing * old_dim / new_dim``), so a small tolerance stands in for equality. A map
#: within it is used voxel for voxel (no resampling).
SPACING_TOLERANCE_MM = 0.05


class NoMaskError(ValueError):
    """No map of the database can satisfy a :class:`MaskQuery`; the message says why."""


def _ints3(value: Any, what: str) -> tuple[int, int, int]:
    out = tuple(int(v) for v in value)
    if len(out) != 3 or any(v <= 0 for v in out):
        raise ValueError(f"{what} must be three positive integers, got {list(value)!r}")
    return out  # type: ignore[return-value]


def _floats3(value: Any, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in value)
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{what} must be three positive numbers, got {list(value)!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class MaskEntry:
    """One label map of the database: where it is, its grid, body regions and the classes it holds."""

    case_id: str
    label: str
    dim: tuple[int, int, int]
    spacing: tuple[float, float, float]
    top_region: str
    bottom_region: str
    labels: tuple[int, ...]
    sha256: str

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Field of view (mm) along each axis: ``dim * spacing``."""
        return tuple(float(n * s) for n, s in zip(self.dim, self.spacing, strict=True))  # type: ignore[return-value]

    @property
    def has_tumour(self) -> bool:
        return any(t in self.labels for t in TUMOUR_LABELS)

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "label": self.label,
            "dim": list(self.dim),
            "spacing": list(self.spacing),
            "top_region": self.top_region,
            "bottom_region": self.bottom_region,
            "labels": list(self.labels),
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MaskEntry:
        return cls(
            case_id=str(d["case_id"]),
            label=str(d["label"]),
            dim=_ints3(d["dim"], "dim"),
            spacing=_floats3(d["spacing"], "spacing"),
            top_region=str(d["top_region"]),
            bottom_region=str(d["bottom_region"]),
            labels=tuple(sorted(int(v) for v in d["labels"])),
            sha256=str(d["sha256"]),
        )


@dataclass(frozen=True)
class MaskQuery:
    """What a generated case needs: its grid, optionally its body regions, and the classes its map must hold.

    ``anatomy`` accepts MAISI ids or class names and is stored as sorted unique ids. Maps holding
    a tumour class are left out unless that tumour is requested or ``allow_tumour`` is set.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    top_region: str | None = None
    bottom_region: str | None = None
    anatomy: tuple[int, ...] = ()
    allow_tumour: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _ints3(self.size, "size"))
        object.__setattr__(self, "spacing", _floats3(self.spacing, "spacing"))
        object.__setattr__(self, "anatomy", tuple(sorted({resolve_label(a) for a in self.anatomy})))
        for name in ("top_region", "bottom_region"):
            region = getattr(self, name)
            if region is not None and region not in BODY_REGIONS:
                raise ValueError(f"{name} {region!r} is not one of {', '.join(BODY_REGIONS)}")

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        return tuple(float(n * s) for n, s in zip(self.size, self.spacing, strict=True))  # type: ignore[return-value]

    def describe(self) -> str:
        anatomy = ", ".join(f"{label_name(a)} ({a})" for a in self.anatomy) or "none"
        return (
            f"size={list(self.size)}, spacing={list(self.spacing)}, top_region={self.top_region}, "
            f"bottom_region={self.bottom_region}, anatomy=[{anatomy}], allow_tumour={self.allow_tumour}"
        )


def _json_list(text: str, what: str, case: str) -> list | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"case {case}: column {what} is not a JSON list: {text!r}") from exc
    if not isinstance(value, list):
        raise ValueError(f"case {case}: column {what} is not a JSON list: {text!r}")
    return value


def build_mask_database(cases: pd.DataFrame) -> list[MaskEntry]:
    """One :class:`MaskEntry` per row of the prepared table that has a label map, sorted by case id.

    ``case_id`` is ``source/case_id``. The class list comes from ``labels_present``; when that is
    empty the map itself is read. Dims and spacing come from the table (from the file's header when
    the table leaves them empty). A label file that is not there raises ``FileNotFoundError``.
    """
    import nibabel as nib

    from maisi.core.checks import spacing_from_affine

    entries: list[MaskEntry] = []
    for row in cases.to_dict(orient="records"):
        path = str(row.get("label", "") or "").strip()
        if not path:
            continue
        case = f"{row['source']}/{row['case_id']}"
        if not Path(path).is_file():
            raise FileNotFoundError(f"label map of case {case} not found: {path}")
        labels = _json_list(str(row.get("labels_present", "")), "labels_present", case)
        dim = _json_list(str(row.get("dim", "")), "dim", case)
        spacing = _json_list(str(row.get("spacing", "")), "spacing", case)
        if not labels or dim is None or spacing is None:
            img = nib.load(path)
            if dim is None:
                dim = list(img.shape[:3])
            if spacing is None:
                spacing = [round(float(s), 6) for s in spacing_from_affine(img.affine)]
            if not labels:
                labels = [int(v) for v in np.unique(np.asarray(img.dataobj)) if v != 0]
        entries.append(
            MaskEntry(
                case_id=case,
                label=path,
                dim=_ints3(dim, f"dim of case {case}"),
                spacing=_floats3(spacing, f"spacing of case {case}"),
                top_region=str(row.get("top_region", "") or ""),
                bottom_region=str(row.get("bottom_region", "") or ""),
                labels=tuple(sorted({int(v) for v in labels})),
                sha256=sha256_file(path),
            )
        )
    return sorted(entries, key=lambda e: e.case_id)


#: NVIDIA's body-region one-hot order (``find_masks.convert_body_region``): head, chest/thorax, abdomen, pelvis/lower.
NVIDIA_REGIONS = ("head_neck", "chest", "abdomen", "lower_body")


def _candidate_file(listing: Path, index: int, key: str, name: str, root: Path) -> Path:
    """The file an item of NVIDIA's candidate list names under ``key``: inside the mask folder ``root`` once resolved
    (links followed), a NIfTI map nibabel reads. Else an :class:`~maisi.core.checks.InputError` naming the list, the item's
    index and its key."""
    import nibabel as nib

    where = f"item {index} ({key} {name!r})"
    folder = root.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(folder):
        raise InputError(listing, f"{where}: points outside the mask folder {folder} (to {target}); every map of the list must lie in it")
    if not name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(listing, f"{where}: not a NIfTI label map (.nii or .nii.gz)")
    if not target.is_file():
        raise InputError(listing, f"{where}: mask {root / name} not found (extract NVIDIA's mask archive there)")
    try:
        img = nib.load(str(target))
    except Exception as exc:  # nibabel raises many types for foreign files
        raise InputError(listing, f"{where}: {target} is not a readable NIfTI label map ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image) or len(img.shape) < 3:
        raise InputError(listing, f"{where}: {target} is not a 3-D NIfTI label map (shape {list(img.shape)})")
    return target


def read_nvidia_candidates(candidates_json: str | os.PathLike, mask_folder: str | os.PathLike) -> list[MaskEntry]:
    """NVIDIA's candidate database as mask entries: one per item (``pseudo_label_filename`` under ``mask_folder``,
    ``dim``, ``spacing``, ``label_list``, and the one-hot ``top_region_index`` / ``bottom_region_index``).

    The case id is ``nvidia/<file name>``; the map the ControlNet is conditioned on is the pseudo label, as
    in NVIDIA's sampler. Each map is hashed (sha256), so a changed file is noticed when it is used. Every file the
    list names (``pseudo_label_filename``, and ``label_filename`` where given) must lie inside the mask folder once
    resolved and be a NIfTI map. An item without regions, a map that is not there, outside the folder or not NIfTI
    raises :class:`~maisi.core.checks.InputError` (a ``ValueError``) naming the list, the item's index and its key.
    """
    path = Path(candidates_json)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"NVIDIA candidate database: not readable JSON ({exc})") from None
    if not isinstance(items, list):
        raise InputError(path, "NVIDIA candidate database: expected a list of masks")
    root = Path(mask_folder)
    subfolders = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    if items and isinstance(items[0], dict) and len(subfolders) == 1 and not (root / str(items[0].get("pseudo_label_filename", ""))).exists():
        root = subfolders[0]  # the archive's own top folder (NVIDIA's zip holds all_masks_flexible_size_and_spacing_4000/)
    entries = []
    for i, item in enumerate(items):
        where = f"item {i}"
        try:
            name = str(item["pseudo_label_filename"])
            where = f"item {i} (pseudo_label_filename {name!r})"
            top = [k for k, v in enumerate(item["top_region_index"]) if v != 0]
            bottom = [k for k, v in enumerate(item["bottom_region_index"]) if v != 0]
            dim, spacing, labels = item["dim"], item["spacing"], item["label_list"]
        except (KeyError, TypeError) as exc:
            raise InputError(path, f"{where}: lacks {exc}") from None
        if not top or not bottom:
            raise InputError(path, f"{where}: no body region in its one-hot region indices")
        label = _candidate_file(path, i, "pseudo_label_filename", name, root)
        if item.get("label_filename"):
            _candidate_file(path, i, "label_filename", str(item["label_filename"]), root)
        entries.append(MaskEntry(
            case_id=f"nvidia/{name}", label=str(label), dim=_ints3(dim, f"dim of {path}, {where}"),
            spacing=_floats3(spacing, f"spacing of {path}, {where}"), top_region=NVIDIA_REGIONS[top[0]],
            bottom_region=NVIDIA_REGIONS[bottom[0]], labels=tuple(sorted({int(v) for v in labels} - {0})), sha256=sha256_file(label),
        ))  # fmt: skip
    return sorted(entries, key=lambda e: e.case_id)


def check_held_out_masks(entries: Sequence[MaskEntry], held_out: pd.DataFrame) -> None:
    """Refuse (:class:`maisi.core.holdout.HeldOutLeak`) a database that holds the label map of a held-out real case
    (``held_out``: the held-out rows of the prepared case table): by case id, by file, by file hash, or by the voxels
    themselves, of the case's prepared map or of the source map its record names, renamed, saved again or resampled to
    the entry's grid (:func:`maisi.core.holdout.check_held_out_label_maps`)."""
    maps = [LabelMapRef(f"mask database entry {e.case_id}", e.label, e.sha256, e.case_id) for e in entries]
    check_held_out_label_maps(maps, held_out, "mask database")


def write_mask_database(entries: Iterable[MaskEntry], dest: str | os.PathLike) -> Path:
    """Atomically write the database as ``{"masks": [...], "provenance": {...}}``."""
    masks = [e.to_json() for e in sorted(entries, key=lambda e: e.case_id)]
    return write_json(dest, {"masks": masks, "provenance": provenance("mask_database")})


def read_mask_database(path: str | os.PathLike) -> list[MaskEntry]:
    """Read a database written by :func:`write_mask_database`; ``ValueError`` names a malformed file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise ValueError(f"mask database {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("masks"), list):
        raise ValueError(f"mask database {path} has no 'masks' list")
    entries = []
    for i, item in enumerate(data["masks"]):
        try:
            entries.append(MaskEntry.from_json(item))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"mask database {path}: entry {i} is malformed ({type(exc).__name__}: {exc})") from exc
    return entries


def _has_anatomy(entry: MaskEntry, query: MaskQuery) -> bool:
    return set(query.anatomy).issubset(entry.labels)


def _tumour_ok(entry: MaskEntry, query: MaskQuery) -> bool:
    """MAISI's rule: a map holding a tumour class that was not requested is left out."""
    if query.allow_tumour:
        return True
    return all(t in query.anatomy for t in TUMOUR_LABELS if t in entry.labels)


def _regions_ok(entry: MaskEntry, query: MaskQuery) -> bool:
    return (query.top_region is None or entry.top_region == query.top_region) and (
        query.bottom_region is None or entry.bottom_region == query.bottom_region
    )


def _same_grid(dim: Sequence[int], spacing: Sequence[float], query: MaskQuery) -> bool:
    return tuple(int(n) for n in dim) == query.size and all(
        abs(float(s) - q) <= SPACING_TOLERANCE_MM for s, q in zip(spacing, query.spacing, strict=True)
    )


def candidates(entries: Iterable[MaskEntry], query: MaskQuery) -> list[MaskEntry]:
    """Maps usable as they are, sorted by case id: all requested anatomy, the requested regions (when
    given), MAISI's tumour rule, the requested dims and spacing within :data:`SPACING_TOLERANCE_MM`."""
    out = [
        e
        for e in entries
        if _has_anatomy(e, query) and _tumour_ok(e, query) and _regions_ok(e, query) and _same_grid(e.dim, e.spacing, query)
    ]
    return sorted(out, key=lambda e: e.case_id)


def _distance_key(entry: MaskEntry, query: MaskQuery) -> tuple[float, float, float, str]:
    fov = float(np.linalg.norm(np.subtract(entry.fov_mm, query.fov_mm)))
    dims = float(np.linalg.norm(np.subtract(entry.dim, query.size)))
    spacing = float(np.linalg.norm(np.subtract(entry.spacing, query.spacing)))
    return fov, dims, spacing, entry.case_id


def rank_fallback(entries: Iterable[MaskEntry], query: MaskQuery) -> list[MaskEntry]:
    """Maps to resample, best first: all requested anatomy and MAISI's tumour rule always hold;
    among them those with the requested regions, or all of them (fewest region mismatches first)
    when none has the regions. Ranked by field-of-view distance (L2, mm), then dims distance
    (L2, voxels), then spacing distance (L2, mm), then case id. Empty when no map has the anatomy."""
    usable = [e for e in entries if _has_anatomy(e, query) and _tumour_ok(e, query)]
    in_region = [e for e in usable if _regions_ok(e, query)]
    if in_region:
        return sorted(in_region, key=lambda e: _distance_key(e, query))

    def mismatches(e: MaskEntry) -> int:
        return int(query.top_region is not None and e.top_region != query.top_region) + int(
            query.bottom_region is not None and e.bottom_region != query.bottom_region
        )

    return sorted(usable, key=lambda e: (mismatches(e), *_distance_key(e, query)))


def _why_none(entries: Sequence[MaskEntry], query: MaskQuery) -> str:
    if not entries:
        return "the mask database is empty"
    missing = [a for a in query.anatomy if not any(a in e.labels for e in entries)]
    if missing:
        names = ", ".join(f"{label_name(a)} ({a})" for a in missing)
        return f"{names} is in none of the {len(entries)} masks"
    with_anatomy = [e for e in entries if _has_anatomy(e, query)]
    if not with_anatomy:
        return f"no single mask of the {len(entries)} holds all of the requested anatomy together"
    return (
        f"the {len(with_anatomy)} masks holding the anatomy also hold tumour classes that were not requested "
        "(request the tumour in the anatomy, or allow tumours)"
    )


def select_mask(entries: Sequence[MaskEntry], query: MaskQuery, rng: np.random.Generator) -> tuple[MaskEntry, bool]:
    """Choose a map for ``query``: uniformly with ``rng`` among the exact :func:`candidates`
    (``(entry, False)``), else the best of :func:`rank_fallback` (``(entry, True)``, to be resampled).
    Raises :class:`NoMaskError` when no map holds the anatomy."""
    entries = list(entries)
    exact = candidates(entries, query)
    if exact:
        return exact[int(rng.integers(len(exact)))], False
    ranked = rank_fallback(entries, query)
    if ranked:
        return ranked[0], True
    raise NoMaskError(f"no mask for query ({query.describe()}): {_why_none(entries, query)}")


def load_mask(entry: MaskEntry, query: MaskQuery) -> tuple[np.ndarray, np.ndarray]:
    """The map of ``entry`` on the grid of ``query``: a uint8 array of shape ``query.size`` and its affine.

    The map is read in RAS. When its dims differ from the query or a spacing differs by more than
    :data:`SPACING_TOLERANCE_MM`, it is resampled as MAISI does: MONAI ``Spacing`` to the requested
    spacing (nearest neighbour), then ``ResizeWithPadOrCrop`` to the requested size (symmetric crop,
    zero padding). The affine is then the one MONAI tracks through both steps: the map's axis
    directions (the identity for the prepared RAS maps) with the requested spacing on the diagonal,
    and an origin that keeps every voxel at its physical place, so the new grid is centred on the old
    one. Within tolerance the map is used voxel for voxel and its affine keeps its origin and
    directions, with the axes scaled to the requested spacing. A changed file (sha256) raises
    ``ValueError``; a requested class lost by the resampling raises :class:`NoMaskError`.
    """
    from monai.data import NibabelReader
    from monai.transforms import LoadImage, Orientation

    if not Path(entry.label).is_file():
        raise FileNotFoundError(f"label map of mask {entry.case_id} not found: {entry.label}")
    if sha256_file(entry.label) != entry.sha256:
        raise ValueError(f"label map {entry.label} of mask {entry.case_id} changed since the mask database was built (sha256)")
    img = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)(entry.label)
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    where = f"mask {entry.case_id} ({entry.label})"
    return on_query_grid(img, query, where, f"dim {list(entry.dim)}, spacing {list(entry.spacing)}")


def on_query_grid(img, query: MaskQuery, where: str, was: str) -> tuple[np.ndarray, np.ndarray]:
    """A label map (MONAI ``MetaTensor``, channel first, RAS) on the grid of ``query``, as :func:`load_mask` says."""
    import torch
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if _same_grid(img.shape[1:], spacing, query):
        array = img.numpy()[0]
        affine = affine.copy()
        affine[:3, :3] = affine[:3, :3] / spacing * np.asarray(query.spacing)
    else:
        img = Spacing(pixdim=query.spacing, mode="nearest", padding_mode="zeros")(img)
        img = ResizeWithPadOrCrop(spatial_size=query.size, mode="constant", value=0)(img)
        array = img.numpy()[0] if isinstance(img, torch.Tensor) else np.asarray(img)[0]
        affine = np.asarray(img.affine, dtype=np.float64)
    array = np.rint(array).astype(np.uint8)
    if array.shape != query.size:  # pragma: no cover - MONAI guarantees the size
        raise RuntimeError(f"resampled {where} has shape {array.shape}, expected {query.size}")
    present = set(np.unique(array).tolist())
    lost = [a for a in query.anatomy if a not in present]
    if lost:
        names = ", ".join(f"{label_name(a)} ({a})" for a in lost)
        raise NoMaskError(f"{where} lacks {names} on the requested grid (resampled from {was} to size {list(query.size)}, "
                          f"spacing {list(query.spacing)})")  # fmt: skip
    return array, affine


def mask_summary(entry: MaskEntry) -> dict[str, Any]:
    """What a generated case's sidecar records about its map."""
    return {
        "case_id": entry.case_id,
        "path": entry.label,
        "sha256": entry.sha256,
        "dim": list(entry.dim),
        "spacing": list(entry.spacing),
        "top_region": entry.top_region,
        "bottom_region": entry.bottom_region,
        "has_tumour": entry.has_tumour,
    }
