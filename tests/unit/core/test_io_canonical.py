"""Reading a volume with its axes in RAS order, and a grid along the world's axes (maisi.core.io), shared by every
stage that reads label maps from elsewhere (the held-out check, the user's own maps)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from maisi.core.checks import InputError
from maisi.core.io import read_canonical, save_nifti, world_grid


def _lps_stored(shape=(6, 5, 4)) -> tuple[np.ndarray, np.ndarray]:
    """An array stored z-first, left and posterior first (axes: S, L, P), and its affine."""
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [0.0, 0.0, -2.0, 20.0], [3.0, 0.0, 0.0, -5.0], [0, 0, 0, 1]])
    return data, affine


def test_world_grid_orders_size_and_spacing_by_the_world_axes():
    data, affine = _lps_stored()
    assert world_grid(data.shape, affine) == ((5, 4, 6), (1.5, 2.0, 3.0))


def test_read_canonical_puts_the_axes_in_ras_order(tmp_path):
    data, affine = _lps_stored()
    path = save_nifti(data, affine, tmp_path / "a.nii.gz", np.int16)
    ras, ras_affine = read_canonical(path, "label map")
    expected = np.flip(np.transpose(data, (1, 2, 0)), axis=(0, 1))
    np.testing.assert_array_equal(ras, expected)
    assert np.allclose(np.diag(ras_affine)[:3], [1.5, 2.0, 3.0]) and world_grid(ras.shape, ras_affine) == world_grid(data.shape, affine)
    # the same volume as NRRD (read with MONAI's readers) comes out the same
    img = sitk.GetImageFromArray(np.ascontiguousarray(expected.transpose(2, 1, 0)))
    img.SetSpacing((1.5, 2.0, 3.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # ITK's world is LPS: x and y run to the right and front
    img.SetOrigin(tuple(float(v) for v in (-ras_affine[0, 3], -ras_affine[1, 3], ras_affine[2, 3])))
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    nrrd, nrrd_affine = read_canonical(tmp_path / "a.nrrd", "label map")
    np.testing.assert_array_equal(nrrd, expected)
    assert np.allclose(nrrd_affine, ras_affine)


def test_read_canonical_refuses_what_is_no_volume_naming_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a NIfTI file")
    with pytest.raises(InputError, match=rf"{bad}: cannot be read"):
        read_canonical(bad, "label map")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.uint8), np.eye(4)), str(flat))
    with pytest.raises(InputError, match=rf"{flat}: the label map has shape \(4, 4, 3, 2\); expected a 3-D volume"):
        read_canonical(flat, "label map")
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3, 1), np.uint8), np.eye(4)), str(single))
    assert read_canonical(single, "label map")[0].shape == (4, 4, 3)  # a trailing singleton axis is dropped
