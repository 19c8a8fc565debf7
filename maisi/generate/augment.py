"""Label-map augmentation before ControlNet-conditioned generation: MAISI's and GEM-3D's.

MAISI varies the database maps it conditions on: each tumour is deformed elastically and kept
only when the deformed tumour still lies (mostly) inside its host organ, bone lesions get a small
random affine and stay inside bone, and the whole body may be zoomed slightly. GEM-3D adds
whole-map flips, rotations and translations (off by default); a left-right flip swaps the paired
left/right classes so that, say, the left kidney keeps its label on the left side.

:func:`augment_mask` is deterministic for a seed: every random draw comes from
``numpy.random.default_rng(seed)``, which also seeds the MONAI transforms. It returns the map and
a record of every step with the parameters drawn, for the generated case's sidecar.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from maisi.core.labels import label_name, maisi_labels, remove_tumours
from maisi.core.schema import schema_default
from maisi.core.settings import ConfigSettings
from maisi.generate.mask_database import BONE_LESION, TUMOUR_LABELS

__all__ = ["AugmentSettings", "HOST_ORGANS", "TUMOUR_ELASTIC", "BONE_AFFINE", "lr_swap_table", "bone_labels", "augment_mask", "remove_tumours"]

#: Host organ(s) of each tumour class: a deformed tumour must stay mostly inside them.
HOST_ORGANS: dict[int, tuple[int, ...]] = {
    23: (28, 29, 30, 31, 32),  # lung tumor -> the five lung lobes
    24: (4,),  # pancreatic tumor -> pancreas
    26: (1,),  # hepatic tumor -> liver
    27: (62,),  # colon cancer primaries -> colon
    129: (5, 14),  # kidney mass -> right and left kidney
}


#: MAISI's elastic deformation of tumours (``Rand3DElastic``; translations in voxels, angles in radians).
TUMOUR_ELASTIC: dict[str, Any] = {
    "sigma_range": (5.0, 8.0),
    "magnitude_range": (100.0, 200.0),
    "translate_range": (10.0, 10.0, 10.0),
    "rotate_range": (math.pi / 36,) * 3,
    "scale_range": (0.2, 0.2, 0.2),
}


#: The small random affine of bone lesions: rotation <= 10 degrees, scale 0.9-1.1, translation <= 2 voxels.
BONE_AFFINE: dict[str, Any] = {
    "rotate_range": (math.radians(10.0),) * 3,
    "scale_range": (0.1, 0.1, 0.1),
    "translate_range": (2.0, 2.0, 2.0),
}


_BONE_WORDS = (
    "vertebrae", "rib", "hip", "femur", "sacrum", "skull", "sternum", "clavicula", "scapula", "humerus", "costal cartilages",
)  # fmt: skip


@dataclass(frozen=True)
class AugmentSettings(ConfigSettings):
    """What :func:`augment_mask` does.

    ``tumour_inside_fraction``: share of a deformed tumour that must lie inside its host organ
    (MAISI keeps 80-85 %). ``body_zoom``: range of the isotropic zoom of the whole map, skipped at
    ``(1, 1)``. ``flip_prob``: probability of flipping along each axis of ``flip_axes`` (RAS: 0 is
    left-right, the only axis by default since the others turn the body over); ``rotate_degrees``:
    largest rotation about the z axis; ``translate_voxels``: largest shift per axis (GEM-3D, all off
    by default). ``max_attempts``: draws per tumour before its original shape is kept.
    """

    enabled: bool = schema_default("generate.augment.enabled")
    tumour_elastic: bool = schema_default("generate.augment.tumour_elastic")
    tumour_inside_fraction: float = schema_default("generate.augment.tumour_inside_fraction")
    bone_lesion_affine: bool = schema_default("generate.augment.bone_lesion_affine")
    body_zoom: tuple[float, float] = schema_default("generate.augment.body_zoom")
    flip_prob: float = schema_default("generate.augment.flip_prob")
    flip_axes: tuple[int, ...] = schema_default("generate.augment.flip_axes")
    rotate_degrees: float = schema_default("generate.augment.rotate_degrees")
    translate_voxels: int = schema_default("generate.augment.translate_voxels")
    max_attempts: int = schema_default("generate.augment.max_attempts")

    SECTION: ClassVar[str] = "generate.augment"

    def __post_init__(self) -> None:
        object.__setattr__(self, "body_zoom", tuple(float(v) for v in self.body_zoom))
        object.__setattr__(self, "flip_axes", tuple(sorted({int(a) for a in self.flip_axes})))
        super().__post_init__()
        if not self.body_zoom[0] <= self.body_zoom[1]:
            raise ValueError(f"body_zoom must be [low, high] with low <= high, got {list(self.body_zoom)}")


@functools.lru_cache(maxsize=1)
def _swap_pairs() -> tuple[tuple[int, int], ...]:
    labels = maisi_labels()
    pairs = []
    for name, idx in labels.items():
        words = name.split()
        if "left" in words:
            other = " ".join("right" if w == "left" else w for w in words)
            if other in labels:
                pairs.append((idx, labels[other]))
    return tuple(sorted(pairs))


def lr_swap_table() -> dict[int, int]:
    """Left/right class pairs of the MAISI dictionary, both ways (``left kidney`` <-> ``right kidney``).

    Classes named with "left" or "right" but without a counterpart (``left atrial appendage``,
    ``right lung middle lobe``) are not in the table and keep their id when flipped.
    """
    table: dict[int, int] = {}
    for left, right in _swap_pairs():
        table[left] = right
        table[right] = left
    return table


@functools.lru_cache(maxsize=1)
def bone_labels() -> tuple[int, ...]:
    """Ids of the bone classes (vertebrae, ribs, hips, femurs, sacrum, skull, ...), bone lesion excluded."""
    return tuple(
        sorted(idx for name, idx in maisi_labels().items() if idx != BONE_LESION and any(w in name for w in _BONE_WORDS))
    )


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n)) for i, n in zip(idx, mask.shape, strict=True)
    )


def _nearest_fill(volume: np.ndarray, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Labels of the ``source`` voxels of ``volume`` nearest to each ``target`` voxel."""
    _, idx = ndimage.distance_transform_edt(~source, return_indices=True)
    return volume[tuple(i[target] for i in idx)]


