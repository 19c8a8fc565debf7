"""Images from the user's own label maps (``masks: folder``): TotalSegmentator's or another segmenter's maps.

A request names a folder of label maps (``mask_folder``: ``path``, a ``labels`` pattern with ``{case}``,
optionally an ``images`` pattern for the matching CTs, and a ``label_map`` from the segmenter's values to
MAISI classes). Case ``i`` of the request is conditioned on map ``i mod n`` (sorted by case id).

Checked when the workflow starts, from the files' headers: every map's field of view (along the world's x,
y and z, whatever the order its array is stored in) against NVIDIA's recommended one for the request's body
regions (:data:`RECOMMENDED_CT`, the medians of NVIDIA's CT training set, ``docs/inference.md``), refused
with the recommended size and spacing, or a warning (``generate.user_masks.out_of_range``); where NVIDIA
recommends none (head_neck alone) the log says the maps are not checked. When a case is generated: the
map's values (whole numbers, no NaN, all mapping to MAISI classes), and the ``body`` class (200) the
released ControlNet expects on every body voxel without an organ label: where it is missing it is added as
NVIDIA's ``add_body_envelope`` adds it, from the CT (a map without body and without a CT is refused). Map
and CT are first brought onto one grid through their affines: both reoriented to RAS, the map resampled
(nearest neighbour) onto the CT's grid where its orientation, origin, spacing or shape differ; a pair that
does not overlap in the world (:data:`MIN_CT_OVERLAP`) fails its case naming both files. The map is then
put on the request's grid as every other map (:func:`maisi.generate.mask_database.on_query_grid`).
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.io import read_canonical, world_grid
from maisi.core.labels import BODY

__all__ = ["RECOMMENDED_CT", "UserMask", "UserMasks", "recommended_ct", "fov_problem", "find_user_masks", "add_body_envelope", "load_user_masks",
           "check_own_masks_held_out", "MIN_CT_OVERLAP", "on_ct_grid"]

log = logging.getLogger(__name__)

#: NVIDIA's recommended output size and spacing per set of body regions (``docs/inference.md``, "Recommended
#: Spacing for CT": the median pairs of its CT training set; head/pelvis named as the factory's regions).
RECOMMENDED_CT: dict[tuple[str, ...], tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    ("chest", "abdomen"): ((512, 512, 128), (0.781, 0.781, 2.981)),
    ("chest",): ((512, 512, 128), (0.684, 0.684, 2.422)),
    ("chest", "abdomen", "lower_body"): ((512, 512, 256), (0.793, 0.793, 1.826)),
    ("lower_body",): ((512, 512, 384), (0.839, 0.839, 0.728)),
    ("abdomen", "lower_body"): ((512, 512, 384), (0.808, 0.808, 0.729)),
    ("head_neck", "chest", "abdomen"): ((512, 512, 384), (0.977, 0.977, 2.103)),
    ("abdomen",): ((512, 512, 128), (0.723, 0.723, 1.182)),
    ("head_neck", "chest", "abdomen", "lower_body"): ((512, 512, 384), (1.367, 1.367, 4.603)),
    ("head_neck", "chest"): ((512, 512, 128), (0.645, 0.645, 2.219)),
}


#: The share of the box around a map's labelled voxels (its whole box when it labels nothing) that must lie
#: within its CT's field of view for the two to be combined.
MIN_CT_OVERLAP = 0.9


def recommended_ct(top: str, bottom: str) -> tuple[tuple[int, int, int], tuple[float, float, float]] | None:
    """NVIDIA's recommended (size, spacing) for the regions from ``top`` to ``bottom``; None where its table has none."""
    regions = tuple(BODY_REGIONS[BODY_REGIONS.index(top) : BODY_REGIONS.index(bottom) + 1])
    return RECOMMENDED_CT.get(regions)


def fov_problem(dim: Sequence[int], spacing: Sequence[float], top: str, bottom: str, tolerance: float) -> str | None:
    """Why a map's field of view is outside ``tolerance`` (a fraction) of NVIDIA's recommended one, or None."""
    rec = recommended_ct(top, bottom)
    if rec is None:
        return None
    size, rec_spacing = rec
    fov = [n * s for n, s in zip(dim, spacing, strict=True)]
    want = [n * s for n, s in zip(size, rec_spacing, strict=True)]
    off = [axis for axis in range(3) if not (1 - tolerance) * want[axis] <= fov[axis] <= (1 + tolerance) * want[axis]]
    if not off:
        return None
    return (f"field of view {[round(f) for f in fov]} mm is more than {tolerance:.0%} from NVIDIA's recommended "
            f"{[round(w) for w in want]} mm for {top} -> {bottom} (size {list(size)}, spacing {list(rec_spacing)} mm) "
            f"along axis {', '.join(map(str, off))}")  # fmt: skip


