"""The user's own label maps as users give them: stored in another orientation or on another grid than their
CT, holding NaNs, or for body regions NVIDIA recommends no field of view for."""

from __future__ import annotations

import logging
import re

import nibabel as nib
import numpy as np
import pytest
from helpers.models import save_image_checkpoints
from helpers.paths import NVIDIA_REFERENCE

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.checks import InputError
from maisi.core.labels import BODY
from maisi.generate.user_masks import RECOMMENDED_CT, load_user_masks, recommended_ct

S = 4.0
SHAPE = (96, 96, 80)
#: The CT's affine: RAS, 4 mm, its centre near the world origin (as a scanner's).
CT_AFFINE = np.array([[S, 0, 0, -190.0], [0, S, 0, -190.0], [0, 0, S, -158.0], [0, 0, 0, 1]])
#: The liver on the patient's right: low x in RAS.
LIVER = (slice(24, 44), slice(40, 60), slice(20, 60))


def _ct(shape=SHAPE) -> np.ndarray:
    """Air around a body (an elliptic cylinder at 40 HU)."""
    x, y, _ = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 <= 1.0
    ct = np.full(shape, -1000, np.int16)
    ct[np.broadcast_to(body, shape)] = 40
    return ct


def _liver(shape=SHAPE, where=LIVER) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[where] = 1
    return seg


def _flip(n: int, axes: tuple[int, ...]) -> np.ndarray:
    """The voxel map of an array flipped along ``axes`` (each of length ``n``): index i -> n - 1 - i."""
    m = np.eye(4)
    for a in axes:
        m[a, a], m[a, 3] = -1.0, n - 1
    return m


def _shift(*voxels: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = voxels
    return m


def _pair(root, case: str, seg: np.ndarray, seg_affine: np.ndarray, ct=None, ct_affine=CT_AFFINE) -> tuple[str, str]:
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "ct").mkdir(parents=True, exist_ok=True)
    label, image = root / "labels" / f"{case}.nii.gz", root / "ct" / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(seg, seg_affine), str(label))
    nib.save(nib.Nifti1Image(_ct() if ct is None else ct, ct_affine), str(image))
    return str(label), str(image)


def _request(root, size=SHAPE, spacing=(S, S, S), top="chest", bottom="abdomen", policy=None, n_cases=1, **spec):
    from maisi.generate.requests import parse_requests

    folder = {"path": str(root), "labels": "labels/{case}.nii.gz", "images": "ct/{case}.nii.gz", **spec}
    block = {"requests": {"own": {"n_cases": n_cases, "size": list(size), "spacing": list(spacing), "top_region": top,
                                  "bottom_region": bottom, "masks": "folder", "steps": 2, "cases_per_shard": n_cases,
                                  "mask_folder": folder}},
             "user_masks": policy or {"out_of_range": "warn"}}  # fmt: skip
    return parse_requests(block, "tiny", "rflow")[0]


def _draw(root, index=0, **spec):
    req = _request(root, **spec)
    own, _ = load_user_masks(req.mask_folder, "mask_folder")
    return own.draw(req, index)


def _assert_liver_where_the_ct_has_it(label: np.ndarray) -> None:
    want = _liver()
    assert np.array_equal(label == 1, want == 1), f"liver centroid x {np.argwhere(label == 1)[:, 0].mean():.1f}, want 33.5"
    assert (label == BODY).sum() > 100_000 and not (label[:5] == BODY).any()  # the CT's body, not the air beside it


# -- orientation and grid ---------------------------------------------------------------------------------------------


def test_map_in_lps_keeps_the_liver_on_the_side_of_its_ct(tmp_path):
    """The map stored in LPS (its array flipped along x and y, its affine saying so): the liver stays on the right."""
    _pair(tmp_path, "c0", _liver()[::-1, ::-1].copy(), CT_AFFINE @ _flip(96, (0, 1)))
    label, record = _draw(tmp_path)
    _assert_liver_where_the_ct_has_it(label)
    assert record["body_added"] is True