def _revert(out: np.ndarray, sl: tuple[slice, ...], old: np.ndarray, host_ids: Sequence[int]) -> None:
    """Give the ``old`` voxels of ``out[sl]`` the label of the nearest voxel of a ``host_ids`` class."""
    sub = out[sl]
    source = np.isin(sub, host_ids) & ~old
    if source.any():
        sub[old] = _nearest_fill(sub, old, source)
        return
    full_old = np.zeros(out.shape, bool)
    full_old[sl] = old
    source = np.isin(out, host_ids) & ~full_old
    if source.any():
        sub[old] = _nearest_fill(out, full_old, source)
    else:
        sub[old] = host_ids[0]


def _run(transform, mask: np.ndarray) -> np.ndarray:
    import torch

    img = torch.from_numpy(mask[None].astype(np.float32))
    return np.asarray(transform(img))[0] > 0.5


def _grid_params(grid) -> dict[str, list[float]]:
    return {
        key: [round(float(v), 6) for v in getattr(grid, f"{key}_params")]
        for key in ("rotate", "scale", "translate")
        if getattr(grid, f"{key}_params", None) is not None
    }


def _tumour_step(out: np.ndarray, tumour: int, settings: AugmentSettings, rng: np.random.Generator) -> dict[str, Any]:
    from monai.transforms import Rand3DElastic

    record: dict[str, Any] = {"step": "tumour_elastic", "label": tumour, "name": label_name(tumour)}
    host_ids = [h for h in HOST_ORGANS[tumour] if np.any(out == h)]
    if not host_ids:
        return {**record, "applied": False, "reason": "host organ absent"}
    full = out == tumour
    margin = int(max(TUMOUR_ELASTIC["translate_range"])) + 6
    extent = max(s.stop - s.start for s in _bbox(full, 0))
    sl = _bbox(full, margin + int(math.ceil(extent * max(TUMOUR_ELASTIC["scale_range"]) / 2)))
    sub = out[sl]
    old = sub == tumour
    host = np.isin(sub, host_ids) | old
    body = sub > 0
    n = int(old.sum())
    elastic = Rand3DElastic(prob=1.0, mode="nearest", padding_mode="zeros", **TUMOUR_ELASTIC)
    record.update(host=host_ids, voxels_before=n, crop=[[s.start, s.stop] for s in sl])
    for attempt in range(1, int(settings.max_attempts) + 1):
        seed = _seed(rng)
        elastic.set_random_state(seed=seed)
        new = _run(elastic, old)
        total = int(new.sum())
        inside = int((new & host).sum())
        if total > 0 and inside >= settings.tumour_inside_fraction * total:
            _revert(out, sl, old, host_ids)
            placed = new & body
            sub[placed] = tumour
            params = _grid_params(elastic.rand_affine_grid)
            params.update(sigma=round(float(elastic.sigma), 6), magnitude=round(float(elastic.magnitude), 6))
            return {
                **record,
                "applied": True,
                "attempts": attempt,
                "seed": seed,
                "params": params,
                "voxels_after": int(placed.sum()),
                "inside_fraction": round(inside / total, 6),
            }
    return {**record, "applied": False, "attempts": int(settings.max_attempts), "reason": "no draw stayed inside the host organ"}