@dataclass(frozen=True)
class UserMask:
    """One of the user's maps: its case id, files and grid (from the header)."""

    case_id: str
    label: str
    image: str | None
    dim: tuple[int, int, int]
    spacing: tuple[float, float, float]


def find_user_masks(spec: Mapping[str, Any], where: str) -> list[UserMask]:
    """The maps of a ``mask_folder`` spec, sorted by case id, with their grids; errors name ``where``."""
    import nibabel as nib

    from maisi.core.checks import ConfigError, InputError, check_nifti_spacing

    root = Path(spec["path"])
    if not root.is_dir():
        raise ConfigError(f"config key '{where}.path': folder {root} does not exist")
    pattern = spec.get("labels") or "{case}.nii.gz"
    if "{case}" not in pattern:
        raise ConfigError(f"config key '{where}.labels': pattern must contain '{{case}}'")
    head, _, tail = pattern.partition("{case}")
    regex = re.compile(re.escape(head) + r"(?P<case>[^/]+?)" + re.escape(tail) + "$")
    out = []
    for path in sorted(glob.glob(str(root / pattern.replace("{case}", "*")))):
        m = regex.search(Path(path).relative_to(root).as_posix())
        if not m:
            continue
        case = m.group("case")
        image = str(root / spec["images"].replace("{case}", case)) if spec.get("images") else None
        if image and not Path(image).is_file():
            raise ConfigError(f"config key '{where}.images': the CT of map {case} is not there: {image}")
        try:
            check_nifti_spacing(path)
            header = nib.load(path)
        except InputError as exc:
            raise ConfigError(f"config key '{where}': {exc}") from None
        except Exception as exc:  # nibabel raises many types for foreign files
            raise ConfigError(f"config key '{where}': {path} is not a readable NIfTI label map ({exc})") from None
        if len(header.shape) < 3:
            raise ConfigError(f"config key '{where}': {path} is not a 3-D label map (shape {tuple(header.shape)})")
        dim, spacing = world_grid(header.shape[:3], header.affine)
        out.append(UserMask(case, path, image, dim, spacing))
    if not out:
        raise ConfigError(f"config key '{where}': no label map matches {root / pattern}")
    return out


def add_body_envelope(seg: np.ndarray, ct: np.ndarray, hu_threshold: float = -800.0, seg_has_lung: bool = True) -> np.ndarray:
    """The ``body`` class (200) on every body voxel the map leaves unlabelled, found from the CT as NVIDIA's
    ``add_body_envelope`` finds it: the largest air region below ``hu_threshold`` (closed, 3^3) minus labelled
    voxels is outside; the rest, opened with a 5^3 kernel to its largest part (dropping the bed) and closed
    (3^3), with the labelled voxels, is the body; air inside the body as large as 5 % of it is the table,
    removed (when the map labels the lungs, whose air would otherwise look like it)."""
    from monai.transforms.utils import get_largest_connected_component_mask
    from scipy import ndimage

    from maisi.generate.mask_postprocess import dilate_mask, erode_mask

    if seg.shape != ct.shape:
        raise ValueError(f"label map {seg.shape} and CT {ct.shape} differ in shape")
    labelled = seg > 0
    air = np.asarray(get_largest_connected_component_mask((ct < hu_threshold).astype(np.float32), connectivity=None, num_components=1),
                     dtype=np.float32)  # fmt: skip
    air = erode_mask(dilate_mask(air, 3), 3, pad_value=1.0)
    air[labelled] = 0.0
    body = erode_mask(1.0 - air, 5)
    body = np.asarray(get_largest_connected_component_mask((body > 0.5).astype(np.float32), connectivity=None, num_components=1),
                      dtype=np.float32)  # fmt: skip
    body = dilate_mask(body, 5)
    body = erode_mask(dilate_mask(body, 3), 3, pad_value=1.0)
    body[labelled] = 1.0
    out = seg.copy()
    out[(body > 0.5) & (out == 0)] = BODY
    if seg_has_lung:
        air_body = (out == BODY) & (ct < hu_threshold)
        n_body = int((out == BODY).sum())
        if air_body.any() and n_body:
            components, n = ndimage.label(air_body)
            if n:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                table = np.nonzero(sizes >= 0.05 * n_body)[0]
                if table.size:
                    out[np.isin(components, table)] = 0
    return out.astype(seg.dtype)