def test_map_on_another_grid_than_its_ct_is_put_on_the_cts_grid_by_its_affine(tmp_path):
    """Maps whose affine or shape differ from the CT's but which cover the same body: each is resampled
    (nearest neighbour) onto the CT's grid through the two affines before the body is added."""
    ras = _liver()
    # the same shape, in LPS, its origin 8 voxels further along x: map voxel i is CT voxel i + 8
    shifted = np.zeros_like(ras)
    shifted[:88] = ras[8:]
    _pair(tmp_path / "shifted", "c0", shifted[::-1, ::-1].copy(), CT_AFFINE @ _shift(8, 0, 0) @ _flip(96, (0, 1)))
    # cropped along y to 90 voxels (96 x 90 x 80), in LPS
    cropped = ras[:, 3:93]
    affine = CT_AFFINE @ _shift(0, 3, 0) @ _flip(96, (0,)) @ _flip(90, (1,))
    _pair(tmp_path / "cropped", "c0", cropped[::-1, ::-1].copy(), affine)
    for name in ("shifted", "cropped"):
        label, record = _draw(tmp_path / name)
        _assert_liver_where_the_ct_has_it(label)
        assert record["body_added"] is True and record["resampled_to_ct"] is True, name
    # twice as coarse (8 mm, 48 x 48 x 40): voxel j covers CT voxels 2j and 2j + 1
    _pair(tmp_path / "coarse", "c0", ras[::2, ::2, ::2].copy(), CT_AFFINE @ _shift(0.5, 0.5, 0.5) @ np.diag([2.0, 2.0, 2.0, 1.0]))
    label, _ = _draw(tmp_path / "coarse")
    assert abs(np.argwhere(label == 1)[:, 0].mean() - 33.5) <= 1.0 and (label == 1).sum() == pytest.approx((ras == 1).sum(), rel=0.1)


def test_map_flipped_without_overlapping_its_ct_is_refused_naming_both_files(tmp_path):
    """A map whose affine flips x about the CT's origin (its world extent beside the CT's): not combined."""
    label, image = _pair(tmp_path, "c0", _liver(), CT_AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="do not overlap") as err:
        _draw(tmp_path)
    assert label in str(err.value) and image in str(err.value)


# -- a bad case in a shard --------------------------------------------------------------------------------------------


