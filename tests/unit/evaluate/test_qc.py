"""Quality control: MAISI's organ HU ranges, the added structural checks, and the QC tables and figures."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from helpers.config import validated
from helpers.volumes import write_nifti
from scipy import ndimage

from maisi.core.anatomy import body_mask
from maisi.core.checks import ConfigError, InputError
from maisi.evaluate.qc import (
    BONE_CAP_HU,
    ORGAN_GROUPS,
    REFERENCE_VERSION,
    STRUCTURE,
    QCResult,
    QCSettings,
    body_structure,
    build_reference,
    check_case,
    check_files,
    intensity_profile,
    intensity_ranges,
    load_reference,
    organ_groups,
    organ_medians,
    read_reference,
    reference_ranges,
)
from maisi.evaluate.qc_check import verdict_columns
from maisi.evaluate.qc_report import (
    assess_generated,
    plot_generated_vs_real,
    plot_hu_histograms,
    reference_record,
    reference_table,
)

SHAPE = (24, 24, 16)


def phantom(liver_hu=60.0, spleen_hu=45.0, lung_hu=-850.0, bone_hu=400.0, seed=0):
    """A small body (soft tissue) holding liver, spleen, a lung lobe and a vertebra, with noise."""
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000.0, np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    hu[2:22, 2:22, :] = 20.0
    lab[2:22, 2:22, :] = 200
    for (sl, value, idx) in (
        ((slice(4, 10), slice(4, 10), slice(2, 14)), liver_hu, 1),
        ((slice(14, 19), slice(4, 9), slice(2, 14)), spleen_hu, 3),
        ((slice(4, 12), slice(13, 20), slice(2, 14)), lung_hu, 28),
        ((slice(14, 18), slice(14, 18), slice(2, 14)), bone_hu, 36),
    ):
        hu[sl] = value
        lab[sl] = idx
    hu += rng.normal(0, 8, SHAPE).astype(np.float32)
    hu[lab == 0] = -1000.0
    return hu, lab


def test_organ_groups_follow_maisi():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0, 0, 0], lab[0, 0, 1], lab[0, 0, 2], lab[0, 0, 3] = 5, 14, 30, 36  # both kidneys, a lobe, a vertebra
    lab[1, 0, 0], lab[1, 0, 1], lab[1, 0, 2], lab[1, 0, 3] = 115, 200, 2, 64  # heart, body, placeholder, a rib
    groups = organ_groups(lab)
    assert groups["kidney"] == (5, 14) and groups["lung"] == (30,) and groups["bone"] == (36, 64)
    assert groups["heart"] == (115,)
    assert "body" not in groups and not any(k.startswith("dummy") for k in groups)
    assert {93, 94, 120, 97, 122}.issubset(ORGAN_GROUPS["bone"]) and 114 not in ORGAN_GROUPS["bone"]  # cartilage is not bone


def test_reference_ranges_closed_form():
    medians = {"liver": [50.0, 60.0, 70.0, 80.0], "bone": [600.0, 900.0, 1200.0, 300.0], "spleen": [40.0, 41.0]}
    groups = {"liver": (1,), "bone": ORGAN_GROUPS["bone"], "spleen": (3,)}
    ranges = reference_ranges(medians, groups, min_cases=3)
    v = np.array(medians["liver"])
    assert ranges["liver"].low == pytest.approx(min(v.mean() - 3 * v.std(), np.percentile(v, 0.5)))
    assert ranges["liver"].high == pytest.approx(max(v.mean() + 3 * v.std(), np.percentile(v, 99.5)))
    assert ranges["liver"].low == pytest.approx(65 - 3 * np.std(v))
    assert ranges["bone"].high == BONE_CAP_HU and ranges["bone"].low < 300
    assert "spleen" not in ranges  # two cases: spread unknown
    # with one outlier the percentiles, not mean +- 3 sd, can set the bound
    wide = reference_ranges({"liver": [0.0] * 50 + [1000.0]}, {"liver": (1,)}, min_cases=3)["liver"]
    assert wide.high == pytest.approx(np.percentile([0.0] * 50 + [1000.0], 99.5))
    # the half-width floor: a phantom's near-constant organ gets mean -/+ 40 HU; a wide range keeps MAISI's bounds
    flat = reference_ranges({"liver": [60.0, 61.0, 62.0]}, {"liver": (1,)}, min_halfwidth=40.0)["liver"]
    assert (flat.low, flat.high) == pytest.approx((21.0, 101.0))
    assert reference_ranges({"liver": [60.0, 61.0, 62.0]}, {"liver": (1,)})["liver"].high < 64
    floored = reference_ranges(medians, groups, min_cases=3, min_halfwidth=40.0)
    assert (floored["liver"].low, floored["liver"].high) == pytest.approx((25.0, 105.0))  # 3 sd = 33.5 HU: the floor decides
    assert (floored["bone"].low, floored["bone"].high) == pytest.approx((ranges["bone"].low, BONE_CAP_HU))  # 3 sd = 1006 HU


def test_build_reference_from_cases(tmp_path):
    rows = []
    for i, liver in enumerate((50.0, 60.0, 70.0, 65.0)):
        hu, lab = phantom(liver_hu=liver, seed=i)
        rows.append({"case_id": f"c{i}", "image_hu": str(write_nifti(tmp_path / f"i{i}.nii.gz", hu.astype(np.int16))),
                     "image": "", "label": str(write_nifti(tmp_path / f"l{i}.nii.gz", lab))})  # fmt: skip
    ref = build_reference(rows, QCSettings(min_reference_cases=3), progress=False)
    assert ref["n_cases"] == 4 and set(ref["ranges"]) == {"liver", "spleen", "lung", "bone"}
    liver = ref["ranges"]["liver"]
    assert liver["n"] == 4 and abs(liver["mean"] - 61.25) < 2
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(reference_record(ref)), encoding="utf-8")
    ranges = read_reference(path)
    assert ranges["lung"].contains(-850) and not ranges["lung"].contains(40)
    table = reference_table(ref, tmp_path / "ranges.tsv")
    assert list(table[table.measure == "median HU"].organ) == ["bone", "liver", "lung", "spleen"]
    shares = ["body", "air", "fat", "soft tissue", "bone", "body_largest_share", "body_extent_z", "body_solidity"]
    assert list(table[table.measure == "share"].organ) == shares
    assert set(load_reference(path).intensity) == set(shares)
    for version in (0, REFERENCE_VERSION - 1):  # a reference of an older format (version 2: no body structure) is refused
        path.write_text(json.dumps(dict(ref, version=version)), encoding="utf-8")
        with pytest.raises(InputError, match=f"version {version} is not {REFERENCE_VERSION}; rebuild it"):
            read_reference(path)


@pytest.fixture
def ranges(tmp_path):
    rows = []
    for i, liver in enumerate((50.0, 60.0, 70.0)):  # real cases vary in every organ
        hu, lab = phantom(liver_hu=liver, spleen_hu=35.0 + 10 * i, lung_hu=-870.0 + 20 * i, bone_hu=380.0 + 20 * i, seed=i)
        rows.append({"case_id": f"c{i}", "image_hu": str(write_nifti(tmp_path / f"r{i}.nii.gz", hu.astype(np.int16))),
                     "label": str(write_nifti(tmp_path / f"rl{i}.nii.gz", lab))})  # fmt: skip
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(build_reference(rows, QCSettings(), progress=False)), encoding="utf-8")
    return read_reference(path)


def test_check_case_passes_and_fails_with_reasons(ranges):
    settings = QCSettings()
    hu, lab = phantom(liver_hu=62.0, seed=9)
    good = check_case(hu, lab, ranges, settings)
    assert good.passed and good.reasons == [] and abs(good.medians["liver"] - 62) < 3
    hu, lab = phantom(liver_hu=400.0, seed=9)
    bad = check_case(hu, lab, ranges, settings)
    assert not bad.passed and len(bad.reasons) == 1 and bad.reasons[0].startswith("liver: median")
    assert not check_case(hu, lab, ranges, QCSettings(check_organs=False)).reasons  # structural checks only


def test_organs_checked_are_maisis_seven_unless_all(ranges):
    hu, lab = phantom(liver_hu=62.0, seed=9)
    heart = lab == 200  # the body around the organs becomes a heart at 500 HU
    lab, hu = np.where(heart, 115, lab), np.where(heart, 500.0, hu).astype(np.float32)
    with_heart = {**ranges, **reference_ranges({"heart": [30.0, 35.0, 40.0]}, {"heart": (115,)}, min_halfwidth=40.0)}
    maisi = check_case(hu, lab, with_heart, QCSettings())
    assert maisi.passed and maisi.medians["heart"] == 500.0  # measured and reported, not judged
    every = check_case(hu, lab, with_heart, QCSettings(organs="all"))
    assert not every.passed and every.reasons == ["heart: median 500.0 HU outside [-5.0, 75.0]"]


def test_structural_checks(ranges):
    settings = QCSettings()
    hu, lab = phantom(seed=3)
    nan = hu.copy()
    nan[5, 5, 5] = np.nan
    assert check_case(nan, lab, ranges, settings).reasons == ["1 NaN voxels"]
    hot = hu.copy()
    hot[12, 12, 8] = 4000.0
    assert any("outside [-1024, 3071]" in r for r in check_case(hot, lab, ranges, settings).reasons)
    assert "grid" in check_case(hu, lab[:, :, :-1], ranges, settings).reasons[0]
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    moved = shifted.copy()
    moved[0, 3] = 10
    assert "affine" in check_case(hu, lab, ranges, settings, (shifted, moved)).reasons[0]
    outside = lab.copy()
    outside[0:2, 0:2, :] = 3  # spleen label in the air around the body
    reasons = check_case(hu, outside, ranges, settings).reasons
    assert any(r.startswith("spleen:") and "inside the body" in r for r in reasons)


def test_check_files_names_a_corrupt_file(tmp_path, ranges):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    hu, lab = phantom()
    label = write_nifti(tmp_path / "l.nii.gz", lab)
    result = check_files(bad, label, ranges, QCSettings())
    assert not result.passed and str(bad) in result.reasons[0]


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'qc'.*max_attemps"):
        validated(qc={"max_attemps": 2})
    with pytest.raises(ConfigError, match="qc.on_fail"):
        validated(qc={"on_fail": "drop"})
    with pytest.raises(ValueError, match="qc.on_fail"):
        QCSettings(on_fail="drop")
    s = QCSettings.from_config(validated(qc={"hu_range": [-1000, 2000], "on_fail": "flag"}))
    assert s.hu_range == (-1000.0, 2000.0) and QCSettings.from_json(s.to_json()) == s
    assert "on_fail" not in s.check_json()


def test_organ_medians_ignore_tiny_organs():
    hu, lab = phantom()
    lab[0, 0, 0] = 4  # one pancreas voxel
    assert "pancreas" not in organ_medians(hu, lab, min_voxels=20)
    assert "pancreas" in organ_medians(hu, lab, min_voxels=1)


def test_assess_generated_tables_and_figures(tmp_path, ranges):
    rows = []
    for i, (liver, status) in enumerate(((60.0, "ok"), (500.0, "ok"), (60.0, "failed"))):
        hu, lab = phantom(liver_hu=liver, seed=20 + i)
        rows.append({"request": "r", "case_id": f"r_{i:05d}", "status": status, "reason": "no mask" if status == "failed" else "",
                     "attempt": "1", "image": str(write_nifti(tmp_path / f"g{i}.nii.gz", hu.astype(np.int16))),
                     "label": str(write_nifti(tmp_path / f"gl{i}.nii.gz", lab)), "spacing": "[2.0, 2.0, 3.0]"})  # fmt: skip
        verdict = check_files(rows[-1]["image"], rows[-1]["label"], ranges, QCSettings()) if status == "ok" else QCResult(False, ["no mask"])
        rows[-1].update(verdict_columns(verdict))
    generated = pd.DataFrame(rows)
    for on_fail, expected in (("exclude", ["include", "excluded", "excluded"]), ("flag", ["include", "flagged", "excluded"])):
        cases, organs = assess_generated(generated, ranges, QCSettings(on_fail=on_fail), tmp_path / "c.tsv", tmp_path / "o.tsv")
        assert list(cases.release) == expected
    assert list(cases.qc_status) == ["pass", "fail", "fail"] and "liver: median" in cases.qc_reasons[1]
    assert cases.qc_reasons[2] == "no mask" and list(cases.image) == [r["image"] for r in rows]
    liver = organs.set_index("organ").loc["liver"]
    assert liver.n_cases == 2 and liver.n_pass == 1 and liver.pass_rate == 0.5
    assert organs.set_index("organ").loc["spleen"].pass_rate == 1.0
    real = pd.DataFrame([{"case_id": f"real{i}", "image_hu": r["image"], "image": "", "label": r["label"], "spacing": r["spacing"]}
                         for i, r in enumerate(rows[:2])])  # fmt: skip
    plot_hu_histograms(generated, real, ranges, tmp_path / "h.png")
    plot_generated_vs_real(generated, real, tmp_path / "m.png")
    from PIL import Image

    for name in ("h.png", "m.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200 and len(set(im.convert("L").getdata())) > 10


def test_real_chest_ct_passes_structural_checks_and_its_own_range(real_ct, tmp_path):
    """A real CT (pyradiomics lung1) with its lesion mask as MAISI's lung tumour: within CT's HU range,
    lesion inside the body; a copy shifted far above CT's range fails."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(real_ct / "lung1_image.nrrd"))
    hu = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(real_ct / "lung1_label.nrrd"))).transpose(2, 1, 0)
    lab = np.where(lesion > 0, 23, 0).astype(np.uint8)
    median = float(np.median(hu[lab == 23]))
    ranges = reference_ranges({"lung tumor": [median - 30, median, median + 30]}, {"lung tumor": (23,)})
    result = check_case(hu, lab, ranges, QCSettings())
    assert result.passed, result.reasons
    assert -200 < result.medians["lung tumor"] < 200  # a soft-tissue lesion
    result = check_case(hu + 3500, lab, ranges, QCSettings())
    assert not result.passed and any("outside [-1024, 3071]" in r for r in result.reasons)


