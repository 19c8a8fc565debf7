"""Synthetic label maps and case-table rows for the mask database and generation tests."""

from __future__ import annotations

import json

import numpy as np

from maisi.core.io import save_nifti
from maisi.generate.mask_database import BONE_LESION

LIVER, HEPATIC_TUMOUR, LUNG, VERTEBRA, BODY = 1, 26, 28, 37, 200
RIGHT_KIDNEY, LEFT_KIDNEY, BLADDER = 5, 14, 15

COLUMNS = (
    "source", "case_id", "fold", "image", "image_hu", "label", "dim", "spacing", "orig_dim", "orig_spacing",
    "top_region", "bottom_region", "region_backend", "label_source", "labels_present",
)  # fmt: skip


def _grid(n: int):
    return np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")


def phantom(n: int = 48, tumour: bool = True, lesion: bool = True) -> np.ndarray:
    """Body with a liver (hepatic tumour inside), a lung lobe, a vertebra (bone lesion inside) and kidneys."""
    x, y, z = _grid(n)
    lab = np.zeros((n, n, n), np.uint8)
    lab[x**2 + y**2 < (0.45 * n) ** 2] = BODY
    lab[(x - 0.1 * n) ** 2 + y**2 + (z + 0.15 * n) ** 2 < (0.22 * n) ** 2] = LIVER
    if tumour:
        lab[(x - 0.1 * n) ** 2 + y**2 + (z + 0.15 * n) ** 2 < (0.07 * n) ** 2] = HEPATIC_TUMOUR
    lab[(x + 0.2 * n) ** 2 + (y - 0.1 * n) ** 2 + (z - 0.25 * n) ** 2 < (0.15 * n) ** 2] = LUNG
    lab[(np.abs(x) < 0.08 * n) & (np.abs(y + 0.3 * n) < 0.08 * n) & (np.abs(z) < 0.3 * n)] = VERTEBRA
    if lesion:
        lab[x**2 + (y + 0.3 * n) ** 2 + z**2 < (0.05 * n) ** 2] = BONE_LESION
    lab[(np.abs(x + 0.3 * n) < 0.05 * n) & (np.abs(y + 0.1 * n) < 0.05 * n) & (np.abs(z + 0.3 * n) < 0.1 * n)] = RIGHT_KIDNEY
    lab[(np.abs(x - 0.3 * n) < 0.05 * n) & (np.abs(y + 0.1 * n) < 0.05 * n) & (np.abs(z + 0.3 * n) < 0.1 * n)] = LEFT_KIDNEY
    return lab


def mask_affine(spacing, origin=(-20.0, 10.0, 100.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def mask_row(tmp_path, case_id, lab, spacing, top, bottom, labels_present=True) -> dict[str, str]:
    """A case-table row for ``lab`` (saved under ``tmp_path/labels``; None: a case without a label map)."""
    path = tmp_path / "labels" / f"{case_id}.nii.gz"
    if lab is not None:
        save_nifti(lab, mask_affine(spacing), path, np.uint8)
    present = sorted(int(v) for v in np.unique(lab) if v) if lab is not None else []
    row = dict.fromkeys(COLUMNS, "")
    row.update(
        source="src",
        case_id=case_id,
        fold="0",
        image=str(tmp_path / "images" / f"{case_id}.nii.gz"),
        label=str(path) if lab is not None else "",
        dim=json.dumps(list(lab.shape)) if lab is not None else "[32, 32, 32]",
        spacing=json.dumps(list(spacing)),
        top_region=top,
        bottom_region=bottom,
        labels_present=json.dumps(present) if labels_present and lab is not None else "",
    )
    return row