def _bone_step(out: np.ndarray, settings: AugmentSettings, rng: np.random.Generator) -> dict[str, Any]:
    from monai.transforms import RandAffine

    record: dict[str, Any] = {"step": "bone_lesion_affine", "label": BONE_LESION, "name": label_name(BONE_LESION)}
    bones = [b for b in bone_labels() if np.any(out == b)]
    if not bones:
        return {**record, "applied": False, "reason": "no bone class in the map"}
    full = out == BONE_LESION
    extent = max(s.stop - s.start for s in _bbox(full, 0))
    sl = _bbox(full, int(max(BONE_AFFINE["translate_range"])) + 2 + int(math.ceil(extent * 0.1)))
    sub = out[sl]
    old = sub == BONE_LESION
    host = np.isin(sub, bones) | old
    n = int(old.sum())
    affine = RandAffine(prob=1.0, mode="nearest", padding_mode="zeros", **BONE_AFFINE)
    record.update(voxels_before=n, crop=[[s.start, s.stop] for s in sl])
    for attempt in range(1, int(settings.max_attempts) + 1):
        seed = _seed(rng)
        affine.set_random_state(seed=seed)
        new = _run(affine, old) & host
        if new.sum() >= settings.tumour_inside_fraction * n:
            _revert(out, sl, old, bones)
            sub[new] = BONE_LESION
            return {
                **record,
                "applied": True,
                "attempts": attempt,
                "seed": seed,
                "params": _grid_params(affine.rand_affine_grid),
                "voxels_after": int(new.sum()),
            }
    return {**record, "applied": False, "attempts": int(settings.max_attempts), "reason": "no draw stayed inside bone"}


def _zoom(out: np.ndarray, factor: float) -> np.ndarray:
    import torch
    from monai.transforms import Zoom

    img = torch.from_numpy(out[None].astype(np.float32))
    zoomed = Zoom(zoom=factor, mode="nearest-exact", keep_size=True, padding_mode="constant", value=0)(img)
    return np.rint(np.asarray(zoomed)[0]).astype(np.uint8)


