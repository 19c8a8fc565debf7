import nibabel as nib
import numpy as np
import pytest

from maisi.checks import InputError
from maisi.regions import (
    BODY_REGIONS,
    RegionError,
    derive_case_regions,
    one_hot,
    region_from_one_hot,
    regions_from_label,
)


def _label(*ids):
    lab = np.zeros((4, 4, len(ids) + 1), np.uint8)
    for z, i in enumerate(ids):
        lab[:, :, z] = i
    return lab


@pytest.mark.parametrize(
    "ids,top,bottom",
    [
        ((22,), "head_neck", "head_neck"),
        ((120, 30), "head_neck", "chest"),
        ((28, 1), "chest", "abdomen"),
        ((3, 93), "abdomen", "lower_body"),
        ((94,), "lower_body", "lower_body"),
        ((32, 14), "chest", "abdomen"),
        ((22, 93), "head_neck", "lower_body"),
        ((5,), "abdomen", "abdomen"),
    ],
)
def test_maisi_rule(ids, top, bottom):
    res = regions_from_label(_label(*ids))
    assert (res.top, res.bottom) == (top, bottom)


def test_rule_ignores_non_marker_labels():
    with pytest.raises(RegionError, match="no region marker"):
        regions_from_label(_label(23, 200, 57))


def test_min_voxels():
    lab = _label(30)
    lab[0, 0, -1] = 1  # one stray liver voxel
    assert regions_from_label(lab).bottom == "abdomen"
    assert regions_from_label(lab, min_voxels=2).bottom == "chest"


def test_one_hot_roundtrip():
    for r in BODY_REGIONS:
        assert region_from_one_hot(one_hot(r)) == r
    assert one_hot("chest") == [0, 1, 0, 0]
    with pytest.raises(RegionError):
        one_hot("pelvis")
    with pytest.raises(RegionError):
        region_from_one_hot([1, 1, 0, 0])


def test_derive_case_regions(tmp_path):
    path = tmp_path / "l.nii.gz"
    nib.save(nib.Nifti1Image(_label(28, 1), np.eye(4)), str(path))
    assert derive_case_regions("a", str(path), {"backend": "labels"}).bottom == "abdomen"
    manual = derive_case_regions("a", None, {"backend": "manual", "top": "chest", "bottom": "chest"})
    assert (manual.top, manual.backend) == ("chest", "manual")
    over = derive_case_regions("a", str(path), {"backend": "labels", "overrides": {"a": {"top": "head_neck", "bottom": "chest"}}})
    assert (over.top, over.bottom, over.backend) == ("head_neck", "chest", "manual-override")
    with pytest.raises(InputError, match="needs a label map"):
        derive_case_regions("b", None, {"backend": "labels"})
    nib.save(nib.Nifti1Image(_label(23), np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"l\.nii\.gz: no region marker"):
        derive_case_regions("c", str(path), {"backend": "labels"})
