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


def test_labels_pattern_matching_no_file_is_a_config_error(tmp_path, caplog):
    """A mistyped labels pattern would drop every label silently; some cases without a label are logged by name."""
    for c in ("a", "b", "c"):
        write_nifti(tmp_path / "images" / f"{c}.nii.gz", ct_volume((8, 8, 3)))
    write_nifti(tmp_path / "labels" / "a.nii.gz", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match=r"'sources.s.labels': no case has a label map: nothing matches .*lables/\{case\}.nii.gz"):
        local_cases("s", {"path": str(tmp_path), "images": "images/{case}.nii.gz", "labels": "lables/{case}.nii.gz"})
    with caplog.at_level("WARNING", logger="maisi.sources.cases"):
        cases = local_cases("s", {"path": str(tmp_path), "images": "images/{case}.nii.gz", "labels": "labels/{case}.nii.gz"})
    assert [c.case_id for c in cases if c.label] == ["a"]
    assert "2 of 3 cases have no label map" in caplog.text and "b, c" in caplog.text


@pytest.mark.parametrize("name,case", [("brace{x}.nii.gz", "brace{x}"), ("x...nii.gz", ".."), ("x.hidden.nii.gz", ".hidden")])
def test_case_ids_that_cannot_name_outputs_are_refused_by_file(tmp_path, name, case):
    """Braces (Snakemake wildcards) and ids made of dots stop the listing with the file and the allowed characters."""
    write_nifti(tmp_path / "ok1.nii.gz", ct_volume((8, 8, 3)))
    write_nifti(tmp_path / name, ct_volume((8, 8, 3)))
    pattern = "x{case}.nii.gz" if name.startswith("x") else "{case}.nii.gz"
    with pytest.raises(ConfigError) as err:
        local_cases("s", {"path": str(tmp_path), "images": pattern, "labels": None})
    msg = str(err.value)
    assert "'sources.s.images'" in msg and str(tmp_path / name) in msg and repr(case) in msg and "letters, digits" in msg


def test_temporary_names_keep_only_the_format_suffix(tmp_path):
    from maisi.core.io import save_nifti, temp_suffix

    assert temp_suffix("a/...nii.gz") == ".nii.gz" and temp_suffix("a/x.y.tsv") == ".tsv" and temp_suffix("a/...") == ".tmp"
    dest = tmp_path / "...nii.gz"  # an id of dots can no longer reach a file name, and still would be written
    save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), dest, np.uint8)
    assert dest.is_file() and [p.name for p in tmp_path.iterdir()] == ["...nii.gz"]
