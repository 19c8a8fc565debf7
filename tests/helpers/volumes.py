"""Small synthetic volumes written as NIfTI or a DICOM series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from maisi.evaluate.qc import ORGAN_GROUPS

LUNG, BONE, LIVER = ORGAN_GROUPS["lung"][0], ORGAN_GROUPS["bone"][0], ORGAN_GROUPS["liver"][0]


def write_nifti(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 3.0), affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def ct_volume(shape=(40, 36, 20), seed=0) -> np.ndarray:
    """A small CT-like volume: air around a soft-tissue ellipsoid with a bony core."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = x**2 + y**2 < 0.7
    vol[body] = 40.0
    vol[(x**2 + (y + 0.3) ** 2) < 0.04] = 700.0
    vol += rng.normal(0, 5, shape).astype(np.float32)
    return vol.astype(np.int16)


def write_dicom_series(folder: Path, vol: np.ndarray, spacing=(1.5, 1.5, 3.0)) -> Path:
    """Write ``vol`` (x, y, z) as a CT DICOM series, one file per slice, with SimpleITK."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(np.int16))
    img.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for z in range(img.GetDepth()):
        sl = img[:, :, z]
        origin = "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z))))
        tags = {
            "0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0020|0032": origin,
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(z + 1), "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]), "0028|1052": "0", "0028|1053": "1", "0008|0018": f"{uid}.3.{z}",
        }  # fmt: skip
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(sl)
    return folder


def organ_body(seed: int, shape=(32, 32, 32), liver_hu: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """A body (soft tissue) with two lungs, a liver and a spine whose sizes and positions vary with the seed: (HU, MAISI ids)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.uniform(-0.1, 0.1, 3)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = ((x - c[0]) / 0.8) ** 2 + ((y - c[1]) / 0.6) ** 2 < 1
    hu[body], label[body] = 30.0 + rng.normal(0, 10, int(body.sum())), 200
    r = rng.uniform(0.22, 0.3)
    for side in (-0.4, 0.4):
        lung = body & (((x - c[0] - side) / r) ** 2 + ((y - c[1]) / 0.3) ** 2 + ((z - 0.3) / 0.5) ** 2 < 1)
        hu[lung], label[lung] = -850.0 + rng.normal(0, 20, int(lung.sum())), LUNG
    liver = body & (((x - c[0] + 0.3) / 0.35) ** 2 + ((y - c[1]) / 0.3) ** 2 + ((z + 0.4) / 0.3) ** 2 < 1)
    hu[liver], label[liver] = liver_hu, LIVER
    spine = body & (((x - c[0]) / 0.12) ** 2 + ((y - c[1] + 0.4) / 0.12) ** 2 < 1)
    hu[spine], label[spine] = 500.0, BONE
    return hu, label
