"""End-to-end runs of the real workflow on a local folder of real CTs and on a downloaded dataset."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers.http_server import make_tar, serve, write_msd_task
from helpers.paths import ROOT
from helpers.volumes import ct_volume, write_nifti
from helpers.workflow_runner import PREPARED, make_workdir, planned_jobs, snakemake

pytestmark = pytest.mark.e2e


def test_local_real_ct_and_bad_cases(real_ct, tmp_path):
    bad = tmp_path / "bad_scans"
    (bad / "images").mkdir(parents=True)
    (bad / "images" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    write_nifti(bad / "images" / "mr_like.nii.gz", np.full((20, 20, 20), 300, np.int16))
    write_nifti(bad / "images" / "good.nii.gz", ct_volume((40, 36, 20)))
    cfg = {
        "run_name": "realct",
        "on_error": "skip",
        "shards": 2,
        "sources": {
            "realct": {
                "type": "local",
                "path": str(real_ct),
                "images": "{case}_image.nrrd",
                "labels": "{case}_label.nrrd",
                "label_map": {1: "lung tumor"},
                "regions": {"backend": "manual", "top": "chest", "bottom": "chest"},
            },
            "mixed": {
                "type": "local",
                "path": str(bad),
                "images": "images/{case}.nii.gz",
                "labels": None,
                "regions": {"backend": "manual", "top": "abdomen", "bottom": "abdomen"},
            },
        },
    }
    work = make_workdir(tmp_path / "work", cfg)
    snakemake(work, *PREPARED)
    full = json.loads((work / "results/prepared/datalist.json").read_text(encoding="utf-8"))
    by_case = {e["case_id"]: e for e in full["training"] + full["testing"]}  # dataset.held_out puts some under testing
    assert set(by_case) == {"lung1", "lung2", "good"} and len(full["testing"]) == 1  # one real CT (a lone case stays in)
    for case in ("lung1", "lung2"):
        e = by_case[case]
        assert e["dim"] == [512, 512, 128]
        assert e["top_region_index"] == [0, 1, 0, 0] and e["bottom_region_index"] == [0, 1, 0, 0]
        img = nib.load(work / "results/prepared" / e["image"])
        assert img.shape == (512, 512, 128)
        lab = np.asanyarray(nib.load(work / "results/prepared" / e["label"]).dataobj)
        assert 23 in np.unique(lab)
    assert "label" not in by_case["good"]
    rejected = (work / "results/prepared/rejected.tsv").read_text(encoding="utf-8")
    assert "corrupt.nii.gz: cannot be read" in rejected
    assert "mr_like.nii.gz: minimum intensity 300 is not below -500" in rejected
    for name in ("dims_spacing.png", "montage.png", "summary.html"):
        assert (work / "results/prepared/summary" / name).stat().st_size > 1000
    assert planned_jobs(work, *PREPARED) == {}, "a second run has nothing to do"

    # one more case in a local folder reruns only its shard (and the dataset-level rules)
    write_nifti(bad / "images" / "good2.nii.gz", ct_volume((40, 36, 20), seed=3))
    jobs = planned_jobs(work, *PREPARED)
    assert jobs.get("preprocess") == 1 and jobs.get("regions") == 1, jobs
    assert set(jobs) == {"preprocess", "regions", "dataset", "dataset_summary"}


def test_stop_on_bad_input_names_the_file(tmp_path):
    scans = tmp_path / "scans"
    write_nifti(scans / "images" / "nan.nii.gz", np.full((20, 20, 20), np.nan, np.float32))
    cfg = {"sources": {"s": {"type": "local", "path": str(scans), "labels": None, "regions": {"backend": "manual", "top": "chest", "bottom": "chest"}}}}
    work = make_workdir(tmp_path / "work", cfg)
    proc = snakemake(work, *PREPARED, check=False)
    assert proc.returncode != 0
    assert "nan.nii.gz: 8000 voxel(s) are NaN or infinite" in proc.stdout + proc.stderr
    assert not (work / "results/prepared/s/shards").exists() or not list((work / "results/prepared/s/shards").glob("*.tsv"))


def _local(path, **extra):
    return {"type": "local", "path": str(path), "labels": None, "regions": {"backend": "manual", "top": "chest", "bottom": "chest"}, **extra}


@pytest.mark.parametrize(
    "case,message",
    [
        ("labels_pattern", "config key 'sources.s.labels': no case has a label map: nothing matches"),
        ("brace_id", "config key 'sources.s.images': {scans}/brace{{x}}.nii.gz gives the case id 'brace{{x}}'"),
        ("dots_id", "config key 'sources.s.images': {scans}/x...nii.gz gives the case id '..'"),
        ("catalog", "config key 'sources.s.dataset': 'msd_task99_nothing' is not a dataset of the catalog"),
        ("run_name", "config key 'run_name': '..' does not match"),
    ],
)
def test_bad_sources_and_names_stop_before_any_job(tmp_path, case, message):
    """Faults found when the workflow starts: one line naming the key (and the file), no job, nothing written."""
    scans = tmp_path / "scans"
    write_nifti(scans / "ok.nii.gz", ct_volume((20, 20, 20)))
    source = _local(scans, images="{case}.nii.gz")
    cfg = {"sources": {"s": source}}
    if case == "labels_pattern":
        write_nifti(scans / "labels" / "ok.nii.gz", np.zeros((20, 20, 20), np.uint8))
        source["labels"] = "lables/{case}.nii.gz"
    elif case == "brace_id":
        write_nifti(scans / "brace{x}.nii.gz", ct_volume((20, 20, 20)))
    elif case == "dots_id":
        write_nifti(scans / "x...nii.gz", ct_volume((20, 20, 20)))
        source["images"] = "x{case}.nii.gz"
        write_nifti(scans / "xok.nii.gz", ct_volume((20, 20, 20)))
    elif case == "catalog":
        cfg["sources"] = {"s": {"type": "dataset", "dataset": "msd_task99_nothing"}}
    else:
        cfg["run_name"] = ".."
    work = make_workdir(tmp_path / "work", cfg)
    proc = snakemake(work, *PREPARED, "all", check=False)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0 and message.format(scans=scans) in out, out[-3000:]
    assert len(out.splitlines()) < 5 and "Traceback" not in out
    assert not (work / "results").exists() and not (work / "resources").exists()


def test_every_case_rejected_stops_at_the_dataset_job(tmp_path):
    """on_error: skip with no usable case: the dataset job fails with the reasons; the shard tables are kept."""
    scans = tmp_path / "scans"
    for name in ("a", "b"):
        write_nifti(scans / f"{name}.nii.gz", np.full((20, 20, 20), 300, np.int16))  # no air: not CT
    work = make_workdir(tmp_path / "work", {"on_error": "skip", "sources": {"s": _local(scans, images="{case}.nii.gz")}})
    proc = snakemake(work, *PREPARED, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "every case was rejected (2 of 2)" in out
    assert "2 x minimum intensity 300 is not below -500 HU" in out
    assert list((work / "results/prepared/s/shards").glob("*.tsv"))  # what was made is kept
    assert not (work / "results/prepared/datalist.json").exists()


def test_config_error_stops_before_any_job(tmp_path):
    work = make_workdir(tmp_path / "work", {"sources": {"p": {"type": "phantom", "n_cases": 2, "spacing_z": [5, 1]}}})
    proc = snakemake(work, *PREPARED, check=False)
    assert proc.returncode != 0
    assert "sources.p.spacing_z" in proc.stdout + proc.stderr
    assert not (work / "results").exists()
    # an unknown key: one line naming the key and the config file, not Snakemake's dump of schema and config
    make_workdir(work, {"colour": "blue", "sources": {"p": {"type": "phantom", "n_cases": 2}}})
    proc = snakemake(work, *PREPARED, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) < 5, lines[:10]
    for line in (lines[0], lines[-1]):
        assert "config key '<top level>'" in line and "'colour' was unexpected" in line and "config/config.yaml" in line


def test_catalog_dataset_over_http(tmp_path):
    src = tmp_path / "archive_src"
    write_msd_task(src, n_cases=2, n_test=1)
    archive = make_tar(src, tmp_path / "Task09_Spleen.tar")
    data = archive.read_bytes()
    with serve() as server:
        url = server.add("Task09_Spleen.tar", data)
        catalog = yaml.safe_load((ROOT / "config/datasets.yaml").read_text(encoding="utf-8"))
        entry = catalog["datasets"]["msd_task09_spleen"]
        entry.update(url=url, md5=hashlib.md5(data).hexdigest())
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog), encoding="utf-8")
        cfg = {
            "on_error": "skip",
            "catalog": str(tmp_path / "catalog.yaml"),
            "sources": {"spleen": {"type": "dataset", "dataset": "msd_task09_spleen"}},
            "preprocess": {"divisor": 32},
        }
        work = make_workdir(tmp_path / "work", cfg)
        snakemake(work, *PREPARED)
    assert (work / "resources/downloads/msd_task09_spleen/Task09_Spleen.tar").exists()
    full = json.loads((work / "results/prepared/datalist.json").read_text(encoding="utf-8"))
    datalist = full["training"] + full["testing"]  # one of the two is held out (dataset.held_out)
    assert sorted(e["case_id"] for e in datalist) == ["spleen_1", "spleen_2"] and len(full["testing"]) == 1
    for e in datalist:
        lab = np.asanyarray(nib.load(work / "results/prepared" / e["label"]).dataobj)
        assert set(np.unique(lab)) == {0, 3}, "MSD spleen 1 becomes MAISI spleen 3"
        assert e["top_region_index"] == [0, 0, 1, 0]
    rejected = (work / "results/prepared/rejected.tsv").read_text(encoding="utf-8")
    assert "spleen_3" in rejected  # the unlabelled all-zero test image is no CT