# --------------------------------------------------------------------------- NVIDIA's statistics


def _nvidia_case():
    """Body with liver (inside NVIDIA's range), lung lobes 28-31 at -850 HU and lobe 32 at +300 HU (NVIDIA's
    list omits 32: its lung median stays normal, MAISI's grouping would make it an outlier), bone at 800 HU
    (inside NVIDIA's [.., 1000], above the range the factory's own rule gives on NVIDIA's statistics)."""
    hu = np.full((40, 40, 40), -1000.0, np.float32)
    lab = np.zeros(hu.shape, np.int32)
    hu[2:38, 2:38, 2:38], lab[2:38, 2:38, 2:38] = 40.0, 200
    hu[4:12, 4:20, 4:20], lab[4:12, 4:20, 4:20] = 60.0, 1
    for k, lobe in enumerate((28, 29, 30, 31)):
        hu[14:30, 4 + 4 * k : 8 + 4 * k, 4:14], lab[14:30, 4 + 4 * k : 8 + 4 * k, 4:14] = -850.0, lobe
    hu[14:36, 22:36, 4:36], lab[14:36, 22:36, 4:36] = 300.0, 32
    hu[4:12, 22:30, 22:30], lab[4:12, 22:30, 22:30] = 800.0, 35
    return hu, lab


