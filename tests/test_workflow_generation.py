"""End-to-end: generation requests through the real workflow, what reruns, and refused requests."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_workflow_training import TRAINING, _edit
from workflow_runner import make_workdir, planned_jobs, snakemake

pytestmark = pytest.mark.e2e

REQUESTS = {
    "masked": {"n_cases": 2, "size": [64, 64, 64], "spacing": [6.0, 6.0, 6.0], "top_region": "chest",
               "bottom_region": "abdomen", "anatomy": ["liver"], "masks": True, "steps": 4},
    "free": {"n_cases": 1, "size": [64, 64, 48], "spacing": [6.0, 6.0, 6.0], "top_region": "chest",
             "bottom_region": "abdomen", "masks": False, "steps": 4},
}  # fmt: skip


def _config():
    return {
        "run_name": "generation",
        "shards": 1,
        "sources": {"phantom": {"type": "phantom", "n_cases": 3, "spacing_xy": [3.0, 4.0], "spacing_z": [4.0, 5.0]}},
        "model": {"preset": "tiny", "device": "cpu"},
        **json.loads(json.dumps(TRAINING)),
        "generate": {"cases_per_shard": 1, "requests": json.loads(json.dumps(REQUESTS))},
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("generation") / "work", _config())
    snakemake(work, "all", timeout=1800)
    return work


def test_all_generates_every_request(generated):
    cases = pd.read_csv(generated / "results/generated/cases.tsv", sep="\t", keep_default_na=False)
    assert list(cases.case_id) == ["free_00000", "masked_00000", "masked_00001"]
    assert (cases.status == "ok").all()
    for r in cases.itertuples():
        img, lab = nib.load(generated / r.image), nib.load(generated / r.label)
        want = tuple(REQUESTS[r.request]["size"])
        assert img.shape == lab.shape == want and np.allclose(img.affine, lab.affine)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        sidecar = json.loads((generated / f"{r.image}.json").read_text())
        assert sidecar["seed"] == r.seed and sidecar["decoder"]["method"] == "tsp"
        labels = np.asanyarray(lab.dataobj)
        if r.request == "masked":
            assert r.mask_source.startswith("phantom/") and (labels == 1).any()  # the liver was required
        else:
            assert set(np.unique(labels)) <= {0, 200} and not r.mask_source
    assert (generated / "results/generated/montage.png").stat().st_size > 10_000
    assert json.loads((generated / "results/masks/database.json").read_text())["masks"]
    assert (generated / "results/benchmarks/generate/masked/0000.tsv").is_file()
    assert planned_jobs(generated, "all") == {}


def test_more_cases_add_shards_only(generated):
    first = generated / "results/generated/masked/imagesTr/masked_00000.nii.gz"
    before = first.stat().st_mtime_ns
    path = generated / "config" / "config.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    cfg["generate"]["requests"]["masked"]["n_cases"] = 3
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        assert planned_jobs(generated, "all") == {"generate": 1, "generated": 1, "all": 1}
        snakemake(generated, "all", timeout=900)
        assert first.stat().st_mtime_ns == before  # the existing cases are untouched
        assert (generated / "results/generated/masked/imagesTr/masked_00002.nii.gz").is_file()
    finally:
        path.write_text(original)


def test_decoder_setting_reruns_generation_only(generated):
    _edit(generated, "generate", decoder={"method": "monai", "num_splits": 1})
    try:
        jobs = planned_jobs(generated, "all")
        assert jobs.get("generate") == 3 and not {"train_diffusion", "train_controlnet", "mask_database"} & set(jobs)
    finally:
        _edit(generated, "generate", decoder={"method": "tsp"})


def test_impossible_request_stops_before_any_job(generated):
    path = generated / "config" / "config.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    cfg["generate"]["requests"]["masked"]["size"] = [64, 64, 40]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        proc = snakemake(generated, "--dry-run", "all", check=False)
        assert proc.returncode != 0
        assert "generate.requests.masked.size" in proc.stdout + proc.stderr
        assert "latent factor 16" in proc.stdout + proc.stderr
    finally:
        path.write_text(original)