def test_shard_resamples_a_map_of_another_shape_and_fails_only_the_case_without_overlap(tmp_path):
    """``on_error: skip``: a map whose shape differs from its CT's is resampled; one far from its CT fails
    its case alone (named with both files), the other cases are made and the table lists all three."""
    from maisi.core.tables import read_table
    from maisi.generate.settings import DecodeSettings, GenerateSettings
    from maisi.generate.shard import generate_shard

    n, ct_affine = 32, np.diag([S, S, S, 1.0])
    ct = _ct((n, n, n))
    seg = _liver((n, n, n), (slice(8, 15), slice(12, 20), slice(8, 24)))
    root = tmp_path / "own"
    _pair(root, "c0", seg, ct_affine, ct, ct_affine)
    _pair(root, "c1", seg[:, 1:31].copy(), ct_affine @ _shift(0, 1, 0), ct, ct_affine)  # 32 x 30 x 32
    far = _pair(root, "c2", seg[:, 1:31].copy(), _shift(1000, 0, 0) @ ct_affine, ct, ct_affine)
    req = _request(root, size=(n, n, n), n_cases=3)
    (tmp_path / "models").mkdir()
    files = {k: str(v) for k, v in save_image_checkpoints(tmp_path / "models").items()}
    skip = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), on_error="skip")
    rows = generate_shard(req, req.cases(), files, None, skip, tmp_path / "out", tmp_path / "t.tsv", progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert far[0] in rows[2]["reason"] and far[1] in rows[2]["reason"]
    table = read_table(tmp_path / "t.tsv")
    assert list(table.status) == ["ok", "ok", "failed"] and far[0] in table.reason.iloc[2]
    made = nib.load(rows[1]["label"]).get_fdata()
    assert np.array_equal(made == 1, seg == 1)  # c1 resampled onto its CT's grid: the liver where it was


# -- values -----------------------------------------------------------------------------------------------------------


def test_nan_in_a_map_is_named(tmp_path):
    seg = _liver().astype(np.float32)
    seg[50, 50, 40] = np.nan
    label, _ = _pair(tmp_path, "c0", seg, CT_AFFINE)
    for spec in ({}, {"label_map": {1: "liver"}}):
        with pytest.raises(InputError, match="NaN in the label map") as err:
            _draw(tmp_path, **spec)
        assert label in str(err.value) and "9223372036854775808" not in str(err.value)


def test_fractional_values_in_a_map_are_refused(tmp_path):
    """A map resampled with linear interpolation (1.5 between liver and kidney) is not rounded silently."""
    seg = _liver().astype(np.float32)
    seg[30, 50, 40] = 1.5
    label, _ = _pair(tmp_path, "c0", seg, CT_AFFINE)
    with pytest.raises(InputError, match=r"not whole numbers \(1\.5\)") as err:
        _draw(tmp_path)
    assert label in str(err.value)


# -- field of view at start -------------------------------------------------------------------------------------------


def test_every_region_pair_has_nvidias_field_of_view_or_says_it_has_none(tmp_path, caplog):
    """Every top/bottom pair but head_neck alone has NVIDIA's recommended field of view; a head_neck request's
    maps cannot be checked, and the log says so when the workflow starts."""
    pairs = [(t, b) for i, t in enumerate(BODY_REGIONS) for b in BODY_REGIONS[i:]]
    assert [p for p in pairs if recommended_ct(*p) is None] == [("head_neck", "head_neck")]
    _pair(tmp_path, "c0", np.zeros((64, 64, 32), np.uint8), np.diag([4.0, 4.0, 8.0, 1.0]))
    with caplog.at_level(logging.INFO):
        req = _request(tmp_path, size=(32, 32, 32), spacing=(4.0, 4.0, 8.0), top="head_neck", bottom="head_neck",
                       policy={"out_of_range": "refuse"})  # fmt: skip
    assert req.mask_source == "folder"
    assert re.search(r"NVIDIA recommends no CT field of view for head_neck -> head_neck.*not checked", caplog.text)


def test_field_of_view_is_read_in_the_maps_world_axes(tmp_path):
    """A map stored slice-first (z, y, x) has its field of view compared along x, y and z."""
    from maisi.generate.requests import RequestError

    rec_size, rec_spacing = recommended_ct("lower_body", "lower_body")
    fov = [n * s for n, s in zip(rec_size, rec_spacing, strict=True)]  # 430 x 430 x 280 mm
    dim = (35, 86, 86)  # z, y, x
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = fov[2] / 35, fov[1] / 86, fov[0] / 86, 1.0
    _pair(tmp_path, "c0", np.zeros(dim, np.uint8), affine, _ct(dim), affine)
    req = _request(tmp_path, size=(32, 32, 32), spacing=(4.0, 4.0, 8.0), top="lower_body", bottom="lower_body",
                   policy={"out_of_range": "refuse"})  # fmt: skip
    own, _ = load_user_masks(req.mask_folder, "mask_folder")
    assert own.masks[0].dim == (86, 86, 35)
    wrong = np.zeros((4, 4))
    wrong[0, 0], wrong[1, 1], wrong[2, 2], wrong[3, 3] = fov[2] / 35, fov[1] / 86, fov[0] / 86, 1.0  # really 280 mm wide
    _pair(tmp_path, "c0", np.zeros(dim, np.uint8), wrong, _ct(dim), wrong)
    with pytest.raises(RequestError, match="field of view"):
        _request(tmp_path, size=(32, 32, 32), spacing=(4.0, 4.0, 8.0), top="lower_body", bottom="lower_body",
                 policy={"out_of_range": "refuse"})  # fmt: skip


def test_recommended_fields_of_view_are_nvidias_table():
    """:data:`RECOMMENDED_CT` is the table of NVIDIA's ``docs/inference.md`` ("Recommended Spacing for CT")."""
    doc = NVIDIA_REFERENCE / "docs" / "inference.md"
    if not doc.is_file():
        pytest.skip(f"NVIDIA's reference docs are not at {doc}: no oracle to compare with")
    section = doc.read_text().split("## Recommended Spacing for CT", 1)[1].split("\n## ", 1)[0]
    names = {"head": "head_neck", "chest": "chest", "abdomen": "abdomen", "lower": "lower_body"}
    table = {}
    for regions, size, spacing in re.findall(r"^\| \[([^\]]*)\] \| [^|]* \| \[([^\]]*)\] \| \[([^\]]*)\] \|$", section, re.M):
        key = tuple(names[r.strip().strip("'")] for r in regions.split(","))
        table[key] = (tuple(int(v) for v in size.split(",")), tuple(float(v) for v in spacing.split(",")))
    assert table == RECOMMENDED_CT