def test_nvidia_reference_follows_nvidias_rules_and_verdicts(tmp_path):
    from helpers.nvidia import nvidia_config, nvidia_module

    from maisi.evaluate.qc import NVIDIA_GROUPS, nvidia_reference

    stats_path = nvidia_config("image_median_statistics_ct.json")
    stats = json.loads(stats_path.read_text())
    record = nvidia_reference(stats_path)
    (tmp_path / "reference.json").write_text(json.dumps(record))
    reference = load_reference(tmp_path / "reference.json")
    ranges, groups = reference.ranges, reference.groups
    assert set(ranges) == set(stats) and groups["lung"] == (28, 29, 30, 31)
    assert ranges["bone"].high == 1000.0 and ranges["liver"].low == min(stats["liver"]["sigma_6_low"], stats["liver"]["percentile_0_5"])
    # The factory's own rule on the same statistics would cap bone well below 1000 HU.
    assert max(stats["bone"]["sigma_6_high"], stats["bone"]["percentile_99_5"]) < 800.0

    hu, lab = _nvidia_case()
    label_int_dict = {k: list(v) for k, v in NVIDIA_GROUPS.items()}
    theirs = nvidia_module("quality_check").is_outlier(stats, hu, lab, label_int_dict)
    ours = check_case(hu, lab, ranges, QCSettings(min_voxels=1), groups=groups)
    failed = {r.split(":")[0] for r in ours.reasons}
    for organ, verdict in theirs.items():
        if verdict["median_value"] is not None:
            assert ours.medians[organ] == pytest.approx(verdict["median_value"])
            assert (organ in failed) == bool(verdict["is_outlier"]), organ
    assert not theirs["lung"]["is_outlier"] and not theirs["bone"]["is_outlier"]
    # MAISI's grouping (lobe 32 in the lung) on the same case: the lung fails.
    assert "lung" in {r.split(":")[0] for r in check_case(hu, lab, ranges, QCSettings(min_voxels=1)).reasons}


