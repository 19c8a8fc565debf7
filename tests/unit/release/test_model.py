"""Publishing a trained model as a released one (maisi.release.model): the package files, card and catalog entries,
and loading them back through the weights catalog."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.models import save_image_checkpoints

from maisi.core.io import save_nifti, sha256_file, write_json

ROOT = Path(__file__).resolve().parents[3]


def _trained_workdir(tmp_path: Path, variant: str = "tiny") -> Path:
    """What make pretrain leaves behind, in miniature: the recipe, three checkpoints with their sidecars and
    benchmark files, and the prepared cases' table and files."""
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    recipe = yaml.safe_load((ROOT / "config/pretrain/phantom.yaml").read_text(encoding="utf-8"))
    recipe["model"]["variant"] = variant
    (work / "config/config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    models = work / "results/models"
    models.mkdir(parents=True)
    paths = save_image_checkpoints(models, variant, scale_factor=0.8)
    rows = []
    for i, split in enumerate(("train", "train", "held_out")):
        case = f"phantom_pretrain_{i:04d}"
        for kind in ("images", "labels"):
            dtype = np.float32 if kind == "images" else np.uint8
            save_nifti(np.full((4, 4, 4), i, dtype), np.eye(4), work / f"results/prepared/phantom_pretrain/{kind}/{case}.nii.gz", dtype)
        rows.append({"source": "phantom_pretrain", "case_id": case, "split": split, "top_region": "chest", "bottom_region": "abdomen",
                     "image": f"results/prepared/phantom_pretrain/images/{case}.nii.gz",
                     "label": f"results/prepared/phantom_pretrain/labels/{case}.nii.gz"})  # fmt: skip
    pd.DataFrame(rows).to_csv(work / "results/prepared/cases.tsv", sep="\t", index=False)
    (work / "results/benchmarks").mkdir(parents=True)
    for role, name, stage in (("autoencoder", "autoencoder.pt", "train_vae"), ("diffusion", "diffusion_unet.pt", "train_diffusion"),
                              ("controlnet", "controlnet.pt", "train_controlnet")):  # fmt: skip
        shutil.move(paths[role], models / name)
        write_json(models / f"{name}.json", {"file": name, "sha256": sha256_file(models / name), "settings": {"steps": 10},
                                             "metrics": {"final_l1": 0.05}, "train_seconds": 3600.0, "device": "cpu"})  # fmt: skip
        pd.DataFrame([{"s": 100.0, "cpu_time": 190.0, "max_rss": 900.0}]).to_csv(work / f"results/benchmarks/{stage}.tsv", sep="\t", index=False)
    return work


def test_published_model_loads_through_the_catalog_and_its_card_says_what_it_is(tmp_path):
    from maisi.models.checkpoints import load_diffusion
    from maisi.models.weights import load_weights_catalog, resolve_catalog_references
    from maisi.release.model import publish

    work = _trained_workdir(tmp_path)
    data_root = tmp_path / "data"
    data_root.mkdir()
    catalog_path = data_root / "weights.yaml"
    shutil.copyfile(ROOT / "maisi/data/weights.yaml", catalog_path)
    nvidia_before = [f for f in load_weights_catalog(catalog_path).files if f.repo != "package"]
    card = publish(work, data_root=data_root, quality={"qc_pass": 0.95, "organ_mae_hu": 21.0})
    catalog = load_weights_catalog(catalog_path)
    assert [f for f in catalog.files if f.repo != "package"] == nvidia_before  # NVIDIA's entries and the comments stay
    shipped = {f.role: f for f in catalog.for_variant("tiny")}
    assert set(shipped) == {"autoencoder", "diffusion", "controlnet"} and all(f.licence == "Apache-2.0" for f in shipped.values())
    for role, f in shipped.items():
        assert f.sha256 == sha256_file(data_root / f.path) == card["files"][role]["sha256"]
        assert sha256_file(data_root / f.path) == sha256_file(work / "results/models" / Path(f.path).name)  # the trained bytes
    cfg = {"model": {"variant": "tiny"}, "pretrained": {"autoencoder": "catalog:tiny"}, "train_diffusion": {"init_from": "catalog:tiny"}}
    resolve_catalog_references(cfg, catalog=catalog, root=data_root)
    assert load_diffusion(cfg["train_diffusion"]["init_from"], "tiny")[1] == pytest.approx(0.8)
    # the card: recipe, data and its digest, time, quality
    saved = json.loads((data_root / "weights/tiny/card.json").read_text(encoding="utf-8"))
    assert saved["training_data"]["training_cases"] == ["phantom_pretrain_0000", "phantom_pretrain_0001"]
    assert saved["training_data"]["held_out_cases"] == ["phantom_pretrain_0002"] and len(saved["training_data"]["digest"]) == 64
    assert saved["training"]["total_train_seconds"] == 3 * 3600.0 and saved["quality"]["organ_mae_hu"] == 21.0
    assert saved["recipe"]["config"]["sources"]["phantom_pretrain"]["n_cases"] == 120
    text = (data_root / "weights/tiny/MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in text and "catalog:tiny" in text and card["files"]["controlnet"]["sha256"] in text and "| organ_mae_hu | 21 |" in text
    # publishing again replaces the entries, it does not add more; a changed prepared case changes the data digest
    save_nifti(np.full((4, 4, 4), 7, np.uint8), np.eye(4), work / "results/prepared/phantom_pretrain/labels/phantom_pretrain_0001.nii.gz", np.uint8)
    again = publish(work, data_root=data_root)
    assert len(load_weights_catalog(catalog_path).for_variant("tiny")) == 3
    assert again["training_data"]["digest"] != saved["training_data"]["digest"]


def test_a_checkpoint_of_another_variant_is_not_published(tmp_path):
    from maisi.models.checkpoints import CheckpointError
    from maisi.release.model import publish

    work = _trained_workdir(tmp_path)
    recipe = yaml.safe_load((work / "config/config.yaml").read_text(encoding="utf-8"))
    recipe["model"]["variant"] = "phantom-ct"  # the files hold tiny networks
    (work / "config/config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (tmp_path / "data").mkdir()
    shutil.copyfile(ROOT / "maisi/data/weights.yaml", tmp_path / "data/weights.yaml")
    with pytest.raises(CheckpointError, match="look like variant 'tiny'"):
        publish(work, data_root=tmp_path / "data")
    assert not (tmp_path / "data/weights").exists()
