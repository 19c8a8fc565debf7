"""Tests of the procedural CT phantom: planning, determinism, regions, anatomy, HU and NIfTI output."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.labels import BODY, label_id, maisi_labels
from maisi.core.seeds import derive_seed
from maisi.prepare.regions import regions_from_label
from maisi.sources.phantom.spec import REGION_PAIRS, PhantomOptions, PhantomSpec, plan_phantom_cases
from maisi.sources.phantom.writing import generate_phantom, write_phantom_case

#: Coarse voxels keep the whole file fast; the anatomy does not depend on the spacing.
COARSE = PhantomOptions(n_cases=8, seed=5, spacing_xy=(5.0, 5.5), spacing_z=(6.0, 7.0))


@pytest.fixture(scope="module")
def coarse_cases():
    """The 8 region pairs, generated once at coarse spacing."""
    return [(spec, *generate_phantom(spec)) for spec in plan_phantom_cases(COARSE)]


@pytest.fixture(scope="module")
def whole_body():
    """A head-to-thigh case at moderate spacing (case 6 is head_neck -> lower_body)."""
    spec = plan_phantom_cases(PhantomOptions(n_cases=7, seed=1, spacing_xy=(4.0, 4.0), spacing_z=(5.0, 5.0)))[6]
    assert (spec.top_region, spec.bottom_region) == ("head_neck", "lower_body")
    return (spec, *generate_phantom(spec))


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(img.dataobj), img.affine


def _centroid_world(label: np.ndarray, affine: np.ndarray, idx: int) -> np.ndarray:
    ijk = np.argwhere(label == idx)
    assert len(ijk), f"label {idx} absent"
    return (affine @ np.append(ijk.mean(0), 1.0))[:3]


# -- seeds, options and planning --------------------------------------------------------------------


def test_derive_seed_is_stable_and_in_range():
    # fixed values: a change here would silently change every generated data set
    assert derive_seed(0, "phantom", 0) == 821832083
    assert derive_seed(7, "a", 1, "b") == 2014736774
    seeds = {derive_seed(s, "src", i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(0, "1") != derive_seed(0, 1)
    assert derive_seed(0, "a", "b") != derive_seed(0, "ab")


def test_from_config_accepts_fields_and_ignores_type():
    opts = PhantomOptions.from_config({"type": "phantom", "n_cases": 3, "seed": 9, "spacing_xy": [3, 3.5], "noise_hu": 0})
    assert opts == PhantomOptions(n_cases=3, seed=9, spacing_xy=(3.0, 3.5), noise_hu=0.0)
    assert isinstance(opts.spacing_xy, tuple)
    assert PhantomOptions.from_config({}) == PhantomOptions()


def test_from_config_rejects_unknown_key_by_name():
    with pytest.raises(ValueError, match="spacing_zz"):
        PhantomOptions.from_config({"type": "phantom", "spacing_zz": [1, 2]})


@pytest.mark.parametrize(
    "cfg,key",
    [({"spacing_z": [5, 1]}, "spacing_z"), ({"spacing_xy": [0, 1]}, "spacing_xy"), ({"n_cases": -1}, "n_cases"), ({"noise_hu": -2}, "noise_hu")],
)
def test_from_config_rejects_invalid_values(cfg, key):
    with pytest.raises(ValueError, match=key):
        PhantomOptions.from_config(cfg)


def test_plan_is_deterministic_and_prefix_stable():
    opts = PhantomOptions(n_cases=8, seed=11)
    first = plan_phantom_cases(opts)
    assert plan_phantom_cases(opts) == first
    assert plan_phantom_cases(dataclasses.replace(opts, n_cases=9))[:8] == first
    assert plan_phantom_cases(dataclasses.replace(opts, seed=12)) != first
    assert [s.seed for s in plan_phantom_cases(opts, source="other")] != [s.seed for s in first]
    assert [s.case_id for s in first] == [f"phantom_{i:04d}" for i in range(8)]
    assert len({s.seed for s in first}) == 8


def test_plan_specs_are_json_serialisable_and_in_range():
    opts = PhantomOptions(n_cases=16, seed=2)
    for spec in plan_phantom_cases(opts):
        back = PhantomSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(json.dumps(dataclasses.asdict(spec))).items()})
        assert back == spec
        sx, sy, sz = spec.spacing
        assert sx == sy and opts.spacing_xy[0] <= sx <= opts.spacing_xy[1]
        assert opts.spacing_z[0] <= sz <= opts.spacing_z[1]
        assert all(0.85 <= f <= 1.15 for f in spec.body_scale)
        fov = spec.shape[0] * sx
        assert 380 - sx <= fov <= 500 + sx and spec.shape[0] == spec.shape[1]
        assert spec.shape[2] >= 2 and all(isinstance(f, bool) for f in spec.flip)
    assert any(any(s.flip) for s in plan_phantom_cases(opts)), "some cases should be stored with flipped axes"


def test_region_pairs_cover_every_region_as_top_and_bottom():
    specs = plan_phantom_cases(PhantomOptions(n_cases=8))
    assert {s.top_region for s in specs} == set(BODY_REGIONS)
    assert {s.bottom_region for s in specs} == set(BODY_REGIONS)
    assert [(s.top_region, s.bottom_region) for s in specs] == list(REGION_PAIRS)
    for top, bottom in REGION_PAIRS:
        assert BODY_REGIONS.index(top) <= BODY_REGIONS.index(bottom)


# -- generated cases ----------------------------------------------------------------------------------


def test_region_rule_recovers_the_planned_regions(coarse_cases):
    for spec, _, label, _ in coarse_cases:
        found = regions_from_label(label)
        assert (found.top, found.bottom) == (spec.top_region, spec.bottom_region), spec.case_id


@pytest.mark.parametrize("seed", [101, 202])
def test_region_rule_holds_for_other_seeds(seed):
    opts = PhantomOptions(n_cases=8, seed=seed, spacing_xy=(8.0, 8.0), spacing_z=(8.0, 10.0))
    for spec in plan_phantom_cases(opts):
        found = regions_from_label(generate_phantom(spec)[1])
        assert (found.top, found.bottom) == (spec.top_region, spec.bottom_region), spec


def test_arrays_match_spec_and_use_valid_label_ids(coarse_cases):
    valid = set(maisi_labels().values()) | {0}
    for spec, hu, label, affine in coarse_cases:
        assert hu.shape == label.shape == spec.shape
        assert hu.dtype == np.int16 and label.dtype == np.uint8
        assert affine.shape == (4, 4) and affine.dtype == np.float64
        assert hu.min() >= -1024 and hu.max() <= 3071
        ids = set(np.unique(label).tolist())
        assert ids <= valid, ids - valid
        assert BODY in ids and 0 in ids
        np.testing.assert_allclose(nib.affines.voxel_sizes(affine), spec.spacing)


def test_generation_is_deterministic():
    spec = plan_phantom_cases(COARSE)[0]
    hu1, lab1, aff1 = generate_phantom(spec)
    hu2, lab2, aff2 = generate_phantom(spec)
    assert np.array_equal(hu1, hu2) and np.array_equal(lab1, lab2) and np.array_equal(aff1, aff2)
    other = dataclasses.replace(spec, seed=spec.seed + 1)
    hu3, lab3, _ = generate_phantom(other)
    assert not np.array_equal(hu1, hu3)
    assert not np.array_equal(lab1, lab3)


def test_hu_values_are_ct_like(whole_body):
    spec, hu, label, _ = whole_body

    def median(*names):
        ids = [label_id(n) for n in names]
        values = hu[np.isin(label, ids)]
        assert values.size > 20, names
        return float(np.median(values))

    assert 40 <= median("liver") <= 80
    assert 30 <= median("spleen") <= 65
    assert 15 <= median("right kidney", "left kidney") <= 55
    assert 20 <= median("brain") <= 50
    assert 25 <= median("aorta") <= 65
    assert -10 <= median("bladder") <= 30
    assert median("left lung upper lobe", "right lung lower lobe", "right lung middle lobe") < -700
    assert median("trachea") < -300
    assert median("vertebrae T8", "vertebrae L3", "left femur", "right hip", "sacrum", "left rib 6") > 200
    assert median("skull") > 300
    # air outside the body, fat under the skin and soft tissue elsewhere in the body
    assert abs(float(np.median(hu[label == 0])) + 1000) < 20
    body = hu[label == BODY]
    assert (body < -60).mean() > 0.1, "expected subcutaneous and visceral fat"
    assert ((body > 20) & (body < 80)).mean() > 0.3, "expected muscle and soft tissue"


def test_anatomy_is_in_place_in_world_coordinates(whole_body):
    spec, hu, label, affine = whole_body
    lab, aff = _canonical(label, affine)
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    c = {name: _centroid_world(lab, aff, label_id(name)) for name in
         ("liver", "spleen", "right kidney", "left kidney", "heart", "brain", "bladder", "sternum", "vertebrae T6",
          "right lung upper lobe", "left lung upper lobe", "right femur", "left femur", "aorta")}
    # RAS+: +x is the patient's right, +y anterior, +z superior
    assert c["liver"][0] > c["spleen"][0] + 50
    assert c["right kidney"][0] > 0 > c["left kidney"][0]
    assert c["right lung upper lobe"][0] > 0 > c["left lung upper lobe"][0]
    assert c["right femur"][0] > 0 > c["left femur"][0]
    assert c["heart"][0] < 0, "the heart lies left of the midline"
    assert c["sternum"][1] > c["heart"][1] > c["vertebrae T6"][1]
    assert c["brain"][2] > c["heart"][2] > c["liver"][2] > c["bladder"][2] > c["right femur"][2]
    # lungs sit above the liver, which sits under the right dome
    lungs = np.isin(lab, [label_id("right lung lower lobe")])
    z = aff[2, 3] + aff[2, 2] * np.arange(lab.shape[2])
    assert z[np.nonzero(lungs.any((0, 1)))[0]].min() > z[np.nonzero((lab == label_id("liver")).any((0, 1)))[0]].min()


def test_noise_free_background_is_air():
    spec = dataclasses.replace(plan_phantom_cases(COARSE)[5], noise_hu=0.0)
    hu, label, _ = generate_phantom(spec)
    assert np.all(hu[0, 0, :] == -1000) and np.all(hu[:, -1, :][label[:, -1, :] == 0] == -1000)


def test_flips_keep_world_positions_and_files_round_trip(tmp_path):
    base = plan_phantom_cases(COARSE)[2]
    plain = dataclasses.replace(base, flip=(False, False, False))
    flipped = dataclasses.replace(base, flip=(True, True, True))
    loaded = {}
    for name, spec in (("plain", plain), ("flipped", flipped)):
        img_path, lab_path = tmp_path / f"{name}_img.nii.gz", tmp_path / name / "lab.nii.gz"
        meta = write_phantom_case(spec, img_path, lab_path)
        assert meta["case_id"] == spec.case_id and meta["seed"] == spec.seed
        assert meta["shape"] == list(spec.shape) and meta["spacing"] == list(spec.spacing)
        assert (meta["top_region"], meta["bottom_region"]) == (spec.top_region, spec.bottom_region)
        assert label_id("liver") in meta["label_ids"] and all(isinstance(i, int) for i in meta["label_ids"])
        json.dumps(meta)
        img, lab = nib.load(img_path), nib.load(lab_path)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.header.get_zooms(), spec.spacing, rtol=1e-5)
        np.testing.assert_allclose(img.affine, lab.affine)
        assert meta["orientation"] == "".join(nib.aff2axcodes(img.affine))
        loaded[name] = (img, lab)
    assert nib.aff2axcodes(loaded["plain"][0].affine) == ("R", "A", "S")
    assert nib.aff2axcodes(loaded["flipped"][0].affine) == ("L", "P", "I")
    # on disk the arrays differ, in world space they are the same
    raw_plain, raw_flipped = (np.asarray(loaded[k][1].dataobj) for k in ("plain", "flipped"))
    assert not np.array_equal(raw_plain, raw_flipped)
    canon = {k: [nib.as_closest_canonical(x) for x in v] for k, v in loaded.items()}
    for i in range(2):
        np.testing.assert_allclose(canon["plain"][i].affine, canon["flipped"][i].affine, atol=1e-4)
        assert np.array_equal(np.asarray(canon["plain"][i].dataobj), np.asarray(canon["flipped"][i].dataobj))
    lab_c, aff_c = np.asarray(canon["flipped"][1].dataobj), canon["flipped"][1].affine
    assert _centroid_world(lab_c, aff_c, label_id("liver"))[0] > _centroid_world(lab_c, aff_c, label_id("spleen"))[0]
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "flipped_img.nii.gz", "lab.nii.gz", "lab.nii.gz", "plain_img.nii.gz"
    ]


def test_invalid_spec_is_rejected():
    spec = plan_phantom_cases(COARSE)[0]
    with pytest.raises(ValueError, match="below"):
        generate_phantom(dataclasses.replace(spec, top_region="abdomen", bottom_region="chest"))
    with pytest.raises(ValueError, match="region"):
        generate_phantom(dataclasses.replace(spec, top_region="pelvis"))