def test_nvidia_reference_needs_the_statistics_file(tmp_path):
    with pytest.raises(ConfigError, match="qc.nvidia_statistics"):
        validated(qc={"reference": "nvidia"})
    bad = tmp_path / "stats.json"
    bad.write_text(json.dumps({"heart": {"sigma_6_low": 0}}))
    from maisi.evaluate.qc import nvidia_reference

    with pytest.raises(InputError, match="stats.json"):
        nvidia_reference(bad)


# --------------------------------------------------------------------------- the intensity check: no free pass


@pytest.fixture(scope="module")
def phantom_intensity():
    """Intensity ranges from six procedural phantom cases (coarse voxels, every body region), and two held-out cases."""
    from maisi.sources.phantom.spec import PhantomOptions, plan_phantom_cases
    from maisi.sources.phantom.writing import generate_phantom

    specs = plan_phantom_cases(PhantomOptions(n_cases=8, seed=3, spacing_xy=(5.0, 5.5), spacing_z=(6.0, 7.0)))
    cases = [(hu.astype(np.float32), lab, affine) for hu, lab, affine in map(generate_phantom, specs)]
    profiles = {f"c{i}": intensity_profile(hu, body_mask(hu)) for i, (hu, _, _) in enumerate(cases[:6])}
    return intensity_ranges(profiles), cases[6:]


