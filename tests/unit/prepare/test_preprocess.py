import json

import nibabel as nib
import numpy as np
import pytest
from helpers.volumes import ct_volume, write_dicom_series, write_nifti

from maisi.core.checks import InputError
from maisi.prepare.preprocess import PreprocessSettings, load_scan, new_dim, preprocess_case, target_shape
from maisi.sources.cases import CaseInput


@pytest.mark.parametrize(
    "n,expected",
    [(1, 128), (48, 128), (64, 128), (128, 128), (192, 256), (320, 256), (384, 384), (448, 512), (576, 512), (640, 640), (768, 768)],
)
def test_new_dim_follows_maisi_rounding(n, expected):
    assert new_dim(n) == expected


def test_target_shape_other_divisor():
    assert target_shape((40, 100, 17), divisor=32) == (32, 96, 32)


def _case(tmp_path, image, label=None, label_map=None):
    return CaseInput("src", "c1", str(image), str(label) if label else None, label_map)


def test_small_case_end_to_end(tmp_path):
    vol = ct_volume((40, 36, 20))
    lab = np.zeros(vol.shape, np.uint8)
    lab[vol > 500] = 1
    img = write_nifti(tmp_path / "in/img.nii.gz", vol, spacing=(2.0, 2.5, 3.0))
    lbl = write_nifti(tmp_path / "in/lab.nii.gz", lab, spacing=(2.0, 2.5, 3.0))
    row = preprocess_case(_case(tmp_path, img, lbl, {1: 33}), tmp_path / "out", PreprocessSettings(divisor=32))
    assert json.loads(row["dim"]) == [32, 32, 32]
    out = nib.load(row["image"])
    assert out.shape == (32, 32, 32)
    # new spacing = old * old_dim / new_dim
    np.testing.assert_allclose(out.header.get_zooms(), [2.0 * 40 / 32, 2.5 * 36 / 32, 3.0 * 20 / 32], rtol=1e-5)
    data = out.get_fdata()
    assert data.min() >= 0.0 and data.max() <= 1.0
    hu = nib.load(row["image_hu"])
    assert hu.get_data_dtype() == np.int16
    assert np.asanyarray(hu.dataobj).min() <= -990
    label = np.asanyarray(nib.load(row["label"]).dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 33}
    meta = json.loads(open(row["meta"], encoding="utf-8").read())
    assert meta["orig_dim"] == [40, 36, 20] and meta["labels_present"] == [33]
    assert set(meta["outputs"]) == {"image", "image_hu", "label"}
    assert "monai" in meta["provenance"]["versions"]


def test_orientation_is_ras(tmp_path):
    vol = ct_volume((32, 32, 32))
    vol[0, :, :] = 1500  # a marker plane at the first stored x index
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # stored x axis runs right-to-left (L)
    img = write_nifti(tmp_path / "img.nii.gz", vol, affine=affine)
    row = preprocess_case(_case(tmp_path, img), tmp_path / "out", PreprocessSettings(divisor=32))
    out = nib.load(row["image_hu"])
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    data = np.asanyarray(out.dataobj)
    # the marker was at the left-most world x, so after reorientation it lies at the last index
    assert data[-1].mean() > 1000 and data[0].mean() < 1000


