"""A phantom case as arrays and NIfTI files: its grid, HU image, label map and spec sidecar."""

from __future__ import annotations

import dataclasses
import math
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.io import save_nifti
from maisi.core.seeds import derive_seed
from maisi.sources.phantom.body import Canvas, Phantom, smooth_noise
from maisi.sources.phantom.spec import HU_MAX, HU_MIN, PhantomSpec, fat_factor, fov_z

__all__ = ["generate_phantom", "phantom_affine", "write_phantom_case"]

def phantom_affine(spec: PhantomSpec) -> np.ndarray:
    """RAS+ world affine of the stored array of ``spec`` (flips compensated)."""
    sx, sy, sz = (float(s) for s in spec.spacing)
    nx, ny, nz = spec.shape
    z_top = fov_z(spec.top_region, spec.bottom_region)[0] * float(spec.body_scale[2])
    canonical = np.array(
        [
            [sx, 0.0, 0.0, -(nx - 1) / 2.0 * sx],
            [0.0, sy, 0.0, -(ny - 1) / 2.0 * sy],
            [0.0, 0.0, sz, z_top - (nz - 1) * sz],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    flip = np.eye(4)
    for ax, (f, n) in enumerate(zip(spec.flip, spec.shape, strict=True)):
        if f:
            flip[ax, ax] = -1.0
            flip[ax, 3] = n - 1
    return canonical @ flip


def _check_spec(spec: PhantomSpec) -> None:
    for name in ("top_region", "bottom_region"):
        if getattr(spec, name) not in BODY_REGIONS:
            raise ValueError(f"{spec.case_id}: {name} {getattr(spec, name)!r} is not one of {', '.join(BODY_REGIONS)}")
    if BODY_REGIONS.index(spec.top_region) > BODY_REGIONS.index(spec.bottom_region):
        raise ValueError(f"{spec.case_id}: top region {spec.top_region!r} lies below bottom region {spec.bottom_region!r}")
    if len(spec.shape) != 3 or min(spec.shape) < 1:
        raise ValueError(f"{spec.case_id}: invalid shape {spec.shape}")
    if len(spec.spacing) != 3 or min(spec.spacing) <= 0:
        raise ValueError(f"{spec.case_id}: invalid spacing {spec.spacing}")


def generate_phantom(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one case: ``(hu int16 (X,Y,Z), label uint8 (X,Y,Z), 4x4 RAS+ affine in mm)``.

    The arrays are stored with ``spec.flip`` applied; the affine maps them to world positions
    that do not depend on the flips.
    """
    _check_spec(spec)
    sx, sy, sz = (float(s) for s in spec.spacing)
    nx, ny, nz = (int(n) for n in spec.shape)
    lat, ap, height = (float(s) for s in spec.body_scale)
    rng = np.random.default_rng(derive_seed(spec.seed, "anatomy"))
    noise_rng = np.random.default_rng(derive_seed(spec.seed, "noise"))
    affine = phantom_affine(spec)
    canonical = phantom_affine(dataclasses.replace(spec, flip=(False, False, False)))
    # body position in the field of view (patients are seldom centred exactly)
    off_x, off_y = float(rng.uniform(-8, 8)), float(rng.uniform(-12, 12))
    wx = canonical[0, 3] + sx * np.arange(nx)
    wy = canonical[1, 3] + sy * np.arange(ny)
    wz = canonical[2, 3] + sz * np.arange(nz)
    cv = Canvas((wx - off_x) / lat, (wy - off_y) / ap, wz / height, (sx / lat, sy / ap, sz / height))
    cv.tex["lo"] = smooth_noise(noise_rng, cv.shape, spec.spacing, 14.0)
    cv.tex["hi"] = smooth_noise(noise_rng, cv.shape, spec.spacing, 5.0)
    Phantom(cv, rng, fat_factor(spec.body_scale)).build()
    # partial volume and slightly correlated noise: blur (image + white noise) once
    sigma = 0.55
    delta = np.zeros(9)
    delta[4] = 1.0
    w = ndimage.gaussian_filter1d(delta, sigma)
    gain = 1.0 / math.sqrt(float(np.sum(w**2)) ** 3)
    hu = cv.hu
    noise = float(spec.noise_hu)
    if noise > 0:
        hu += noise_rng.standard_normal(cv.shape, dtype=np.float32) * np.float32(noise * gain)
    hu = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    hu = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    label = cv.label
    axes = tuple(ax for ax, f in enumerate(spec.flip) if f)
    if axes:
        hu = np.flip(hu, axes)
        label = np.flip(label, axes)
    return np.ascontiguousarray(hu), np.ascontiguousarray(label), affine


def write_phantom_case(spec: PhantomSpec, image_path: str | os.PathLike, label_path: str | os.PathLike) -> dict:
    """Generate ``spec`` and write its image (int16 HU) and label (uint8) NIfTI files atomically.

    Returns a small metadata dict: case id, seed, shape, spacing, regions, orientation and the
    label ids present.
    """
    hu, label, affine = generate_phantom(spec)
    save_nifti(hu, affine, image_path, np.int16)
    save_nifti(label, affine, label_path, np.uint8)
    return {
        "case_id": spec.case_id,
        "seed": int(spec.seed),
        "shape": [int(n) for n in hu.shape],
        "spacing": [float(s) for s in spec.spacing],
        "top_region": spec.top_region,
        "bottom_region": spec.bottom_region,
        "orientation": "".join(nib.aff2axcodes(affine)),
        "label_ids": [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256))],
    }
