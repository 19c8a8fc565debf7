"""Mask database, MAISI's mask retrieval and the label-map augmentation."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.config import validated
from helpers.masks import (
    BLADDER,
    BODY,
    COLUMNS,
    HEPATIC_TUMOUR,
    LEFT_KIDNEY,
    LIVER,
    LUNG,
    RIGHT_KIDNEY,
    VERTEBRA,
    mask_affine,
    mask_row,
    phantom,
)
from scipy import ndimage

from maisi.core.checks import ConfigError
from maisi.core.io import save_nifti, sha256_file
from maisi.core.labels import label_id
from maisi.generate.augment import AugmentSettings, augment_mask, bone_labels, lr_swap_table
from maisi.generate.mask_database import (
    BONE_LESION,
    TUMOUR_LABELS,
    MaskEntry,
    MaskQuery,
    NoMaskError,
    build_mask_database,
    candidates,
    load_mask,
    mask_summary,
    rank_fallback,
    read_mask_database,
    select_mask,
    write_mask_database,
)
from maisi.generate.settings import GenerateSettings


@pytest.fixture()
def cases(tmp_path) -> pd.DataFrame:
    """a: tumours (32^3, 2 mm); b, d: liver+lung (32^3, 2 mm); c: kidneys, bladder at a corner (48^3, 1.5 mm); e: no label."""
    big = phantom(48, tumour=False, lesion=False)
    big[:3, :3, :3] = BLADDER
    rows = [
        mask_row(tmp_path, "d", phantom(32, tumour=False, lesion=False), (2.0, 2.0, 2.0), "abdomen", "abdomen"),
        mask_row(tmp_path, "a", phantom(32), (2.0, 2.0, 2.0), "chest", "abdomen"),
        mask_row(tmp_path, "b", phantom(32, tumour=False, lesion=False), (2.0, 2.0, 2.0), "chest", "abdomen", labels_present=False),
        mask_row(tmp_path, "c", big, (1.5, 1.5, 1.5), "abdomen", "abdomen"),
        mask_row(tmp_path, "e", None, (2.0, 2.0, 2.0), "chest", "chest"),
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(str)


@pytest.fixture()
def db(cases) -> list[MaskEntry]:
    return build_mask_database(cases)


def _by_id(entries) -> dict[str, MaskEntry]:
    return {e.case_id.split("/")[1]: e for e in entries}


# --------------------------------------------------------------------------------------------- database


def test_build_database(cases, db):
    assert [e.case_id for e in db] == ["src/a", "src/b", "src/c", "src/d"]  # sorted, e (no label) skipped
    a, b, c = _by_id(db)["a"], _by_id(db)["b"], _by_id(db)["c"]
    assert a.has_tumour and not b.has_tumour
    assert HEPATIC_TUMOUR in a.labels and BONE_LESION in a.labels
    # b's labels_present is empty: read from the map itself
    assert b.labels == tuple(sorted(int(v) for v in np.unique(nib.load(b.label).dataobj) if v))
    assert c.dim == (48, 48, 48) and c.spacing == (1.5, 1.5, 1.5)
    assert c.fov_mm == pytest.approx((72.0, 72.0, 72.0))
    assert c.sha256 == sha256_file(c.label)
    assert (c.top_region, c.bottom_region) == ("abdomen", "abdomen")
    summary = mask_summary(c)
    assert summary["case_id"] == "src/c" and summary["path"] == c.label and summary["sha256"] == c.sha256
    assert summary["dim"] == [48, 48, 48] and summary["spacing"] == [1.5, 1.5, 1.5]


def test_database_round_trip(tmp_path, db):
    dest = write_mask_database(db, tmp_path / "db" / "masks.json")
    data = json.loads(dest.read_text(encoding="utf-8"))
    assert data["provenance"]["step"] == "mask_database" and len(data["masks"]) == 4
    assert read_mask_database(dest) == db
    assert MaskEntry.from_json(json.loads(json.dumps(db[0].to_json()))) == db[0]


def test_missing_label_file(cases, tmp_path):
    missing = tmp_path / "labels" / "gone.nii.gz"
    cases.loc[0, "label"] = str(missing)
    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        build_mask_database(cases)


@pytest.mark.parametrize("text", ["{not json", '{"other": []}', '{"masks": [{"case_id": "x"}]}'])
def test_malformed_database(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        read_mask_database(path)


def test_query_validation():
    q = MaskQuery((32, 32, 32), (2.0, 2.0, 2.0), anatomy=("liver", 26, "1"))
    assert q.anatomy == (1, 26)
    with pytest.raises(ValueError, match="top_region"):
        MaskQuery((32, 32, 32), (2.0, 2.0, 2.0), top_region="legs")
    with pytest.raises(ValueError, match="size"):
        MaskQuery((32, 32), (2.0, 2.0, 2.0))


# --------------------------------------------------------------------------------------------- selection


def test_exact_candidates_and_seeded_choice(db):
    q = MaskQuery((32, 32, 32), (2.0, 2.0, 2.02), anatomy=(LIVER,))
    # a holds tumours that were not asked for; c is on another grid
    assert [e.case_id for e in candidates(db, q)] == ["src/b", "src/d"]
    picks = [select_mask(db, q, np.random.default_rng(seed)) for seed in range(20)]
    assert all(fallback is False for _, fallback in picks)
    assert {e.case_id for e, _ in picks} == {"src/b", "src/d"}  # varies across seeds
    again = [select_mask(db, q, np.random.default_rng(seed))[0] for seed in range(20)]
    assert again == [e for e, _ in picks]  # same seed, same mask
    # beyond the spacing tolerance nothing is exact
    assert candidates(db, MaskQuery((32, 32, 32), (2.0, 2.0, 2.2), anatomy=(LIVER,))) == []


def test_anatomy_region_and_tumour_filters(db):
    grid = {"size": (32, 32, 32), "spacing": (2.0, 2.0, 2.0)}
    assert [e.case_id for e in candidates(db, MaskQuery(**grid, anatomy=(HEPATIC_TUMOUR,)))] == []  # a also has a bone lesion
    assert [e.case_id for e in candidates(db, MaskQuery(**grid, anatomy=(HEPATIC_TUMOUR, BONE_LESION)))] == ["src/a"]
    assert [e.case_id for e in candidates(db, MaskQuery(**grid, anatomy=(LIVER,), allow_tumour=True))] == ["src/a", "src/b", "src/d"]
    assert [e.case_id for e in candidates(db, MaskQuery(**grid, top_region="chest", anatomy=(LIVER,)))] == ["src/b"]
    assert [e.case_id for e in candidates(db, MaskQuery(**grid, bottom_region="abdomen", anatomy=(LIVER,)))] == ["src/b", "src/d"]
    assert candidates(db, MaskQuery(**grid, anatomy=(BLADDER,))) == []


def test_fallback_ranking(db):
    # 40^3 at 1.6 mm = 64 mm: b and d cover 64 mm exactly (tie broken by id), c covers 72 mm
    q = MaskQuery((40, 40, 40), (1.6, 1.6, 1.6), anatomy=(LIVER,))
    assert candidates(db, q) == []
    assert [e.case_id for e in rank_fallback(db, q)] == ["src/b", "src/d", "src/c"]
    entry, fallback = select_mask(db, q, np.random.default_rng(0))
    assert (entry.case_id, fallback) == ("src/b", True)
    # field of view first: 48^3 at 1.45 mm (69.6 mm) is nearer c's 72 mm than b's 64 mm
    q2 = MaskQuery((48, 48, 48), (1.45, 1.45, 1.45), anatomy=(LIVER,))
    assert [e.case_id for e in rank_fallback(db, q2)][0] == "src/c"
    # regions when given ...
    q3 = MaskQuery((40, 40, 40), (1.6, 1.6, 1.6), top_region="abdomen", anatomy=(LIVER,))
    assert [e.case_id for e in rank_fallback(db, q3)] == ["src/d", "src/c"]
    # ... relaxed when no mask has them, but never the anatomy
    q4 = MaskQuery((40, 40, 40), (1.6, 1.6, 1.6), top_region="head_neck", bottom_region="chest", anatomy=(LIVER,))
    assert [e.case_id for e in rank_fallback(db, q4)] == ["src/b", "src/d", "src/c"]
    assert select_mask(db, q4, np.random.default_rng(0)) == (_by_id(db)["b"], True)
    assert rank_fallback(db, MaskQuery((40, 40, 40), (1.6, 1.6, 1.6), anatomy=(label_id("brain"),))) == []


def test_no_mask_error(db):
    rng = np.random.default_rng(0)
    with pytest.raises(NoMaskError, match="brain"):
        select_mask(db, MaskQuery((32, 32, 32), (2.0, 2.0, 2.0), anatomy=("brain",)), rng)
    with pytest.raises(NoMaskError, match="tumour"):  # only a has the hepatic tumour, and it also has a bone lesion
        select_mask(db, MaskQuery((32, 32, 32), (2.0, 2.0, 2.0), anatomy=(HEPATIC_TUMOUR,)), rng)
    with pytest.raises(NoMaskError, match="empty"):
        select_mask([], MaskQuery((32, 32, 32), (2.0, 2.0, 2.0)), rng)
    assert issubclass(NoMaskError, ValueError)


# --------------------------------------------------------------------------------------------- loading


def test_load_exact_mask(db):
    b = _by_id(db)["b"]
    arr, affine = load_mask(b, MaskQuery((32, 32, 32), (2.0, 2.0, 2.0), anatomy=(LIVER,)))
    assert arr.dtype == np.uint8 and np.array_equal(arr, np.asarray(nib.load(b.label).dataobj))
    assert np.allclose(affine, mask_affine((2.0, 2.0, 2.0)))


def test_load_resamples_to_requested_grid(db):
    c = _by_id(db)["c"]
    src = np.asarray(nib.load(c.label).dataobj)
    src_aff = nib.load(c.label).affine
    arr, affine = load_mask(c, MaskQuery((40, 36, 32), (2.0, 2.0, 2.5), anatomy=(RIGHT_KIDNEY, LEFT_KIDNEY)))
    assert arr.shape == (40, 36, 32) and arr.dtype == np.uint8
    assert np.allclose(np.diag(affine)[:3], (2.0, 2.0, 2.5)) and np.allclose(affine[:3, :3], np.diag((2.0, 2.0, 2.5)))
    assert set(np.unique(arr)) <= set(np.unique(src))
    # every class stays at its physical place (within a voxel of the new grid)
    for k in (LIVER, RIGHT_KIDNEY, LEFT_KIDNEY, LUNG):
        before = src_aff[:3, :3] @ np.argwhere(src == k).mean(0) + src_aff[:3, 3]
        after = affine[:3, :3] @ np.argwhere(arr == k).mean(0) + affine[:3, 3]
        assert np.allclose(before, after, atol=2.5), k


def test_load_raises_when_anatomy_lost(db):
    c = _by_id(db)["c"]
    assert BLADDER in c.labels  # a corner of c, cropped away by a smaller field of view
    with pytest.raises(NoMaskError, match="bladder"):
        load_mask(c, MaskQuery((24, 24, 24), (1.5, 1.5, 1.5), anatomy=(BLADDER,)))
    arr, _ = load_mask(c, MaskQuery((24, 24, 24), (3.0, 3.0, 3.0), anatomy=(BLADDER,)))  # same field of view: kept
    assert BLADDER in arr


def test_load_rejects_changed_file(db):
    b = _by_id(db)["b"]
    save_nifti(np.zeros((32, 32, 32), np.uint8), mask_affine((2.0, 2.0, 2.0)), b.label, np.uint8)
    with pytest.raises(ValueError, match="changed"):
        load_mask(b, MaskQuery((32, 32, 32), (2.0, 2.0, 2.0)))


def test_real_lesion_mask(tmp_path, real_ct):
    """A lung lesion of a real chest CT as a database entry, retrieved and resampled."""
    from monai.transforms import Orientation

    from maisi.prepare.preprocess import load_scan

    lesion = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(load_scan(real_ct / "lung1_label.nrrd"))
    arr = np.where(lesion.numpy()[0] > 0, label_id("lung tumor"), 0).astype(np.uint8)
    path = save_nifti(arr, lesion.affine.numpy(), tmp_path / "lung1.nii.gz", np.uint8)
    row = dict.fromkeys(COLUMNS, "")
    row.update(source="pyradiomics", case_id="lung1", label=str(path), top_region="chest", bottom_region="chest")
    (entry,) = build_mask_database(pd.DataFrame([row], columns=list(COLUMNS)))
    assert entry.labels == (23,) and entry.dim == (512, 512, 48)
    assert entry.spacing == pytest.approx((0.5703125, 0.5703125, 5.0), abs=1e-4)
    assert entry.has_tumour
    q = MaskQuery((256, 256, 48), (1.14, 1.14, 5.0), top_region="chest", anatomy=("lung tumor",))
    assert select_mask([entry], q, np.random.default_rng(0)) == (entry, True)
    out, affine = load_mask(entry, q)
    assert out.shape == (256, 256, 48) and np.allclose(np.diag(affine)[:3], (1.14, 1.14, 5.0))
    assert (out == 23).sum() == pytest.approx((arr == 23).sum() * (0.5703125 / 1.14) ** 2, rel=0.2)


# --------------------------------------------------------------------------------------------- augmentation

STILL = {"body_zoom": (1.0, 1.0)}


def test_settings():
    s = GenerateSettings.from_config(validated(generate={"augment": {"body_zoom": [0.95, 1.05], "flip_prob": 0.5}})).augment
    assert s.body_zoom == (0.95, 1.05) and s.flip_prob == 0.5
    assert AugmentSettings.from_dict(json.loads(s.to_json())) == s
    assert s.to_json() == AugmentSettings.from_dict({"flip_prob": 0.5, "body_zoom": (0.95, 1.05)}).to_json()
    with pytest.raises(ConfigError, match="flip_probability"):
        validated(generate={"augment": {"flip_probability": 0.5}})
    with pytest.raises(ValueError, match="generate.augment.tumour_inside_fraction"):
        AugmentSettings(tumour_inside_fraction=1.5)
    with pytest.raises(ValueError, match="body_zoom"):
        AugmentSettings(body_zoom=(1.05, 0.95))


def test_tables():
    swap = lr_swap_table()
    assert swap[label_id("left kidney")] == label_id("right kidney") and swap[label_id("right kidney")] == label_id("left kidney")
    assert swap[label_id("left lung upper lobe")] == label_id("right lung upper lobe")
    assert label_id("right lung middle lobe") not in swap and label_id("left atrial appendage") not in swap
    assert all(swap[swap[k]] == k for k in swap)
    bones = bone_labels()
    assert VERTEBRA in bones and label_id("left rib 3") in bones and label_id("sacrum") in bones
    assert BONE_LESION not in bones and LIVER not in bones


def test_augment_deterministic_and_seed_dependent():
    lab = phantom(48)
    out1, rec1 = augment_mask(lab, AugmentSettings(), seed=7)
    out2, rec2 = augment_mask(lab, AugmentSettings(), seed=7)
    assert np.array_equal(out1, out2) and rec1 == rec2
    out3, rec3 = augment_mask(lab, AugmentSettings(), seed=8)
    assert not np.array_equal(out1, out3) and rec1 != rec3
    assert out1.shape == lab.shape and out1.dtype == np.uint8
    assert set(np.unique(out1)) <= set(np.unique(lab))
    json.dumps(rec1)  # the record goes into a JSON sidecar
    assert [s["step"] for s in rec1["steps"]] == ["tumour_elastic", "bone_lesion_affine", "body_zoom"]


def test_augment_disabled_is_identity():
    lab = phantom(32)
    out, rec = augment_mask(lab, AugmentSettings(enabled=False), seed=1)
    assert np.array_equal(out, lab) and out is not lab and rec["steps"] == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tumour_stays_inside_liver(seed):
    lab = phantom(48)
    out, rec = augment_mask(lab, AugmentSettings(bone_lesion_affine=False, **STILL), seed=seed)
    (step,) = rec["steps"]
    assert step["step"] == "tumour_elastic" and step["host"] == [LIVER]
    new = out == HEPATIC_TUMOUR
    assert new.any()
    host = (lab == LIVER) | (lab == HEPATIC_TUMOUR)
    assert (new & host).sum() >= 0.8 * new.sum()
    if step["applied"]:
        assert not np.array_equal(new, lab == HEPATIC_TUMOUR)
        assert step["inside_fraction"] >= 0.8 and step["voxels_after"] == int(new.sum())
        # the old tumour voxels the new tumour left are liver again; outside the tumour nothing else changed
        assert np.all(out[(lab == HEPATIC_TUMOUR) & ~new] == LIVER)
        assert np.array_equal(out[~new & (lab != HEPATIC_TUMOUR)], lab[~new & (lab != HEPATIC_TUMOUR)])
        assert np.all(lab[new] > 0)  # only inside the body
    assert any(
        augment_mask(lab, AugmentSettings(bone_lesion_affine=False, **STILL), seed=s)[1]["steps"][0]["applied"] for s in range(3)
    )


def test_tumour_kept_when_no_draw_fits():
    lab = phantom(48, lesion=False)
    tumour = lab == HEPATIC_TUMOUR
    lab[lab == LIVER] = BODY
    lab[ndimage.binary_dilation(tumour) & ~tumour] = LIVER  # a one-voxel shell of liver: no draw stays inside
    settings = AugmentSettings(tumour_inside_fraction=1.0, max_attempts=3, **STILL)
    out, rec = augment_mask(lab, settings, seed=3)
    (step,) = rec["steps"]
    assert not step["applied"] and step["attempts"] == 3 and "inside" in step["reason"]
    assert np.array_equal(out, lab)
    lab[lab == LIVER] = BODY
    out, rec = augment_mask(lab, settings, seed=3)
    assert rec["steps"][0]["reason"] == "host organ absent" and np.array_equal(out, lab)


def test_bone_lesion_stays_in_bone():
    lab = phantom(48)
    out, rec = augment_mask(lab, AugmentSettings(tumour_elastic=False, **STILL), seed=4)
    (step,) = rec["steps"]
    assert step["step"] == "bone_lesion_affine" and step["applied"]
    assert all(abs(r) <= np.radians(10) + 1e-6 for r in step["params"]["rotate"])
    assert all(0.9 - 1e-6 <= s <= 1.1 + 1e-6 for s in step["params"]["scale"])
    new = out == BONE_LESION
    assert new.sum() >= 0.8 * (lab == BONE_LESION).sum()
    assert np.all((lab[new] == VERTEBRA) | (lab[new] == BONE_LESION))
    assert np.all(out[(lab == BONE_LESION) & ~new] == VERTEBRA)
    assert not np.array_equal(new, lab == BONE_LESION)


def test_body_zoom_recorded():
    lab = phantom(48, tumour=False, lesion=False)
    out, rec = augment_mask(lab, AugmentSettings(body_zoom=(0.9, 0.95)), seed=5)
    (step,) = rec["steps"]
    assert step["step"] == "body_zoom" and 0.9 <= step["factor"] <= 0.95
    assert out.shape == lab.shape and (out == BODY).sum() < (lab == BODY).sum()  # zoomed out: a smaller body
    assert set(np.unique(out)) <= set(np.unique(lab))
    _, rec_off = augment_mask(lab, AugmentSettings(**STILL), seed=5)
    assert rec_off["steps"] == []


def test_left_right_flip_swaps_labels():
    lab = phantom(48, tumour=False, lesion=False)
    settings = AugmentSettings(tumour_elastic=False, bone_lesion_affine=False, flip_prob=1.0, **STILL)
    out, rec = augment_mask(lab, settings, seed=0)
    assert rec["steps"] == [{"step": "flip", "applied": True, "axes": [0], "lr_swapped": True}]
    mirrored = lab[::-1]
    assert np.all(out[mirrored == RIGHT_KIDNEY] == LEFT_KIDNEY) and np.all(out[mirrored == LEFT_KIDNEY] == RIGHT_KIDNEY)
    assert np.all(out[mirrored == LUNG] == label_id("right lung upper lobe"))
    assert np.array_equal(out[mirrored == BODY], mirrored[mirrored == BODY])
    # the mirrored left kidney is relabelled right kidney: the right kidney stays on its side
    assert np.argwhere(out == RIGHT_KIDNEY)[:, 0].mean() == pytest.approx(np.argwhere(lab == RIGHT_KIDNEY)[:, 0].mean())
    assert np.argwhere(lab == RIGHT_KIDNEY)[:, 0].mean() < lab.shape[0] / 2


def test_rotation_and_translation():
    lab = phantom(48, tumour=False, lesion=False)
    base = {"tumour_elastic": False, "bone_lesion_affine": False, **STILL}
    out, rec = augment_mask(lab, AugmentSettings(translate_voxels=3, **base), seed=2)
    (step,) = rec["steps"]
    dx, dy, dz = step["voxels"]
    assert all(abs(v) <= 3 for v in step["voxels"]) and any(step["voxels"])
    assert np.array_equal(np.roll(lab, (dx, dy, dz), axis=(0, 1, 2))[3:-3, 3:-3, 3:-3], out[3:-3, 3:-3, 3:-3])
    out, rec = augment_mask(lab, AugmentSettings(rotate_degrees=20.0, **base), seed=2)
    (step,) = rec["steps"]
    assert step["step"] == "rotate_z" and abs(step["degrees"]) <= 20.0
    assert set(np.unique(out)) <= set(np.unique(lab)) and not np.array_equal(out, lab)
    # a rotation about z keeps each axial slice's content in that slice
    for z in (10, 24, 38):
        assert set(np.unique(out[:, :, z])) <= set(np.unique(lab[:, :, z]))


def test_augment_speed_on_128_cube():
    lab = phantom(128)
    augment_mask(lab[:32, :32, :32], AugmentSettings(), seed=0)  # imports
    start = time.perf_counter()
    out, rec = augment_mask(lab, AugmentSettings(), seed=0)
    assert time.perf_counter() - start < 15.0
    assert out.shape == lab.shape and {s["step"] for s in rec["steps"]} == {"tumour_elastic", "bone_lesion_affine", "body_zoom"}


def test_tumour_labels():
    assert TUMOUR_LABELS == (23, 24, 26, 27, 128, 129) and BONE_LESION == 128


def test_nvidia_candidate_database_in_its_own_format(tmp_path):
    """NVIDIA's candidate list and mask archive (a zip holding one top folder) as mask entries."""
    import zipfile

    from maisi.generate.mask_database import read_nvidia_candidates
    from maisi.sources.download import safe_extract

    items, archive = [], tmp_path / "all_masks_flexible_size_and_spacing_4000.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, (top, bottom, labels) in enumerate([(1, 2, [1, 3, 200]), (1, 1, [28, 29, 23, 200]), (2, 3, [1, 26, 200])]):
            name = f"pseudo_label_{i}.nii.gz"
            label = np.zeros((16, 16, 8), np.uint8)
            for k, v in enumerate(labels):
                label[k : k + 2, :, :] = v
            save_nifti(label, np.diag([1.5, 1.5, 2.0, 1.0]), tmp_path / name, np.uint8)
            zf.write(tmp_path / name, f"all_masks_flexible_size_and_spacing_4000/{name}")
            one_hot = lambda k: [int(j == k) for j in range(4)]  # noqa: E731
            items.append({"pseudo_label_filename": name, "label_list": labels, "dim": [16, 16, 8], "spacing": [1.5, 1.5, 2.0],
                          "top_region_index": one_hot(top), "bottom_region_index": one_hot(bottom)})  # fmt: skip
    candidates_json = tmp_path / "candidate_masks_flexible_size_and_spacing_4000.json"
    candidates_json.write_text(json.dumps(items))
    folder = safe_extract(archive, tmp_path / "nvidia", "zip")
    entries = read_nvidia_candidates(candidates_json, folder)
    assert [e.case_id for e in entries] == [f"nvidia/pseudo_label_{i}.nii.gz" for i in range(3)]
    first = entries[0]
    assert (first.top_region, first.bottom_region, first.labels, first.dim) == ("chest", "abdomen", (1, 3, 200), (16, 16, 8))
    assert entries[2].bottom_region == "lower_body" and entries[1].has_tumour
    assert first.sha256 == sha256_file(first.label)
    query = MaskQuery((16, 16, 8), (1.5, 1.5, 2.0), "chest", "abdomen", anatomy=["liver"])
    assert [e.case_id for e in candidates(entries, query)] == ["nvidia/pseudo_label_0.nii.gz"]
    (folder / "all_masks_flexible_size_and_spacing_4000" / "pseudo_label_1.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"item 1 \(pseudo_label_filename 'pseudo_label_1.nii.gz'\): mask .*pseudo_label_1.nii.gz not found"):
        read_nvidia_candidates(candidates_json, folder)
    with pytest.raises(ConfigError, match="generate.mask_database.nvidia_candidates"):
        validated(generate={"mask_database": {"source": "nvidia", "nvidia_masks": str(archive)}})


def _nvidia_list(tmp_path, names, key="pseudo_label_filename"):
    """NVIDIA's candidate list naming ``names`` (one 16 x 16 x 8 map each) under the mask folder ``tmp_path/masks``."""
    items = [{key: name, "label_list": [1, 200], "dim": [16, 16, 8], "spacing": [1.5, 1.5, 2.0],
              "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]} for name in names]  # fmt: skip
    (tmp_path / "candidates.json").write_text(json.dumps(items))
    return tmp_path / "candidates.json"


def test_nvidia_candidate_paths_stay_in_the_mask_folder_and_name_nifti_maps(tmp_path):
    """A candidate whose file lies outside the mask folder (``..``, an absolute path, a link out of it) or is not a NIfTI map
    is refused when the list is read, naming the list, the item's index and its key as NVIDIA's JSON names it."""
    from maisi.core.checks import InputError
    from maisi.generate.mask_database import read_nvidia_candidates

    label = np.zeros((16, 16, 8), np.uint8)
    label[4:8] = 1
    masks = tmp_path / "masks"
    save_nifti(label, np.diag([1.5, 1.5, 2.0, 1.0]), masks / "ok.nii.gz", np.uint8)
    save_nifti(label, np.diag([1.5, 1.5, 2.0, 1.0]), tmp_path / "outside.nii.gz", np.uint8)
    (masks / "notes.nii.gz").write_text("not an image")
    (masks / "readme.txt").write_text("not an image")
    (masks / "link.nii.gz").symlink_to(tmp_path / "outside.nii.gz")
    assert [e.case_id for e in read_nvidia_candidates(_nvidia_list(tmp_path, ["ok.nii.gz"]), masks)] == ["nvidia/ok.nii.gz"]
    for name, why in [("../outside.nii.gz", "outside the mask folder"), (str(tmp_path / "outside.nii.gz"), "outside the mask folder"),
                      ("link.nii.gz", "outside the mask folder"), ("readme.txt", "not a NIfTI"), ("notes.nii.gz", "not a readable NIfTI")]:  # fmt: skip
        with pytest.raises(InputError, match=rf"candidates.json: item 1 \(pseudo_label_filename '{name}'\): .*{why}") as err:
            read_nvidia_candidates(_nvidia_list(tmp_path, ["ok.nii.gz", name]), masks)
        assert err.value.path == str(tmp_path / "candidates.json")
    items = json.loads(_nvidia_list(tmp_path, ["ok.nii.gz"]).read_text())
    items[0]["label_filename"] = "../outside.nii.gz"  # NVIDIA's optional second map is confined as well
    (tmp_path / "candidates.json").write_text(json.dumps(items))
    with pytest.raises(InputError, match=r"item 0 \(label_filename '../outside.nii.gz'\): .*outside the mask folder"):
        read_nvidia_candidates(tmp_path / "candidates.json", masks)