def test_intensity_check_passes_held_out_phantoms_and_fails_noise_constant_and_empty(phantom_intensity):
    intensity, held_out = phantom_intensity
    settings = QCSettings()
    assert set(intensity) == {"body", "air", "fat", "soft tissue", "bone"}
    for hu, lab, _ in held_out:
        result = check_case(hu, lab, {}, settings, intensity=intensity)
        assert result.passed, result.reasons
        assert result.checks == ["structure", "intensity", "inside body", "organ HU"]
        blank = np.zeros_like(lab)  # an image-only case: no organ in its label map, the intensity check only
        assert check_case(hu, blank, {}, settings, intensity=intensity).checks == ["structure", "intensity"]

    hu, _, _ = held_out[0]
    blank = np.zeros(hu.shape, np.uint8)
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1000, 1000, hu.shape).astype(np.float32)
    assert check_case(noise, blank, {}, settings).passed  # the free pass an image-only case had without this check
    reasons = check_case(noise, blank, {}, settings, intensity=intensity).reasons
    assert any(r.startswith("the body fills") for r in reasons) and any(r.startswith("bone band (>= 200 HU)") for r in reasons), reasons

    constant = np.full(hu.shape, 40.0, np.float32)
    reasons = check_case(constant, blank, {}, settings, intensity=intensity).reasons
    assert "the body fills 100.0% of the volume" in reasons[0] and reasons[1].startswith("soft tissue band (-30 to 200 HU): 100.0%"), reasons

    empty = np.full(hu.shape, -1000.0, np.float32)
    assert check_case(empty, blank, {}, settings, intensity=intensity).reasons == ["no body: no voxel above -500 HU"]

    # The body's outline kept, its inside replaced by noise: only the bands can tell.
    body = body_mask(hu)
    scrambled = np.where(body, rng.uniform(-400, 1000, hu.shape), -1000.0).astype(np.float32)
    reasons = check_case(scrambled, blank, {}, settings, intensity=intensity).reasons
    assert reasons and all(" band " in r for r in reasons), reasons


def test_intensity_ranges_follow_maisis_rule_on_shares():
    profiles = {f"c{i}": {"body": b, "air": a, "fat": 0.2, "soft tissue": 0.7 - a, "bone": 0.1}
                for i, (b, a) in enumerate(((0.30, 0.10), (0.40, 0.20), (0.35, 0.00)))}  # fmt: skip
    ranges = intensity_ranges(profiles, min_cases=3)
    v = np.array([0.30, 0.40, 0.35])
    assert ranges["body"].low == pytest.approx(v.mean() - 3 * v.std()) and ranges["body"].high == pytest.approx(v.mean() + 3 * v.std())
    assert ranges["air"].low == 0.0  # shares clipped to [0, 1]
    assert intensity_ranges(dict(list(profiles.items())[:2]), min_cases=3) == {}  # too few cases: unchecked


