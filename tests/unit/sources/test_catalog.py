"""Tests of the dataset catalog (config/datasets.yaml) and the dataset converters."""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.http_server import serve, write_msd_task, write_nifti
from helpers.paths import ROOT

import maisi.sources.download as dl
from maisi.core.io import read_json
from maisi.core.labels import label_id, maisi_labels
from maisi.sources.catalog import (
    CatalogError,
    DatasetEntry,
    MissingChecksumError,
    default_catalog_path,
    download_entry,
    load_catalog,
    parse_catalog,
)
from maisi.sources.converters import ConversionError, convert_dataset, totalseg_mapping

MSD_TASKS = {
    "msd_task03_liver": ("Task03_Liver", {1: "liver", 2: "hepatic tumor"}),
    "msd_task06_lung": ("Task06_Lung", {1: "lung tumor"}),
    "msd_task07_pancreas": ("Task07_Pancreas", {1: "pancreas", 2: "pancreatic tumor"}),
    "msd_task08_hepaticvessel": ("Task08_HepaticVessel", {1: "hepatic vessel", 2: "hepatic tumor"}),
    "msd_task09_spleen": ("Task09_Spleen", {1: "spleen"}),
    "msd_task10_colon": ("Task10_Colon", {1: "colon cancer primaries"}),
}

#: The 117 classes of TotalSegmentator v2's "total" task.
TOTALSEG_V2_CLASSES = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
    "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
    "kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 "
    "vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 "
    "vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
    "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right "
    "subclavian_artery_left common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left "
    "brachiocephalic_vein_right atrial_appendage_left superior_vena_cava inferior_vena_cava "
    "portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right "
    "humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right "
    "hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left "
    "gluteus_medius_right gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right "
    "iliopsoas_left iliopsoas_right brain skull "
    + " ".join(f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13))
    + " sternum costal_cartilages"
).split()


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(default_catalog_path())


@pytest.fixture
def raw_catalog():
    with open(default_catalog_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _monai_decathlon_md5() -> dict[str, str] | None:
    """MONAI's DecathlonDataset md5 table, read from its source (importing monai.apps is slow)."""
    spec = importlib.util.find_spec("monai")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "apps" / "datasets.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "DecathlonDataset":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "md5" for t in stmt.targets):
                    return ast.literal_eval(stmt.value)
    return None


# --------------------------------------------------------------------------------------------
# the real catalog


def test_real_catalog_has_all_msd_tasks(catalog):
    for name, (task, labels) in MSD_TASKS.items():
        entry = catalog[name]
        assert entry.url == f"https://msd-for-monai.s3-us-west-2.amazonaws.com/{task}.tar"
        assert re.fullmatch(r"[0-9a-f]{32}", entry.md5)
        assert entry.archive_type == "tar" and entry.converter == "msd"
        assert entry.licence == "CC-BY-SA 4.0" and entry.modality == "CT"
        assert entry.label_map == {k: label_id(v) for k, v in labels.items()}
        assert entry.archive_name == f"{task}.tar" and entry.subdir == task
        assert entry.require_checksum() == {"md5": entry.md5}
    assert catalog["msd_task09_spleen"].label_map == {1: 3}


def test_msd_md5_match_monai(catalog):
    table = _monai_decathlon_md5()
    if table is None:
        pytest.skip("monai not installed")
    for name, (task, _) in MSD_TASKS.items():
        assert catalog[name].md5 == table[task], name


def test_real_catalog_totalsegmentator(catalog):
    entry = catalog["totalsegmentator_v2"]
    assert entry.converter == "totalsegmentator" and entry.archive_type == "zip"
    assert entry.licence == "CC-BY 4.0"
    assert entry.archive_name == "Totalsegmentator_dataset_v201.zip"
    assert "10047292" in entry.url
    assert entry.md5 == "fe250e5718e0a3b5df4c4ea9d58a62fe"


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda e: e.update(colour="blue"), "key 'colour'"),
        (lambda e: e.pop("licence"), "key 'licence'"),
        (lambda e: e.update(converter="dicom_magic"), "unknown converter 'dicom_magic'"),
        (lambda e: e["label_map"].update({3: "left spleen"}), "label_map.3"),
        (lambda e: e.update(md5="ABC"), "key 'md5'"),
        (lambda e: e.update(archive_type="rar"), "key 'archive_type'"),
        (lambda e: e.update(region_hint="pelvis"), "key 'region_hint'"),
        (lambda e: e.update(label_map={}), "needs a label_map"),
        (lambda e: e.update(checksum="trust-me"), "key 'checksum'"),
    ],
)
def test_bad_entry_is_reported_with_name_and_key(raw_catalog, tmp_path, mutate, fragment):
    mutate(raw_catalog["datasets"]["msd_task06_lung"])
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(raw_catalog), encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    msg = str(info.value)
    assert "'msd_task06_lung'" in msg and fragment in msg, msg
    assert "msd_task09_spleen" not in msg


