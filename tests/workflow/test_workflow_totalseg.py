"""End-to-end: the regions stage with the TotalSegmentator backend on the real chest CTs.

TotalSegmentator's real code path runs offline on a tiny nnU-Net model in its exact folder layout
(tests/helpers/tiny_totalseg.py), whose prediction is a known function of HU: air is background, lung
parenchyma is `lung_upper_lobe_left`, soft tissue `heart` and bone `vertebrae_T6`. So the masks and
regions that come out can be checked voxel by voxel.
"""

from __future__ import annotations

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest
from helpers.tiny_totalseg import write_tiny_model
from helpers.volumes import write_nifti
from helpers.workflow_runner import PREPARED, make_workdir, snakemake

from maisi.core.labels import BODY, label_id

pytestmark = pytest.mark.e2e

LUNG, HEART, T6, TUMOUR = label_id("left lung upper lobe"), label_id("heart"), label_id("vertebrae T6"), label_id("lung tumor")


def _config(real_ct, thin_dir, weights, on_error="skip"):
    return {
        "run_name": "totalseg",
        "on_error": on_error,
        "shards": 1,
        "totalsegmentator": {"weights": str(weights), "device": "cpu"},
        "sources": {
            "chest": {
                "type": "local",
                "path": str(real_ct),
                "images": "{case}_image.nrrd",
                "labels": "{case}_label.nrrd",
                "label_map": {1: "lung tumor"},
                "regions": {"backend": "totalsegmentator"},
            },
            "thin": {
                "type": "local",
                "path": str(thin_dir),
                "images": "{case}.nii.gz",
                "labels": None,
                "regions": {"backend": "totalsegmentator"},
            },
        },
    }


def _thin_scan(real_ct, folder):
    """Six slices (30 mm) of a real CT: shorter than half the tiny model's 96 mm patch."""
    data, header = nrrd.read(str(real_ct / "lung1_image.nrrd"))
    spacing = np.abs(np.diag(np.asarray(header["space directions"], float)))
    write_nifti(folder / "slab.nii.gz", data[:, :, 20:26].astype(np.int16), spacing=tuple(spacing))
    return folder


@pytest.fixture(scope="module")
def totalseg_run(real_ct, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("totalseg")
    weights = tmp / "weights"
    write_tiny_model(weights, 297)
    thin = _thin_scan(real_ct, tmp / "thin")
    work = make_workdir(tmp / "work", _config(real_ct, thin, weights))
    proc = snakemake(work, *PREPARED, timeout=1500)
    return work, weights, proc


def test_masks_and_regions_on_real_chest_ct(totalseg_run):
    work, _, _ = totalseg_run
    full = json.loads((work / "results/prepared/datalist.json").read_text(encoding="utf-8"))
    cases = {c["case_id"]: c for c in full["training"] + full["testing"]}  # dataset.held_out holds one out
    assert set(cases) == {"lung1", "lung2"}
    for case_id, entry in cases.items():
        assert entry["top_region_index"] == [0, 1, 0, 0] and entry["bottom_region_index"] == [0, 1, 0, 0]
        assert entry["label"] == f"../totalseg/chest/labels/{case_id}.nii.gz"
        mask_img = nib.load(work / "results/prepared" / entry["label"])
        hu_img = nib.load(work / "results/prepared" / entry["image_hu"])
        assert mask_img.get_data_dtype() == np.uint8 and mask_img.shape == hu_img.shape == (512, 512, 128)
        np.testing.assert_allclose(mask_img.affine, hu_img.affine, atol=1e-5)
        mask = np.asanyarray(mask_img.dataobj)
        hu = np.asanyarray(hu_img.dataobj).astype(np.float32)
        assert set(np.unique(mask).tolist()) <= {0, LUNG, HEART, T6, BODY, TUMOUR}
        # The tiny model's classes follow HU (3 mm resampling blurs the borders, so compare interiors).
        assert np.mean(mask[(hu > -800) & (hu < -400)] == LUNG) > 0.8
        assert np.mean(mask[(hu > 0) & (hu < 200)] == HEART) > 0.8
        assert np.mean(mask[hu > 500] == T6) > 0.8
        # The dataset's tumour mask is kept on top of TotalSegmentator's classes.
        prepared = np.asanyarray(nib.load(work / f"results/prepared/chest/labels/{case_id}.nii.gz").dataobj)
        assert (prepared == TUMOUR).any() and np.all(mask[prepared == TUMOUR] == TUMOUR)
        sidecar = json.loads((work / f"results/totalseg/chest/labels/{case_id}.nii.gz.json").read_text(encoding="utf-8"))
        assert sidecar["device"] == "cpu" and sidecar["models"][0]["task_id"] == 297
        assert sidecar["labels_present"] == sorted(np.unique(mask[mask > 0]).tolist())


def test_case_table_rejections_and_summary(totalseg_run):
    work, _, _ = totalseg_run
    table = (work / "results/prepared/cases.tsv").read_text(encoding="utf-8").splitlines()
    header = table[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in table[1:]]
    assert {r["label_source"] for r in rows} == {"totalsegmentator:fast"}
    assert {r["region_backend"] for r in rows} == {"totalsegmentator"}
    rejected = (work / "results/prepared/rejected.tsv").read_text(encoding="utf-8")
    assert "thin\tslab\tregions\t" in rejected and "scan too small for TotalSegmentator's model 297" in rejected
    assert not (work / "results/totalseg/thin/labels/slab.nii.gz").exists()
    html = (work / "results/prepared/summary/summary.html").read_text(encoding="utf-8")
    assert "totalsegmentator:fast: 2" in html
    assert (work / "results/benchmarks/totalsegmentator/chest/0000.tsv").is_file()
    assert (work / "logs/totalsegmentator/chest/0000.log").is_file()


def test_second_run_does_nothing(totalseg_run):
    work, _, _ = totalseg_run
    proc = snakemake(work, *PREPARED, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_missing_weights_stop_before_the_run(real_ct, tmp_path):
    thin = _thin_scan(real_ct, tmp_path / "thin")
    work = make_workdir(tmp_path / "work", _config(real_ct, thin, tmp_path / "empty_weights"))
    (tmp_path / "empty_weights").mkdir()
    proc = snakemake(work, "all", "--dry-run", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj is missing" in out
    assert "totalseg_download_weights -t total_fast" in out
    assert not (work / "results").exists()


def test_totalsegmentator_failing_mid_run(real_ct, tmp_path):
    """A model that passes the folder check but cannot be loaded: per-case errors, nothing half-written."""
    weights = tmp_path / "weights"
    model = write_tiny_model(weights, 297)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    cfg = _config(real_ct, tmp_path, weights, on_error="stop")
    del cfg["sources"]["thin"]
    work = make_workdir(tmp_path / "work", cfg)
    proc = snakemake(work, "results/regions/chest/shards/0000.tsv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "TotalSegmentator failed" in out and "lung1" in out
    assert not list((work / "results").glob("totalseg/**/*.nii.gz")) and not (work / "results/totalseg/chest/shards/0000.tsv").exists()

    cfg["on_error"] = "skip"  # both cases left out: the dataset job stops with their reason
    make_workdir(work, cfg)
    proc = snakemake(work, "results/prepared/rejected.tsv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "every case was rejected (2 of 2)" in out
    assert "2 x totalsegmentator: TotalSegmentator failed" in out
    assert (work / "results/regions/chest/shards/0000.tsv").is_file()  # the shard's verdicts are kept
    assert not list((work / "results").glob("totalseg/**/*.nii.gz"))
