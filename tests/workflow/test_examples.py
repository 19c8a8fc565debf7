"""The ready-made configs of config/examples: each plans the real workflow (a dry run) in a working directory
of its own, with placeholder files where NVIDIA's weights go and two small CTs as the user's data."""

from __future__ import annotations

import pytest
import yaml
from helpers.examples import example_workdir
from helpers.paths import ROOT
from helpers.workflow_runner import planned_jobs

EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} == {"rflow-ct-paired.yaml", "rflow-ct-image-only.yaml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans(tmp_path, example):
    work, cfg = example_workdir(tmp_path, example)
    jobs = planned_jobs(work, "all")
    requests = cfg["generate"]["requests"]
    shards = sum(-(-r["n_cases"] // cfg["generate"]["cases_per_shard"]) for r in requests.values())
    assert jobs["generate"] == shards and jobs["qc_check"] == shards and jobs["release"] == 1
    assert not any(rule.startswith("train_") for rule in jobs)  # every network is NVIDIA's
    assert "mask_database" not in jobs  # generated masks, or none
    assert cfg["model"]["variant"] == "rflow-ct"


def test_nvidia_mask_database_plans(tmp_path):
    """Requests drawing maps from NVIDIA's candidate database: its archive is extracted once, then indexed."""
    work, cfg = example_workdir(tmp_path, ROOT / "config" / "examples" / "rflow-ct-paired.yaml")
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
    work, cfg = example_workdir(tmp_path, ROOT / "config" / "examples" / "rflow-ct-image-only.yaml")
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