def test_every_problem_is_listed(raw_catalog):
    raw_catalog["datasets"]["msd_task03_liver"]["converter"] = "nope"
    raw_catalog["datasets"]["msd_task10_colon"]["label_map"][1] = "colon cancer secondaries"
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw_catalog)
    assert "'msd_task03_liver'" in str(info.value) and "'msd_task10_colon'" in str(info.value)


def test_top_level_errors(tmp_path):
    with pytest.raises(CatalogError, match="datasets"):
        parse_catalog({"version": 1})
    with pytest.raises(CatalogError, match="bogus"):
        parse_catalog({"datasets": {"x": {}}, "bogus": 1})


def _minimal(url: str, **extra) -> dict:
    return {
        "url": url, "licence": "CC0", "archive_type": "zip", "converter": "totalsegmentator",
        "description": "d", "citation": "c", "modality": "CT", "size_gb": 0.1, **extra,
    }


def test_missing_checksum_blocks_download_only(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_sleep", lambda s: None)
    data = b"PK-not-really-a-zip"
    with serve() as srv:
        url = srv.add("data.zip", data)
        cat = parse_catalog({"datasets": {
            "unverified": _minimal(url, md5=None, sha256=None),
            "unpublished": _minimal(url, checksum="none-published"),
            "verified": _minimal(url, sha256=hashlib.sha256(data).hexdigest()),
        }})
        with pytest.raises(MissingChecksumError, match="unverified"):
            download_entry(cat["unverified"], tmp_path / "a", progress=False)
        assert srv.requests_for("data.zip") == []
        assert download_entry(cat["unpublished"], tmp_path / "b", progress=False).read_bytes() == data
        assert download_entry(cat["verified"], tmp_path / "c", progress=False).name == "data.zip"


# --------------------------------------------------------------------------------------------
# converters


def _entry(**kw) -> DatasetEntry:
    base = dict(
        name="msd_task09_spleen", url="https://example.invalid/Task09_Spleen.tar", md5="0" * 32, sha256=None,
        licence="CC-BY-SA 4.0", archive_type="tar", converter="msd", label_map={1: 3},
    )
    base.update(kw)
    return DatasetEntry(**base)


def test_msd_conversion(tmp_path):
    src = tmp_path / "extracted"
    write_msd_task(src, n_cases=2, n_test=1)
    out = tmp_path / "out"
    df = convert_dataset(_entry(), src, out)  # no subdir: the task folder is found by dataset.json

    assert df["case_id"].tolist() == ["spleen_1", "spleen_2", "spleen_3"]
    assert df["label"].tolist() == ["labels/spleen_1.nii.gz", "labels/spleen_2.nii.gz", ""]
    assert df["source_image"].tolist()[0] == "Task09_Spleen/imagesTr/spleen_1.nii.gz"
    assert not any(p.name.startswith("._") for p in out.rglob("*"))

    image_src = src / "Task09_Spleen" / "imagesTr" / "spleen_1.nii.gz"
    image_out = out / "images" / "spleen_1.nii.gz"
    assert image_out.read_bytes() == image_src.read_bytes()
    assert os.path.samefile(image_out, image_src)  # hard link

    label = nib.load(out / "labels" / "spleen_1.nii.gz")
    data = np.asanyarray(label.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data).tolist()) == {0, 3}
    np.testing.assert_allclose(label.affine, nib.load(image_src).affine)

    table = pd.read_csv(out / "cases.tsv", sep="\t", keep_default_na=False, dtype=str)
    pd.testing.assert_frame_equal(table, df)
    sidecar = read_json(out / "cases.tsv.json")
    assert sidecar["dataset"] == "msd_task09_spleen" and sidecar["n_cases"] == 3 and sidecar["n_labelled"] == 2
    assert sidecar["md5"] == "0" * 32 and sidecar["url"].endswith("Task09_Spleen.tar")
    assert not [p for p in out.rglob(".*")]  # no temporary files left

    convert_dataset(_entry(), src, out)  # a second run over existing outputs works


def test_msd_multiclass_and_unmapped_value(tmp_path):
    src = tmp_path / "extracted"
    write_msd_task(src, task="Task03_Liver", prefix="liver", n_cases=1, label_values=(1, 2), n_test=0)
    entry = _entry(name="msd_task03_liver", label_map={1: 1, 2: 26}, subdir="Task03_Liver")
    convert_dataset(entry, src, tmp_path / "ok")
    data = np.asanyarray(nib.load(tmp_path / "ok" / "labels" / "liver_1.nii.gz").dataobj)
    assert set(np.unique(data).tolist()) == {0, 1, 26}

    with pytest.raises(ConversionError) as info:
        convert_dataset(_entry(label_map={1: 1}, subdir="Task03_Liver"), src, tmp_path / "bad")
    assert "liver_1.nii.gz" in str(info.value) and "[2]" in str(info.value)


