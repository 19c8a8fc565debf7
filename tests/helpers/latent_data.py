"""Tiny synthetic latent datasets (cached-latent ``.npz`` files and label maps) for the training tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

#: (channels, x, y, z) of a test latent; its label map is 4x larger per spatial axis.
LATENT = (4, 12, 10, 8)


def write_latent(
    folder: Path,
    case_id: str,
    mu: np.ndarray,
    sigma: np.ndarray,
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    top: Sequence[int] = (0, 1, 0, 0),
    bottom: Sequence[int] = (0, 0, 1, 0),
) -> Path:
    """A cached latent as ``cache_latents`` writes it (posterior mean and spread, spacing, body regions)."""
    path = folder / f"{case_id}.npz"
    dim = np.array([4 * n for n in mu.shape[1:]])
    np.savez(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), affine=np.diag([*spacing, 1.0]), dim=dim,
             spacing=np.array(spacing), top_region_index=np.array(top), bottom_region_index=np.array(bottom))  # fmt: skip
    return path


def label_map(index: int, tumour: bool, latent: Sequence[int] = LATENT) -> np.ndarray:
    """A uint8 label map 4x the latent size: body, liver, another organ and (``tumour``) a lung tumour (23)."""
    label = np.zeros(tuple(4 * n for n in latent[1:]), np.uint8)
    label[4:44, 4:36, 2:30] = 200
    label[10:30, 8:24, 6:20] = 1
    label[30:40, 20:34, 10:26] = 3 + index
    if tumour:
        label[14:22, 10:18, 8:16] = 23
    return label


def latent_dataset(folder: Path, case_ids: Sequence[str], seed: int = 0, tumours: Sequence[str] = ()) -> list[dict[str, str]]:
    """Records (``case_id``, ``latent``, ``label``) of random latents with label maps; cases in ``tumours`` hold a tumour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i, case_id in enumerate(case_ids):
        mu, sigma = rng.normal(0, 2.0, LATENT), rng.uniform(0.01, 0.1, LATENT)
        latent = write_latent(folder, case_id, mu, sigma, spacing=(1.0 + i, 1.5, 2.0), top=np.eye(4, dtype=int)[i % 4])
        label = folder / f"{case_id}_label.nii.gz"
        nib.save(nib.Nifti1Image(label_map(i, case_id in tumours), np.eye(4)), str(label))
        records.append({"case_id": case_id, "latent": str(latent), "label": str(label)})
    return records
