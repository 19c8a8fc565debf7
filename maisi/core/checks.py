"""Checks of input scans: every problem is an :class:`InputError` that names the file."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

__all__ = [
    "InputError",
    "SPACING_RANGE",
    "check_ct_image",
    "check_label_matches",
    "check_spacing",
    "spacing_from_affine",
    "check_nifti_spacing",
    "ConfigError",
]


class InputError(ValueError):
    """A case's input is unusable; ``path`` names the file and ``problem`` says why."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = str(path) if path is not None else ""
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each array axis: the column norms of the affine's 3x3 part."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def check_ct_image(array: np.ndarray, affine: np.ndarray, path, ct_check: Mapping[str, float]) -> None:
    """Reject images that are not usable 3-D CT volumes in Hounsfield units.

    ``array`` is channel-first (C, X, Y, Z). Checks: one channel; three spatial axes of more
    than one voxel; finite values; spacing present, finite and positive; an intensity range
    that looks like HU (air below ``min_below`` and no value outside ``[min_value, max_value]``).
    """
    if array.ndim != 4:
        raise InputError(path, f"expected a 3-D volume, got an array of {array.ndim - 1} spatial dimensions")
    if array.shape[0] != 1:
        raise InputError(path, f"expected one channel, got {array.shape[0]} (multi-channel or 4-D image?)")
    spatial = array.shape[1:]
    if min(spatial) < 2:
        raise InputError(path, f"2-D image (shape {tuple(spatial)}); a CT volume needs three axes of more than one voxel")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(path, f"{bad} voxel(s) are NaN or infinite")
    check_spacing(spacing_from_affine(affine), path, "the image's affine (from its header; DICOM: PixelSpacing and the slice positions)")
    lo, hi = float(array.min()), float(array.max())
    if lo < ct_check["min_value"] or hi > ct_check["max_value"]:
        raise InputError(
            path,
            f"intensities {lo:g}..{hi:g} outside [{ct_check['min_value']:g}, {ct_check['max_value']:g}]: "
            "not CT in Hounsfield units",
        )
    if lo >= ct_check["min_below"]:
        raise InputError(
            path,
            f"minimum intensity {lo:g} is not below {ct_check['min_below']:g} HU: no air in the image, so this does "
            "not look like CT in Hounsfield units (another modality, or raw values without rescale slope/intercept?)",
        )


def check_label_matches(label: np.ndarray, label_affine, image: np.ndarray, image_affine, label_path, image_path) -> None:
    """The label map must be 3-D, on the image's grid (same shape and affine) and hold non-negative integers.

    Values above 255 (other segmenters' outputs) are allowed here: the source's ``label_map`` maps them to MAISI ids.
    """
    if label.shape[1:] != image.shape[1:]:
        raise InputError(
            label_path,
            f"label shape {tuple(label.shape[1:])} differs from image shape {tuple(image.shape[1:])} of {image_path}",
        )
    la, ia = np.asarray(label_affine, dtype=np.float64), np.asarray(image_affine, dtype=np.float64)
    tol = 1e-3 * max(1.0, float(np.abs(ia[:3, :3]).max()))
    if not np.allclose(la[:3, :3], ia[:3, :3], atol=tol) or not np.allclose(la[:3, 3], ia[:3, 3], atol=max(tol, 1e-2)):
        raise InputError(
            label_path, f"label affine differs from the affine of {image_path}:\n{np.round(la, 4)}\nvs\n{np.round(ia, 4)}"
        )
    if not np.isfinite(label).all():
        raise InputError(label_path, "label map holds NaN or infinite values")
    if not np.array_equal(label, np.round(label)):
        raise InputError(label_path, "label map holds non-integer values")
    if label.min() < 0:
        raise InputError(label_path, f"label map holds negative values (minimum {label.min():g})")


#: Voxel spacings outside this range (mm) are header errors, not CT: 10 µm to 100 mm.
SPACING_RANGE = (0.01, 100.0)


def check_spacing(spacing, path, where: str = "the header") -> None:
    """Spacing (mm per axis) must be finite and within :data:`SPACING_RANGE`; ``where`` names the header field."""
    spacing = np.asarray(spacing, dtype=np.float64)
    lo, hi = SPACING_RANGE
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            path,
            f"missing or zero voxel spacing {np.round(spacing, 6).tolist()} in {where} (each axis needs a finite spacing above 0)",
        )
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise InputError(path, f"voxel spacing {np.round(spacing, 6).tolist()} mm in {where} is outside [{lo:g}, {hi:g}] mm")


def check_nifti_spacing(path) -> None:
    """Reject a NIfTI whose header gives no usable spacing, in whichever field defines it.

    nibabel silently replaces zero ``pixdim`` values by 1 mm when it loads a file, so a scan
    without spacing would otherwise be prepared at a made-up resolution. The raw header is read
    here without that fix. The spacing is the sform's column norms where ``sform_code > 0``, else
    ``pixdim`` (which is also the qform's scaling where ``qform_code > 0``).
    """
    import gzip

    import nibabel as nib

    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            hdr = nib.Nifti1Header.from_fileobj(fh, check=False)
    except Exception as exc:
        raise InputError(path, f"cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc
    if int(hdr["sform_code"]) > 0:
        srow = np.stack([hdr["srow_x"], hdr["srow_y"], hdr["srow_z"]]).astype(np.float64)
        check_spacing(np.sqrt((srow[:, :3] ** 2).sum(axis=0)), path, "the header's sform (srow_x/y/z)")
        return
    field = "the header's pixdim (the qform's scaling)" if int(hdr["qform_code"]) > 0 else "the header's pixdim (no sform/qform)"
    check_spacing(np.asarray(hdr["pixdim"][1:4], dtype=np.float64), path, field)


class ConfigError(ValueError):
    """A configuration error; the message names the offending key."""