def _rotate_z(out: np.ndarray, degrees: float) -> np.ndarray:
    import torch
    from monai.transforms import Rotate

    img = torch.from_numpy(out[None].astype(np.float32))
    rotated = Rotate(angle=(0.0, 0.0, math.radians(degrees)), keep_size=True, mode="nearest", padding_mode="zeros")(img)
    return np.rint(np.asarray(rotated)[0]).astype(np.uint8)


def _shift(out: np.ndarray, shifts: Sequence[int]) -> np.ndarray:
    res = np.zeros_like(out)
    src, dst = [], []
    for s, n in zip(shifts, out.shape, strict=True):
        s = int(s)
        src.append(slice(max(-s, 0), n - max(s, 0)))
        dst.append(slice(max(s, 0), n - max(-s, 0)))
    res[tuple(dst)] = out[tuple(src)]
    return res


def augment_mask(label: np.ndarray, settings: AugmentSettings, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Augment a 3-D uint8 MAISI label map (RAS axes); returns the new map and the record of the steps.

    Steps, in order: (1) each tumour class but bone lesions is deformed elastically on its bounding
    box plus a margin and kept when at least ``tumour_inside_fraction`` of it lies inside its host
    organ (:data:`HOST_ORGANS`; up to ``max_attempts`` draws, else the original is kept); the old
    tumour voxels take the label of the nearest host voxel, the new ones overwrite body voxels only.
    (2) bone lesions get a small random affine, are cut to bone and kept when they keep
    ``tumour_inside_fraction`` of their size; the old lesion voxels take the nearest bone label.
    (3) the whole map is zoomed by a factor drawn from ``body_zoom`` (centred, same shape).
    (4) GEM-3D flips (a left-right flip swaps the :func:`lr_swap_table` classes), a rotation about
    the z axis and a translation with zero padding. All resampling is nearest neighbour, so the
    result holds only classes of the input (and their left/right counterparts).
    """
    arr = np.asarray(label)
    if arr.ndim != 3:
        raise ValueError(f"label map must be 3-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label map must hold integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("label map values must lie in 0..255")
    out = arr.astype(np.uint8, copy=True)
    record: dict[str, Any] = {"seed": int(seed), "enabled": bool(settings.enabled), "steps": []}
    if not settings.enabled:
        return out, record
    rng = np.random.default_rng(seed)
    steps = record["steps"]

    present = set(np.unique(out).tolist())
    if settings.tumour_elastic:
        for tumour in TUMOUR_LABELS:
            if tumour != BONE_LESION and tumour in present:
                steps.append(_tumour_step(out, tumour, settings, rng))
    if settings.bone_lesion_affine and BONE_LESION in present:
        steps.append(_bone_step(out, settings, rng))

    lo, hi = settings.body_zoom
    if (lo, hi) != (1.0, 1.0):
        factor = float(rng.uniform(lo, hi)) if hi > lo else lo
        out = _zoom(out, factor)
        steps.append({"step": "body_zoom", "applied": True, "factor": round(factor, 6)})

    if settings.flip_prob > 0:
        flipped = [a for a in settings.flip_axes if rng.random() < settings.flip_prob]
        for axis in flipped:
            out = np.flip(out, axis=axis)
            if axis == 0:
                lut = np.arange(256, dtype=np.uint8)
                for a, b in lr_swap_table().items():
                    lut[a] = b
                out = lut[out]
        out = np.ascontiguousarray(out)
        steps.append({"step": "flip", "applied": bool(flipped), "axes": flipped, "lr_swapped": 0 in flipped})
    if settings.rotate_degrees > 0:
        degrees = float(rng.uniform(-settings.rotate_degrees, settings.rotate_degrees))
        out = _rotate_z(out, degrees)
        steps.append({"step": "rotate_z", "applied": True, "degrees": round(degrees, 6)})
    if settings.translate_voxels > 0:
        t = int(settings.translate_voxels)
        shifts = [int(v) for v in rng.integers(-t, t + 1, size=3)]
        out = _shift(out, shifts)
        steps.append({"step": "translate", "applied": any(shifts), "voxels": shifts})
    return out, record