def test_image_only_case_checked_on_totalsegmentators_organs(tmp_path, phantom_intensity, monkeypatch):
    """With TotalSegmentator's weights configured, an image-only case's organs are found by its real code path
    (a tiny nnU-Net model whose classes follow HU: lung below -300, 'heart' to 300, vertebra T6 above) and checked."""
    import nibabel as nib
    import requests
    from helpers.tiny_totalseg import write_tiny_model

    from maisi.evaluate.qc_check import check_with_totalsegmentator
    from maisi.prepare.totalsegmentator import TotalSegSettings

    monkeypatch.setattr(requests.Session, "request", lambda *a, **k: None)  # no usage-statistics request leaves the test
    write_tiny_model(tmp_path / "weights", 297)
    segmenter = TotalSegSettings(weights=str(tmp_path / "weights"), home=str(tmp_path / "home"), device="cpu", keep_labels=False)
    _, held_out = phantom_intensity
    hu, _, affine = held_out[0]
    mid = hu.shape[2] // 2
    hu = hu[:, :, mid - 8 : mid + 8]  # a slab a little taller than the tiny model's 96 mm patch keeps the test short
    image, label = tmp_path / "case.nii.gz", tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), image)
    nib.save(nib.Nifti1Image(np.zeros(hu.shape, np.uint8), affine), label)
    groups = {"lung": (28,), "heart": (115,), "bone": ORGAN_GROUPS["bone"]}
    ranges = reference_ranges({"lung": [-900.0, -800.0, -700.0], "heart": [-200.0, 0.0, 100.0], "bone": [300.0, 500.0, 700.0]}, groups)
    first = check_files(image, label, ranges, QCSettings())
    assert first.passed and first.checks == ["structure"] and not first.medians  # nothing to check in the label map

    # The tiny model calls the blurred skin-air border lung (3 mm resampling): half of its "lung" lies outside the body.
    loose = QCSettings(min_inside_body=0.5)
    result = check_with_totalsegmentator(first, "case", image, tmp_path / "ts" / "case.nii.gz", segmenter, ranges, loose)
    assert result.passed, result.reasons
    assert result.checks == ["structure", "TotalSegmentator organs"] and {"lung", "heart", "bone"} <= set(result.medians)
    assert result.medians["lung"] < -700 and result.medians["bone"] > 300  # the phantom's lungs dark, its bone bright
    assert (tmp_path / "ts" / "case.nii.gz").is_file()

    narrow = {**ranges, "heart": dataclasses.replace(ranges["heart"], low=500.0, high=600.0)}
    passed = check_with_totalsegmentator(first, "case", image, tmp_path / "ts" / "case.nii.gz", segmenter, narrow, loose)
    assert passed.passed, passed.reasons  # the heart is not one of MAISI's seven QC organs
    everything = dataclasses.replace(loose, organs="all")
    failed = check_with_totalsegmentator(first, "case", image, tmp_path / "ts" / "case.nii.gz", segmenter, narrow, everything)
    assert not failed.passed and failed.reasons[0].startswith("TotalSegmentator heart: median")
    narrow = {**ranges, "lung": dataclasses.replace(ranges["lung"], low=500.0, high=600.0)}
    failed = check_with_totalsegmentator(first, "case", image, tmp_path / "ts" / "case.nii.gz", segmenter, narrow, loose)
    assert not failed.passed and failed.reasons[0].startswith("TotalSegmentator lung: median")

    thin = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(hu[:, :, :3].astype(np.int16), affine), thin)
    failed = check_with_totalsegmentator(first, "thin", thin, tmp_path / "ts" / "thin.nii.gz", segmenter, ranges, loose)
    assert not failed.passed and "TotalSegmentator: " in failed.reasons[0] and "scan too small" in failed.reasons[0]


# --------------------------------------------------------------------------- the one-body check: a body, not pieces

TRUNK_SHAPE = (64, 56, 40)


def _paint_trunk(hu, centre, axes, z=(0.0, 1.0), fat=0.3, lung=0.3, spine=0.15):
    """Paint a trunk into ``hu``: an elliptic cylinder of soft tissue (centre and semi-axes in the volume's [-1, 1]
    coordinates) over ``z`` (centre, half-height; (0, 1) is every slice) with a rim of fat (``fat``: its share of
    the squared radius), two lungs and a spine, all drawn in the trunk's own coordinates: its HU band shares do
    not depend on its size."""
    x, y, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in hu.shape], indexing="ij")
    u, v, w = (x - centre[0]) / axes[0], (y - centre[1]) / axes[1], (w - z[0]) / z[1]
    inside = (u**2 + v**2 < 1) & (np.abs(w) <= 1)
    hu[inside] = 40.0
    hu[inside & (u**2 + v**2 > 1 - fat)] = -100.0
    hu[inside & (((np.abs(u) - 0.45) / lung) ** 2 + (v / 0.5) ** 2 + ((w - 0.2) / 0.9) ** 2 < 1)] = -850.0
    hu[inside & ((u / spine) ** 2 + ((v + 0.7) / spine) ** 2 < 1)] = 500.0
    return hu


def _with_noise(hu, seed):
    return np.clip(hu + np.random.default_rng(seed).normal(0, 15, hu.shape), -1024, 3071).astype(np.float32)


def _trunk(seed):
    """A trunk through every slice, its size, position, fat, lungs and spine drawn from ``seed``, with noise."""
    rng = np.random.default_rng(seed)
    hu = np.full(TRUNK_SHAPE, -1000.0, np.float32)
    centre, axes = rng.uniform(-0.05, 0.05, 2), (rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8))
    _paint_trunk(hu, centre, axes, fat=rng.uniform(0.2, 0.4), lung=rng.uniform(0.25, 0.35), spine=rng.uniform(0.12, 0.18))
    return _with_noise(hu, seed)