def test_totalseg_mapping_covers_all_v2_classes():
    mapping, priority = totalseg_mapping()
    assert sorted(mapping) == sorted(TOTALSEG_V2_CLASSES) and len(mapping) == 117
    assert sorted(priority) == sorted(mapping)
    raw = json.loads((ROOT / "maisi" / "data" / "totalseg_to_maisi.json").read_text(encoding="utf-8"))
    names = maisi_labels()
    assert all(v is None or v in names for v in raw["mapping"].values())
    assert mapping["liver"] == 1 and mapping["kidney_left"] == 14 and mapping["vertebrae_L1"] == 37
    assert mapping["lung_upper_lobe_left"] == 28 and mapping["rib_left_1"] == 63 and mapping["femur_left"] == 93
    assert mapping["skull"] == 120 and mapping["brain"] == 22 and mapping["urinary_bladder"] == 15
    # embedded structures win over the organs around them
    assert priority.index("portal_vein_and_splenic_vein") > priority.index("liver")
    assert priority.index("kidney_cyst_left") > priority.index("kidney_left")
    assert priority.index("spinal_cord") > priority.index("vertebrae_L1")


def test_totalsegmentator_conversion(tmp_path):
    root = tmp_path / "extracted" / "Totalsegmentator_dataset_v201"
    shape = (8, 6, 4)
    for case in ("s0000", "s0001"):
        ct = np.full(shape, -1000, dtype=np.int16)
        write_nifti(root / case / "ct.nii.gz", ct)
        masks = {name: np.zeros(shape, np.uint8) for name in ("liver", "spleen", "kidney_left", "vertebrae_L1",
                                                              "portal_vein_and_splenic_vein", "brain")}
        masks["liver"][0:3] = 1
        masks["portal_vein_and_splenic_vein"][2:4] = 1  # overlaps the liver on slice 2
        masks["spleen"][5] = 1
        masks["kidney_left"][6, :3] = 1
        masks["vertebrae_L1"][7] = 1
        masks["future_class"] = np.ones(shape, np.uint8)  # not in the table: skipped
        for name, m in masks.items():
            write_nifti(root / case / "segmentations" / f"{name}.nii.gz", m)
    (root / "meta.csv").write_text("image_id;split\ns0000;train\ns0001;test\n", encoding="utf-8")

    entry = _entry(name="totalsegmentator_v2", converter="totalsegmentator", label_map={}, archive_type="zip")
    out = tmp_path / "out"
    df = convert_dataset(entry, tmp_path / "extracted", out)
    assert df["case_id"].tolist() == ["s0000", "s0001"]
    assert df["source_image"][0] == "Totalsegmentator_dataset_v201/s0000/ct.nii.gz"
    label = np.asanyarray(nib.load(out / "labels" / "s0000.nii.gz").dataobj)
    assert label.dtype == np.uint8
    assert (label[0:2] == label_id("liver")).all()
    assert (label[2:4] == label_id("portal vein and splenic vein")).all()  # vessel wins the overlap
    assert (label[4] == 0).all()  # brain mask is empty, future_class is not mapped
    assert (label[5] == label_id("spleen")).all()
    assert (label[6, :3] == label_id("left kidney")).all() and (label[6, 3:] == 0).all()
    assert (label[7] == label_id("vertebrae L1")).all()
    sidecar = read_json(out / "cases.tsv.json")
    assert sidecar["n_cases"] == 2 and sidecar["unknown_classes"] == ["future_class"]


def test_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_dataset(_entry(), tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="dataset.json"):
        convert_dataset(_entry(), tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConversionError, match="unknown converter"):
        convert_dataset(_entry(converter="nope"), tmp_path / "empty", tmp_path / "out")


def test_catalog_entry_is_immutable(catalog):
    entry = copy.copy(catalog["msd_task09_spleen"])
    with pytest.raises(AttributeError):
        entry.url = "http://elsewhere"  # type: ignore[misc]


def test_msd_float_labels(tmp_path):
    src = tmp_path / "extracted"
    task = write_msd_task(src, n_cases=1, n_test=0)
    label_path = task / "labelsTr" / "spleen_1.nii.gz"
    lab = np.asanyarray(nib.load(label_path).dataobj).astype(np.float32)
    write_nifti(label_path, lab)
    convert_dataset(_entry(), src, tmp_path / "ok")
    data = np.asanyarray(nib.load(tmp_path / "ok" / "labels" / "spleen_1.nii.gz").dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data).tolist()) == {0, 3}

    lab[0, 0, 0] = 0.5
    write_nifti(label_path, lab)
    with pytest.raises(ConversionError, match="non-integer"):
        convert_dataset(_entry(), src, tmp_path / "bad")