def test_unchanged_case_is_not_recomputed(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", ct_volume())
    settings = PreprocessSettings(divisor=32)
    row = preprocess_case(_case(tmp_path, img), tmp_path / "out", settings)
    mtime = (tmp_path / "out/src/images/c1.nii.gz").stat().st_mtime_ns
    preprocess_case(_case(tmp_path, img), tmp_path / "out", settings)
    assert (tmp_path / "out/src/images/c1.nii.gz").stat().st_mtime_ns == mtime
    preprocess_case(_case(tmp_path, img), tmp_path / "out", PreprocessSettings(divisor=64))
    assert nib.load(row["image"]).shape == (64, 64, 64)


def test_real_chest_ct_becomes_512x512x128(real_ct, tmp_path):
    case = CaseInput("real", "lung1", str(real_ct / "lung1_image.nrrd"), str(real_ct / "lung1_label.nrrd"), {1: 23})
    row = preprocess_case(case, tmp_path, PreprocessSettings())
    assert json.loads(row["dim"]) == [512, 512, 128]
    img = nib.load(row["image"])
    assert img.shape == (512, 512, 128)
    np.testing.assert_allclose(img.header.get_zooms(), [0.5703125, 0.5703125, 5.0 * 48 / 128], rtol=1e-5)
    lab = np.asanyarray(nib.load(row["label"]).dataobj)
    assert set(np.unique(lab)) == {0, 23}
    assert json.loads(row["labels_present"]) == [23]


# ---- bad input: each names the file and the problem, and writes nothing ----


def _expect_error(tmp_path, case, match):
    with pytest.raises(InputError, match=match) as err:
        preprocess_case(case, tmp_path / "out", PreprocessSettings(divisor=32))
    assert not list((tmp_path / "out").rglob("*.nii.gz")), "nothing may be written for a rejected case"
    return err.value


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 definitely not a NIfTI")
    err = _expect_error(tmp_path, _case(tmp_path, path), "corrupt or truncated")
    assert err.path == str(path)


def test_truncated_file(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", ct_volume((64, 64, 40)))
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect_error(tmp_path, _case(tmp_path, bad), "truncated.nii.gz: cannot be read")


def test_2d_image(tmp_path):
    path = write_nifti(tmp_path / "flat.nii.gz", ct_volume((40, 36, 1)))
    _expect_error(tmp_path, _case(tmp_path, path), "2-D image")


def test_nans(tmp_path):
    vol = ct_volume().astype(np.float32)
    vol[3, 3, 3] = np.nan
    path = write_nifti(tmp_path / "nan.nii.gz", vol)
    _expect_error(tmp_path, _case(tmp_path, path), "NaN")


def test_non_ct_range(tmp_path):
    mr = np.random.default_rng(0).uniform(0, 1200, (40, 36, 20)).astype(np.float32)
    path = write_nifti(tmp_path / "mr.nii.gz", mr)
    _expect_error(tmp_path, _case(tmp_path, path), "does not look like CT")


def test_zero_spacing(tmp_path):
    img = nib.Nifti1Image(ct_volume(), None)
    img.header.set_zooms((0.0, 1.0, 1.0))  # pixdim without a spacing, no qform/sform
    path = tmp_path / "nospacing.nii.gz"
    nib.save(img, str(path))
    _expect_error(tmp_path, _case(tmp_path, path), "zero voxel spacing")


def _with_header(path, vol, *, pixdim=(1.0, 1.0, 1.0), qform=0, sform=None):
    """A NIfTI whose header fields are written as given (nibabel's own fixes bypassed)."""
    img = nib.Nifti1Image(vol, None)
    hdr = img.header
    hdr["pixdim"][1:4] = pixdim
    hdr["qform_code"], hdr["sform_code"] = qform, 0
    if sform is not None:
        hdr["sform_code"] = 1
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform
    img.to_filename(str(path))
    return path


@pytest.mark.parametrize(
    "name,fields,match",
    [
        ("qform_zero_z", {"pixdim": (3.0, 3.0, 0.0), "qform": 1}, r"zero voxel spacing \[3.0, 3.0, 0.0\] in the header's pixdim \(the qform"),
        ("qform_negative", {"pixdim": (3.0, -3.0, 1.0), "qform": 1}, "zero voxel spacing"),
        ("pixdim_nan", {"pixdim": (np.nan, 1.0, 1.0)}, "zero voxel spacing"),
        ("sform_zero_column", {"sform": ((2, 0, 0, 0), (0, 2, 0, 0), (0, 0, 0, 0))}, r"in the header's sform"),
        ("absurd", {"pixdim": (1.0, 1.0, 500.0), "qform": 1}, r"500.0\] mm in the header's pixdim .*outside \[0.01, 100\] mm"),
        ("tiny", {"sform": ((1e-4, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))}, r"outside \[0.01, 100\] mm"),
    ],
)
def test_bad_spacing_in_any_header_field_names_the_file(tmp_path, name, fields, match):
    """A zero, negative, NaN or absurd spacing is an error wherever the header keeps it (pixdim, qform, sform)."""
    path = _with_header(tmp_path / f"{name}.nii.gz", ct_volume((40, 36, 20)), **fields)
    err = _expect_error(tmp_path, _case(tmp_path, path), match)
    assert err.path == str(path)


def test_qform_spacing_is_used_when_valid(tmp_path):
    path = _with_header(tmp_path / "ok.nii.gz", ct_volume((40, 36, 20)), pixdim=(2.0, 2.5, 3.0), qform=1)
    row = preprocess_case(_case(tmp_path, path), tmp_path / "out", PreprocessSettings(divisor=32))
    assert json.loads(row["orig_spacing"]) == pytest.approx([2.0, 2.5, 3.0])


def test_label_values_above_255_map_through_the_label_map(tmp_path):
    """Other segmenters' values (here 300 and 1000) become MAISI ids; an unmapped one above 255 is named."""
    img = write_nifti(tmp_path / "img.nii.gz", ct_volume((40, 36, 20)))
    lab = np.zeros((40, 36, 20), np.int16)
    lab[5:15, 5:15, 5:15] = 300
    lab[20:30, 20:30, 5:15] = 1000
    lbl = write_nifti(tmp_path / "lab.nii.gz", lab)
    preprocess_case(_case(tmp_path, img, lbl, {300: 1, 1000: 3}), tmp_path / "out", PreprocessSettings(divisor=32))
    out = np.asanyarray(nib.load(tmp_path / "out/src/labels/c1.nii.gz").dataobj)
    assert set(np.unique(out).tolist()) == {0, 1, 3}
    lab[0, 0, 0] = 400
    write_nifti(tmp_path / "lab2.nii.gz", lab)
    _expect_error(tmp_path / "x", _case(tmp_path, img, tmp_path / "lab2.nii.gz", {300: 1, 1000: 3}), r"\[400\] have no entry")
    _expect_error(tmp_path / "y", _case(tmp_path, img, tmp_path / "lab2.nii.gz"), r"\[300, 400, 1000\] are not MAISI label ids")


def test_label_shape_mismatch(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", ct_volume((40, 36, 20)))
    lbl = write_nifti(tmp_path / "lab.nii.gz", np.zeros((40, 36, 21), np.uint8))
    err = _expect_error(tmp_path, _case(tmp_path, img, lbl), "label shape")
    assert err.path == str(lbl)


def test_label_affine_mismatch(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", ct_volume(), spacing=(2, 2, 3))
    lbl = write_nifti(tmp_path / "lab.nii.gz", np.zeros((40, 36, 20), np.uint8), spacing=(2, 2, 5))
    _expect_error(tmp_path, _case(tmp_path, img, lbl), "affine differs")


def test_unmapped_label_value(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", ct_volume())
    lab = np.zeros((40, 36, 20), np.uint8)
    lab[1, 1, 1] = 7
    lbl = write_nifti(tmp_path / "lab.nii.gz", lab)
    _expect_error(tmp_path, _case(tmp_path, img, lbl, {1: 3}), r"\[7\] have no entry")


def test_unsupported_format(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"png")
    _expect_error(tmp_path, _case(tmp_path, path), "unsupported file type")


def test_load_scan_missing(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_scan(tmp_path / "nope.nii.gz")


def test_dicom_series_matches_nifti(tmp_path):
    vol = ct_volume((40, 36, 20))
    series = write_dicom_series(tmp_path / "dicom" / "c1", vol, spacing=(1.5, 1.5, 3.0))
    # DICOM is LPS: the same voxels as a NIfTI whose x and y axes point left and posterior
    nifti = write_nifti(tmp_path / "c1.nii.gz", vol, affine=np.diag([-1.5, -1.5, 3.0, 1.0]))
    settings = PreprocessSettings(divisor=32)
    a = preprocess_case(CaseInput("dcm", "c1", str(series)), tmp_path / "a", settings)
    b = preprocess_case(CaseInput("nii", "c1", str(nifti)), tmp_path / "b", settings)
    assert a["spacing"] == b["spacing"] == json.dumps([1.875, 1.6875, 1.875])
    np.testing.assert_array_equal(np.asanyarray(nib.load(a["image_hu"]).dataobj), np.asanyarray(nib.load(b["image_hu"]).dataobj))
    np.testing.assert_allclose(nib.load(a["image"]).affine, nib.load(b["image"]).affine, atol=1e-4)


def test_nrrd_without_or_with_zero_spacing_says_what_is_missing(tmp_path):
    import nrrd

    vol = ct_volume((40, 36, 20))
    nrrd.write(str(tmp_path / "none.nrrd"), vol, {"space": "left-posterior-superior"})
    err = _expect_error(tmp_path, _case(tmp_path, tmp_path / "none.nrrd"), "no 'space directions' \\(nor 'spacings'\\): the voxel spacing is missing")
    assert "corrupt" not in str(err)
    flat = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 0.0]), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "flat.nrrd"), vol, flat)
    _expect_error(tmp_path, _case(tmp_path, tmp_path / "flat.nrrd"), "zero voxel spacing .* in the NRRD header's 'space directions'")
    ok = dict(flat, **{"space directions": np.diag([1.5, 1.5, 3.0])})
    nrrd.write(str(tmp_path / "ok.nrrd"), vol, ok)
    row = preprocess_case(_case(tmp_path, tmp_path / "ok.nrrd"), tmp_path / "out", PreprocessSettings(divisor=32))
    assert json.loads(row["orig_spacing"]) == pytest.approx([1.5, 1.5, 3.0])


def test_dicom_series_with_a_broken_slice_names_the_slice(tmp_path):
    folder = write_dicom_series(tmp_path / "series", ct_volume((16, 16, 6)))
    broken = folder / "slice_003.dcm"
    broken.write_bytes(broken.read_bytes()[:400])  # truncated mid-header
    err = _expect_error(tmp_path, _case(tmp_path, folder), "slice of the DICOM series .*series (cannot be read|lacks)")
    assert err.path == str(broken)


@pytest.mark.parametrize("tag,value", [("ImagePositionPatient", [0, 0, 0]), ("PixelSpacing", [0, 0])])
def test_dicom_series_with_zero_pixel_or_slice_spacing(tmp_path, tag, value):
    """Every slice at one position, or a zero PixelSpacing: zero spacing, named, never a made-up one."""
    import pydicom

    folder = write_dicom_series(tmp_path / "series", ct_volume((16, 16, 6)))
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        setattr(ds, tag, value)
        ds.save_as(path)
    err = _expect_error(tmp_path, _case(tmp_path, folder), r"zero voxel spacing .* in the image's affine .*DICOM: PixelSpacing")
    assert err.path == str(folder)


def test_dicom_series_with_truncated_pixel_data_names_the_slice_and_its_instance_number(tmp_path):
    """A slice whose header is whole but whose pixel data is cut short: the file and its InstanceNumber, not the folder."""
    import pydicom

    folder = write_dicom_series(tmp_path / "series", ct_volume((16, 16, 6)))
    broken = folder / "slice_003.dcm"
    ds = pydicom.dcmread(broken)
    assert ds.InstanceNumber == 4 and broken.read_bytes().endswith(ds.PixelData)  # the pixel data ends the file
    broken.write_bytes(broken.read_bytes()[:-100])
    err = _expect_error(tmp_path, _case(tmp_path, folder), r"slice \(InstanceNumber 4\) of the DICOM series .*series: its pixel data")
    assert err.path == str(broken)


def _nrrd_by_hand(path, vol, fields: str):
    """A raw little-endian int16 NRRD whose header holds ``fields`` besides type, dimension, sizes and encoding."""
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {' '.join(map(str, vol.shape))}\n{fields}encoding: raw\nendian: little\n\n"
    path.write_bytes(header.encode("ascii") + np.asarray(vol, "<i2").tobytes(order="F"))
    return path


def test_nrrd_with_spacings_and_no_space_directions_is_read_with_identity_directions(tmp_path, caplog):
    """'spacings' without 'space directions' is legal NRRD: read as ITK does (identity LPS directions, origin 0), with a warning."""
    import logging

    import SimpleITK as sitk

    vol = ct_volume((40, 36, 20))
    path = _nrrd_by_hand(tmp_path / "spacings.nrrd", vol, "spacings: 1.5 2 3\n")
    with caplog.at_level(logging.WARNING, logger="maisi.prepare.preprocess"):
        scan = load_scan(path)
    np.testing.assert_array_equal(scan[0].numpy(), vol)
    np.testing.assert_allclose(scan.affine.numpy(), np.diag([-1.5, -2.0, 3.0, 1.0]))  # LPS identity in RAS
    itk = sitk.ReadImage(str(path))
    assert itk.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1) and itk.GetSpacing() == (1.5, 2.0, 3.0) and itk.GetOrigin() == (0, 0, 0)
    assert str(path) in caplog.text and "orientation is assumed" in caplog.text
    row = preprocess_case(_case(tmp_path, path), tmp_path / "out", PreprocessSettings(divisor=32))
    assert json.loads(row["orig_spacing"]) == pytest.approx([1.5, 2.0, 3.0])


def test_nrrd_without_space_origin_is_read_at_origin_zero(tmp_path):
    """'space origin' is optional in NRRD: without it the origin is 0, as ITK reads it, not a corrupt file."""
    vol = ct_volume((40, 36, 20))
    fields = "space: left-posterior-superior\nspace directions: (1.5,0,0) (0,2,0) (0,0,3)\n"
    scan = load_scan(_nrrd_by_hand(tmp_path / "no_origin.nrrd", vol, fields))
    np.testing.assert_allclose(scan.affine.numpy(), np.diag([-1.5, -2.0, 3.0, 1.0]))