@pytest.fixture(scope="module")
def one_body(tmp_path_factory):
    """The reference built from six trunks of different size and build (the real cases), read from its file."""
    tmp = tmp_path_factory.mktemp("one_body")
    rows = []
    for i in range(6):
        hu = _trunk(i).astype(np.int16)
        lab = np.where(body_mask(hu), 200, 0).astype(np.uint8)
        rows.append({"case_id": f"t{i}", "image_hu": str(write_nifti(tmp / f"t{i}.nii.gz", hu)),
                     "label": str(write_nifti(tmp / f"tl{i}.nii.gz", lab))})  # fmt: skip
    record = build_reference(rows, QCSettings(), progress=False)
    (tmp / "reference.json").write_text(json.dumps(record), encoding="utf-8")
    return record, load_reference(tmp / "reference.json")


def test_body_structure_closed_form():
    hu = np.full((10, 10, 6), -1000.0, np.float32)
    hu[1:5, 1:5, :] = 40.0
    hu[3:5, 3:5, :] = -1000.0  # an L: 12 pixels whose hull cuts the missing corner's diagonal, 16 - 2
    hu[7:9, 7:9, :] = 40.0  # a second piece of 4 voxels a slice
    shape = body_structure(hu, body_mask(hu))
    assert shape == pytest.approx({"body_largest_share": 12 / 16, "body_extent_z": 1.0, "body_solidity": 12 / 14})
    hu[:, :, :2] = -1000.0
    assert body_structure(hu, body_mask(hu))["body_extent_z"] == pytest.approx(4 / 6)
    empty = np.full(hu.shape, -1000.0, np.float32)
    assert body_structure(empty, body_mask(empty)) == {}


def test_one_body_check_fails_blobs_a_slab_and_speckle(one_body):
    """A new trunk passes; the same tissue in four blobs, a trunk through the middle third of the slices and a
    trunk of scattered pieces fail, each on the feature that is off; the blobs and the slab pass the intensity
    check alone (QC before this check)."""
    record, reference = one_body
    limits = reference.intensity
    assert set(STRUCTURE) <= set(limits) and set(STRUCTURE) <= set(record["intensity"]["profiles"]["t0"])
    # every real trunk is one body through every slice: MAISI's rule gives [1, 1], widened by qc.min_halfwidth_share
    assert (limits["body_largest_share"].p005, limits["body_extent_z"].p005) == (1.0, 1.0)
    assert (limits["body_largest_share"].low, limits["body_extent_z"].low) == pytest.approx((0.98, 0.98))
    shares_only = {k: v for k, v in limits.items() if k not in STRUCTURE}
    settings = QCSettings()
    blank = np.zeros(TRUNK_SHAPE, np.uint8)

    def check(hu):
        """The verdict, the one-body reasons and the verdict of the intensity check alone."""
        result = check_case(hu, blank, {}, settings, intensity=limits)
        structure = [r for r in result.reasons if r.startswith(("not one body", "body extent", "body solidity"))]
        return result, structure, check_case(hu, blank, {}, settings, intensity=shares_only)

    result, _, _ = check(_trunk(10))  # (a) a body
    assert result.passed and result.checks == ["structure", "intensity", "one body"], result.reasons
    speck = _trunk(10)
    speck[1, 1, 1] = 40.0  # one stray voxel of tissue in the air is no second body
    assert body_structure(speck, body_mask(speck))["body_largest_share"] < 1.0
    result, _, _ = check(speck)
    assert result.passed, result.reasons

    blobs = np.full(TRUNK_SHAPE, -1000.0, np.float32)  # (b) four trunks' worth of tissue in blobs floating in air
    for centre, axes, z in (((0.5, 0.5), (0.46, 0.44), (0.0, 0.85)), ((-0.5, 0.5), (0.42, 0.42), (0.1, 0.7)),
                            ((0.5, -0.5), (0.42, 0.4), (-0.1, 0.7)), ((-0.5, -0.5), (0.4, 0.38), (0.0, 0.6))):  # fmt: skip
        _paint_trunk(blobs, centre, axes, z)
    result, structure, before = check(_with_noise(blobs, 1))
    assert before.passed and before.checks == ["structure", "intensity"], before.reasons  # the free pass it had
    assert not result.passed and structure == result.reasons, result.reasons
    share = body_structure(blobs, body_mask(blobs))["body_largest_share"]
    assert 0.3 < share < 0.4
    assert structure[0] == f"not one body: the largest connected part holds {100 * share:.1f}% of the tissue above -500 HU; real cases 98.0-100.0%"

    slab = np.full(TRUNK_SHAPE, -1000.0, np.float32)  # (c) a trunk through the middle third of the slices
    _paint_trunk(slab, (0.0, 0.0), (0.85, 0.75), (0.0, 1 / 3))
    result, structure, before = check(_with_noise(slab, 2))
    assert before.passed and not result.passed
    assert result.reasons == ["body extent along z: the body reaches 13 of 40 axial slices (32.5%); real cases 98.0-100.0%"]

    # (d) a trunk of scattered pieces: where a smooth random field is high, one connected piece (the others
    # dropped), so the share in the largest part and the extent stay those of a body
    field = ndimage.gaussian_filter(np.random.default_rng(3).standard_normal(TRUNK_SHAPE), (1.0, 1.0, 2.5))
    speckle = np.where(field > np.median(field), _trunk(11), -1000.0).astype(np.float32)
    parts, _ = ndimage.label(speckle > -500)
    speckle[(parts > 0) & (parts != np.argmax(np.bincount(parts.ravel())[1:]) + 1)] = -1000.0
    features = body_structure(speckle, body_mask(speckle))
    assert features["body_largest_share"] == 1.0 and features["body_extent_z"] == 1.0 and features["body_solidity"] < 0.5
    result, structure, _ = check(speckle)
    assert len(structure) == 1 and structure[0].startswith(f"body solidity: the body fills {100 * features['body_solidity']:.1f}%")
    assert structure[0].endswith(f"real cases {100 * limits['body_solidity'].low:.1f}-{100 * limits['body_solidity'].high:.1f}%")

    empty = np.full(TRUNK_SHAPE, -1000.0, np.float32)  # no body: the intensity check's one reason
    assert check(empty)[0].reasons == ["no body: no voxel above -500 HU"]


