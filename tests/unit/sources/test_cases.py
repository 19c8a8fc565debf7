import numpy as np
import pytest
from helpers.volumes import ct_volume, write_dicom_series, write_nifti

from maisi.core.checks import ConfigError
from maisi.sources.cases import local_cases, resolve_label_map, shards_of


def test_local_nifti_with_labels(tmp_path):
    for c in ("a", "b"):
        write_nifti(tmp_path / "images" / f"{c}.nii.gz", ct_volume())
    write_nifti(tmp_path / "labels" / "a.nii.gz", np.zeros((40, 36, 20), np.uint8))
    cases = local_cases("s", {"path": str(tmp_path), "images": "images/{case}.nii.gz", "labels": "labels/{case}.nii.gz", "label_map": {1: "spleen"}})
    assert [(c.case_id, bool(c.label)) for c in cases] == [("a", True), ("b", False)]
    assert cases[0].label_map == {1: 3}


def test_local_suffix_pattern_and_dicom_folders(tmp_path):
    (tmp_path / "x_image.nrrd").write_bytes(b"")
    (tmp_path / "x_label.nrrd").write_bytes(b"")
    cases = local_cases("s", {"path": str(tmp_path), "images": "{case}_image.nrrd", "labels": "{case}_label.nrrd"})
    assert [(c.case_id, c.label.endswith("x_label.nrrd")) for c in cases] == [("x", True)]
    write_dicom_series(tmp_path / "dicom" / "p1", ct_volume((8, 8, 3)))
    cases = local_cases("d", {"path": str(tmp_path / "dicom"), "images": "{case}/", "labels": None})
    assert [c.case_id for c in cases] == ["p1"]


def test_local_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="sources.s.path"):
        local_cases("s", {"path": str(tmp_path / "missing"), "images": "{case}.nii.gz"})
    with pytest.raises(ConfigError, match="sources.s.images.*no file matches"):
        local_cases("s", {"path": str(tmp_path), "images": "{case}.nii.gz"})
    with pytest.raises(ConfigError, match="sources.s.label_map.*unknown MAISI class 'splen'"):
        resolve_label_map({1: "splen"}, "sources.s.label_map")


def test_shards_only_non_empty(tmp_path):
    for c in ("a", "b", "c"):
        write_nifti(tmp_path / "images" / f"{c}.nii.gz", ct_volume((8, 8, 3)))
    cases = local_cases("s", {"path": str(tmp_path), "images": "images/{case}.nii.gz", "labels": None})
    groups = shards_of(cases, 64)
    assert 1 <= len(groups) <= 3 and sum(len(v) for v in groups.values()) == 3
