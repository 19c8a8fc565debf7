import nibabel as nib
import numpy as np
import pytest

from maisi.core.anatomy import BODY_REGIONS, RegionError, one_hot, region_from_one_hot
from maisi.core.checks import InputError
from maisi.prepare.regions import derive_case_regions, regions_from_label


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


@pytest.mark.parametrize(
    "ids,mode,top,bottom",
    [
        ((50, 49), "fallback", "head_neck", "chest"),  # C7 + T1, no organs: vertebrae decide
        ((45,), "fallback", "chest", "chest"),  # T5 only
        ((37, 97), "fallback", "abdomen", "lower_body"),  # L1 + sacrum
        ((95, 96), "fallback", "lower_body", "lower_body"),  # hips
        ((53, 30), "fallback", "chest", "chest"),  # organs present: MAISI's rule alone
        ((53, 30), "union", "head_neck", "chest"),  # C4 counts although brain/skull are cut off
        ((30, 34), "union", "chest", "abdomen"),  # L4 below the lungs, abdominal organs cut off
    ],
)
def test_vertebra_modes(ids, mode, top, bottom):
    res = regions_from_label(_label(*ids), vertebrae=mode)
    assert (res.top, res.bottom) == (top, bottom)


def test_vertebrae_off_and_unknown_mode():
    with pytest.raises(RegionError, match="no region marker"):
        regions_from_label(_label(45), vertebrae="off")
    with pytest.raises(RegionError, match="unknown vertebrae mode"):
        regions_from_label(_label(45), vertebrae="sometimes")


def test_vertebra_table_covers_the_spine():
    from maisi.core.labels import label_name
    from maisi.prepare.regions import VERTEBRA_LABELS

    names = {r: [label_name(i) for i in ids] for r, ids in VERTEBRA_LABELS.items()}
    assert names["head_neck"] == [f"vertebrae C{i}" for i in range(1, 8)]
    assert names["chest"] == [f"vertebrae T{i}" for i in range(1, 13)]
    assert names["abdomen"] == [f"vertebrae L{i}" for i in range(1, 6)]
    assert {"sacrum", "left hip", "right hip"} <= set(names["lower_body"])