def test_one_body_check_needs_the_real_cases_profiles(one_body, tmp_path):
    """With NVIDIA's statistics the image-only ranges come from the real cases' record; without it neither runs."""
    from helpers.nvidia import nvidia_config

    from maisi.evaluate.qc import nvidia_reference

    record, _ = one_body
    hu = _trunk(10)
    lab = np.where(body_mask(hu), 200, 0).astype(np.uint8)
    lab[28:36, 20:30, 10:30] = 1  # a liver
    for intensity, checks in ((record["intensity"], ["structure", "intensity", "one body", "inside body", "organ HU"]),
                              (None, ["structure", "inside body", "organ HU"])):  # fmt: skip
        (tmp_path / "nvidia.json").write_text(json.dumps(nvidia_reference(nvidia_config("image_median_statistics_ct.json"), intensity)))
        reference = load_reference(tmp_path / "nvidia.json")
        result = check_case(hu, lab, reference.ranges, QCSettings(), groups=reference.groups, intensity=reference.intensity)
        assert result.checks == checks


@pytest.mark.parametrize("loo", range(6))
def test_one_body_check_passes_each_phantom_against_the_other_five(loo, phantom_bodies):
    """Every procedural phantom passes the one-body check (and the intensity check) with the ranges of the other
    five (leave one out). The six are two each of the head and neck, the legs, and head to legs: MAISI's rule on
    five cases gives a kind of body seen once no spread (a head alone then fails the shares as well)."""
    hu, lab, profiles = phantom_bodies[loo]
    limits = intensity_ranges({i: p for i, (_, _, p) in enumerate(phantom_bodies) if i != loo})
    assert set(STRUCTURE) <= set(limits)
    result = check_case(hu, lab, {}, QCSettings(), intensity=limits)
    assert result.passed and "one body" in result.checks, (profiles, result.reasons)


@pytest.fixture(scope="module")
def phantom_bodies():
    """Six phantom cases at the default spacing (2.5-4 mm in plane, 2.5-5 mm between slices): (HU, labels, profile)."""
    from maisi.sources.phantom.spec import PhantomOptions, plan_phantom_cases
    from maisi.sources.phantom.writing import generate_phantom

    specs = plan_phantom_cases(PhantomOptions(n_cases=16))
    out = []
    for i in (0, 8, 4, 12, 6, 14):  # cases i and i + 8 share their regions
        hu, lab, _ = generate_phantom(specs[i])
        hu = hu.astype(np.float32)
        body = body_mask(hu)
        out.append((hu, lab, {**intensity_profile(hu, body), **body_structure(hu, body)}))
    return out