_LUNG_LOBES = (28, 29, 30, 31, 32)


def _whole_classes(data: np.ndarray, path: str) -> np.ndarray:
    """A label map's values as int64, refused (naming ``path``) where they are NaN, infinite or fractional."""
    from maisi.core.checks import InputError

    if np.issubdtype(data.dtype, np.floating):
        nan = np.isnan(data)
        if nan.any():
            raise InputError(path, f"NaN in the label map ({int(nan.sum())} voxels); a label map holds whole class numbers")
        if np.isinf(data).any():
            raise InputError(path, f"infinite values in the label map ({int(np.isinf(data).sum())} voxels)")
        fractional = data != np.rint(data)
        if fractional.any():
            shown = ", ".join(f"{v:g}" for v in np.unique(data[fractional])[:5])
            raise InputError(path, f"label map values are not whole numbers ({shown}); was the map resampled with linear "
                                   "interpolation? Label maps are resampled with nearest neighbour")  # fmt: skip
    return np.asarray(data).astype(np.int64)


def _world_box(affine: np.ndarray, lo: Sequence[float], hi: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The world's (RAS, mm) axis-aligned box around voxels ``lo`` to ``hi`` (inclusive), to their outer faces."""
    corners = np.array([[(lo[a] - 0.5, hi[a] + 0.5)[(k >> a) & 1] for a in range(3)] + [1.0] for k in range(8)])
    world = (affine @ corners.T)[:3].T
    return world.min(axis=0), world.max(axis=0)


def _labelled_extent(seg: np.ndarray) -> tuple[list[int], list[int]]:
    """First and last labelled voxel along each axis (the whole array where nothing is labelled)."""
    labelled = seg > 0
    if not labelled.any():
        return [0, 0, 0], [n - 1 for n in seg.shape]
    lo, hi = [], []
    for axis in range(3):
        along = np.flatnonzero(labelled.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(along[0]))
        hi.append(int(along[-1]))
    return lo, hi


def on_ct_grid(
    seg: np.ndarray, seg_affine: np.ndarray, ct_shape: Sequence[int], ct_affine: np.ndarray, label_path: str, ct_path: str
) -> tuple[np.ndarray, bool]:
    """The label map on its CT's grid through their affines (MONAI's ``SpatialResample``, nearest neighbour),
    and whether it had to be resampled (its orientation, origin, spacing or shape differ from the CT's).

    Refused, naming both files, where less than :data:`MIN_CT_OVERLAP` of the box around the map's
    labelled voxels lies within the CT's field of view: the two are not of the same body (a wrong origin
    or a flipped axis in one of the headers)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from maisi.core.checks import InputError

    seg_affine, ct_affine = np.asarray(seg_affine, np.float64), np.asarray(ct_affine, np.float64)
    tol = 1e-3 * max(1.0, float(np.abs(ct_affine[:3, :3]).max()))
    if (tuple(seg.shape) == tuple(ct_shape) and np.allclose(seg_affine[:3, :3], ct_affine[:3, :3], atol=tol)
            and np.allclose(seg_affine[:3, 3], ct_affine[:3, 3], atol=max(tol, 1e-2))):  # fmt: skip
        return seg, False
    lo, hi = _labelled_extent(seg)
    map_lo, map_hi = _world_box(seg_affine, lo, hi)
    ct_lo, ct_hi = _world_box(ct_affine, [0, 0, 0], [n - 1 for n in ct_shape])
    inside = np.clip(np.minimum(map_hi, ct_hi) - np.maximum(map_lo, ct_lo), 0.0, None)
    share = float(np.prod(inside) / np.prod(map_hi - map_lo))
    if share < MIN_CT_OVERLAP:

        def box(lo_: np.ndarray, hi_: np.ndarray) -> str:
            return " x ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(lo_, hi_, strict=True))

        what = "do not overlap" if share == 0 else f"overlap too little ({share:.0%} of the map's labelled part, at least {MIN_CT_OVERLAP:.0%})"
        raise InputError(label_path, f"the label map and its CT {ct_path} {what} in the world: the map's labelled part spans "
                                     f"{box(map_lo, map_hi)} mm, the CT {box(ct_lo, ct_hi)} mm (RAS x, y, z); check the orientation "
                                     "and origin in both headers")  # fmt: skip
    img = MetaTensor(torch.from_numpy(seg.astype(np.float32))[None], affine=torch.as_tensor(seg_affine))
    out = SpatialResample(mode="nearest", padding_mode="zeros")(img, dst_affine=torch.as_tensor(ct_affine), spatial_size=tuple(ct_shape))
    return np.rint(np.asarray(out.detach().cpu().numpy()[0])).astype(seg.dtype), True


@dataclass
class UserMasks:
    """A request's own maps: case ``i`` takes map ``i mod n``."""

    masks: list[UserMask]
    label_map: dict[int, int] | None

    def draw(self, request, index: int) -> tuple[np.ndarray, dict]:
        """Map ``index mod n`` in MAISI ids, with the body added from its CT (on the CT's grid) when missing,
        on the request's grid; a bad map or CT raises :class:`~maisi.core.checks.InputError` naming the files."""
        import torch
        from monai.data import MetaTensor

        from maisi.core.checks import InputError
        from maisi.core.labels import maisi_labels
        from maisi.generate.mask_database import MaskQuery, on_query_grid

        entry = self.masks[index % len(self.masks)]
        data, affine = read_canonical(entry.label, "label map")
        raw = _whole_classes(data, entry.label)
        if self.label_map is not None:
            unknown = sorted({int(v) for v in np.unique(raw)} - set(self.label_map) - {0})
            if unknown:
                raise InputError(entry.label, f"values {unknown[:10]} are not in the label map")
            lut = np.zeros(int(raw.max()) + 1, np.int64)
            for src, dst in self.label_map.items():
                if src <= raw.max():
                    lut[src] = dst
            raw = lut[raw]
        known = set(maisi_labels().values()) | {0}
        foreign = sorted({int(v) for v in np.unique(raw)} - known)
        if foreign:
            raise InputError(entry.label, f"values {foreign[:10]} are not MAISI classes (give the segmenter's label_map)")
        added = resampled = False
        if BODY not in np.unique(raw):
            if entry.image is None:
                raise InputError(entry.label, "has no body class (200), which the ControlNet expects; give the CTs (mask_folder.images) "
                                              "to add it, or add it yourself")  # fmt: skip
            ct_data, ct_affine = read_canonical(entry.image, "CT")
            ct = ct_data.astype(np.float32)
            if not np.isfinite(ct).all():
                raise InputError(entry.image, f"NaN or infinite values in the CT ({int((~np.isfinite(ct)).sum())} voxels)")
            raw, resampled = on_ct_grid(raw, affine, ct.shape, ct_affine, entry.label, entry.image)
            affine = ct_affine
            raw = add_body_envelope(raw, ct, seg_has_lung=bool(np.isin(raw, _LUNG_LOBES).any()))
            added = True
        tensor = MetaTensor(torch.from_numpy(raw.astype(np.float32))[None], affine=torch.as_tensor(affine, dtype=torch.float64))  # RAS
        query = MaskQuery(request.size, request.spacing, anatomy=request.anatomy)
        array, _ = on_query_grid(tensor, query, f"label map {entry.label}", f"dim {list(entry.dim)}, spacing {list(entry.spacing)}")
        record = {"case_id": f"folder/{entry.case_id}", "path": entry.label, "dim": list(entry.dim), "spacing": list(entry.spacing),
                  "body_added": added, "resampled_to_ct": resampled, "image": entry.image}  # fmt: skip
        return array, record


def load_user_masks(spec: Mapping[str, Any], where: str) -> tuple[UserMasks, str]:
    """A request's own maps and a sha256 over all of them (part of each case's fingerprint)."""
    import hashlib

    from maisi.core.io import sha256_file
    from maisi.sources.cases import resolve_label_map

    masks = find_user_masks(spec, where)
    digest = hashlib.sha256("".join(f"{m.label}:{sha256_file(m.label)};" for m in masks).encode()).hexdigest()
    return UserMasks(masks, resolve_label_map(spec.get("label_map"), f"{where}.label_map")), digest


def check_own_masks_held_out(masks: Sequence[UserMask], held_out: Any, where: str) -> None:
    """Refuse (:class:`maisi.core.holdout.HeldOutLeak`) a request's own maps (``masks``, as :func:`find_user_masks`
    found them) when one is a held-out case's label map (``held_out``: the held-out rows of the prepared case table, a
    ``DataFrame``), renamed, saved again or resampled: the check every map on its way into generation passes
    (:func:`maisi.core.holdout.check_held_out_label_maps`); ``where`` (the request's config key) starts the message."""
    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    check_held_out_label_maps([LabelMapRef(f"own label map {m.case_id}", m.label) for m in masks], held_out, where)
