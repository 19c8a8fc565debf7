"""The ready-made configs of config/examples: each plans the real workflow (a dry run) in a working directory
of its own, with placeholder files where NVIDIA's weights go and two small CTs as the user's data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from helpers.paths import ROOT
from helpers.volumes import ct_volume, write_nifti
from helpers.workflow_runner import planned_jobs

EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))


def _workdir(tmp_path, example):
    cfg = yaml.safe_load(example.read_text(encoding="utf-8"))
    (tmp_path / "config").mkdir()
    shutil.copy(example, tmp_path / "config" / "config.yaml")
    for path in [*cfg["pretrained"].values(), *(v for k, v in cfg["generate"].get("mask_generation", {}).items() if k != "steps")]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"placeholder: the dry run only checks that the file is there")
    src = cfg["sources"]["my_ct"]
    for i in range(2):
        vol = ct_volume(seed=i)
        label = np.zeros(vol.shape, np.uint8)
        label[8:30, 8:28, 4:16] = 200
        label[12:20, 12:20, 6:12] = 1
        write_nifti(tmp_path / src["path"] / src["images"].format(case=f"ct{i}"), vol.astype(np.int16))
        write_nifti(tmp_path / src["path"] / src["labels"].format(case=f"ct{i}"), label)
    return tmp_path, cfg


def test_examples_exist():
    assert {p.name for p in EXAMPLES} == {"rflow-ct-paired.yaml", "rflow-ct-image-only.yaml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans(tmp_path, example):
    work, cfg = _workdir(tmp_path, example)
    jobs = planned_jobs(work, "all")
    requests = cfg["generate"]["requests"]
    shards = sum(-(-r["n_cases"] // cfg["generate"]["cases_per_shard"]) for r in requests.values())
    assert jobs["generate"] == shards and jobs["qc_check"] == shards and jobs["release"] == 1
    assert not any(rule.startswith("train_") for rule in jobs)  # every network is NVIDIA's
    assert "mask_database" not in jobs  # generated masks, or none
    assert cfg["model"]["variant"] == "rflow-ct"


def test_nvidia_mask_database_plans(tmp_path):
    """Requests drawing maps from NVIDIA's candidate database: its archive is extracted once, then indexed."""
    work, cfg = _workdir(tmp_path, ROOT / "config" / "examples" / "rflow-ct-paired.yaml")
    request = cfg["generate"]["requests"]["chest_abdomen_liver_tumour"]
    request.update(masks="database", controllable_anatomy_size=[])
    (work / "nvidia").mkdir()
    for name in ("candidates.json", "masks.zip"):
        (work / "nvidia" / name).write_bytes(b"placeholder")
    cfg["generate"]["mask_database"] = {"source": "nvidia", "nvidia_candidates": "nvidia/candidates.json", "nvidia_masks": "nvidia/masks.zip"}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    jobs = planned_jobs(work, "all")
    assert jobs["nvidia_masks"] == 1 and jobs["mask_database"] == 1 and jobs["generate"] == 5


def test_own_masks_plan(tmp_path):
    """A request conditioned on the user's own maps: they are inputs of its generation jobs."""
    work, cfg = _workdir(tmp_path, ROOT / "config" / "examples" / "rflow-ct-image-only.yaml")
    request = cfg["generate"]["requests"]["chest"]
    request.update(masks="folder", mask_folder={"path": "data/my_ct", "labels": "labelsTr/{case}.nii.gz", "images": "imagesTr/{case}.nii.gz"})
    cfg["generate"]["user_masks"] = {"out_of_range": "warn"}  # the test's maps are far smaller than a chest CT
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    jobs = planned_jobs(work, "all")
    assert jobs["generate"] == 5 and "mask_database" not in jobs
    cfg["generate"]["user_masks"] = {"out_of_range": "refuse"}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    from helpers.workflow_runner import snakemake

    proc = snakemake(work, "--dry-run", "all", check=False)
    assert proc.returncode != 0 and "recommended [350, 350, 310] mm for chest -> chest" in proc.stdout + proc.stderr
