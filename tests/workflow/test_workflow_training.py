"""End-to-end: the training stages and latent caching on the phantom, what reruns, and pretrained weights."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from helpers.workflow_runner import PREPARED, TRAINING, edit_config, make_workdir, planned_jobs, snakemake

from maisi.models.checkpoints import load_controlnet, load_diffusion
from maisi.models.networks import build_autoencoder, build_diffusion_unet

pytestmark = pytest.mark.e2e


def _config(**extra):
    cfg = {
        "run_name": "training",
        "shards": 2,
        "sources": {"phantom": {"type": "phantom", "n_cases": 3, "spacing_xy": [3.0, 4.0], "spacing_z": [4.0, 5.0]}},
        "model": {"variant": "tiny", "device": "cpu"},
        **json.loads(json.dumps(TRAINING)),
    }
    cfg.update(extra)
    return cfg


def test_all_trains_every_stage(default_run):
    work, cfg = default_run
    models = work / "results" / "models"
    for name in ("autoencoder", "diffusion_unet", "controlnet"):
        assert (models / f"{name}.pt").is_file() and (models / f"{name}_loss.png").is_file()
        sidecar = json.loads((models / f"{name}.pt.json").read_text(encoding="utf-8"))
        assert sidecar["sha256"] and sidecar["settings"] and sidecar["data_fingerprint"] and sidecar["metrics"]
        assert not (models / ".resume" / f"{name}.pt").exists()
    unet, scale, steps = load_diffusion(models / "diffusion_unet.pt", "tiny")
    assert 0 < scale < 1e3 and steps == 1000
    load_controlnet(models / "controlnet.pt", "tiny")
    tables = sorted((work / "results" / "latents" / "phantom" / "shards").glob("*.tsv"))
    rows = sum(len(t.read_text(encoding="utf-8").splitlines()) - 1 for t in tables)
    split = pd.read_csv(work / "results/prepared/cases.tsv", sep="\t").split
    assert rows == (split == "train").sum() == cfg["sources"]["phantom"]["n_cases"] - (split == "held_out").sum()  # held-out: never encoded
    for name in ("train_vae", "train_diffusion", "train_controlnet"):
        assert (work / "results" / "benchmarks" / f"{name}.tsv").is_file()
    assert planned_jobs(work, "all") == {}


def _n_shards(work, stage="latents"):
    return len(list((work / "results" / stage / "phantom" / "shards").glob("*.tsv")))


def test_latent_and_vae_settings_rerun_their_stage_and_below(default_run):
    work, _ = default_run
    edit_config(work, "cache_latents", overlap=0.5)
    jobs = planned_jobs(work, "all")
    assert jobs.get("cache_latents") == _n_shards(work) and {"train_diffusion", "train_controlnet"} <= set(jobs)
    assert not {"train_vae", "preprocess", "regions", "phantom"} & set(jobs)
    edit_config(work, "cache_latents", overlap=0.25)
    edit_config(work, "train_vae", kl_weight=1.0e-6)
    jobs = planned_jobs(work, "all")
    assert jobs.get("train_vae") == 1 and jobs.get("cache_latents") == _n_shards(work)
    assert not {"preprocess", "regions", "phantom", "dataset"} & set(jobs)
    edit_config(work, "train_vae", kl_weight=1.0e-7)
    assert planned_jobs(work, "all") == {}


def _released_checkpoints(folder):
    """Tiny networks saved in the layout of NVIDIA's released MAISI files."""
    folder.mkdir()
    torch.manual_seed(1)
    torch.save(build_autoencoder("tiny").state_dict(), folder / "autoencoder.pt")  # a plain state dict
    unet = build_diffusion_unet("tiny")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.8), "num_train_timesteps": 1000},
               folder / "diffusion.pt")  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The data stages of the training tests' phantom, run once; each test runs on a copy with its own `pretrained`."""
    work = make_workdir(tmp_path_factory.mktemp("training") / "work", _config())
    snakemake(work, *PREPARED)
    return work


def _work_with(prepared, dest, pretrained):
    work = dest / "work"
    shutil.copytree(prepared, work, symlinks=True)  # file times and Snakemake's records kept: nothing prepared again
    return make_workdir(work, _config(pretrained=pretrained))


def test_pretrained_checkpoints_skip_their_training(prepared, tmp_path):
    released = _released_checkpoints(tmp_path / "released")
    pretrained = {"autoencoder": str(released / "autoencoder.pt"), "diffusion": str(released / "diffusion.pt")}
    work = _work_with(prepared, tmp_path, pretrained)
    jobs = planned_jobs(work, "all")
    assert "train_vae" not in jobs and "train_diffusion" not in jobs and not {"phantom", "preprocess", "dataset"} & set(jobs)
    assert jobs["cache_latents"] >= 1 and jobs["train_controlnet"] == 1
    snakemake(work, "results/models/controlnet.pt", timeout=1500)
    models = work / "results" / "models"
    assert not (models / "autoencoder.pt").exists() and not (models / "diffusion_unet.pt").exists()
    sidecar = json.loads((models / "controlnet.pt.json").read_text(encoding="utf-8"))
    assert sidecar["diffusion_sha256"] == __import__("hashlib").sha256((released / "diffusion.pt").read_bytes()).hexdigest()


def test_pretrained_checkpoint_that_does_not_fit_is_a_clear_error(prepared, tmp_path):
    released = _released_checkpoints(tmp_path / "released")
    state = torch.load(released / "autoencoder.pt", weights_only=True)
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 5)
    state[key] = torch.zeros(3, *state[key].shape[1:])
    torch.save(state, released / "autoencoder.pt")
    work = _work_with(prepared, tmp_path, {"autoencoder": str(released / "autoencoder.pt")})
    proc = snakemake(work, "all", check=False, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "autoencoder.pt: the autoencoder checkpoint does not fit the chosen variant" in out and key in out
    assert not list((work / "results").glob("latents/**/*.npz"))

    missing = make_workdir(tmp_path / "work2", _config(pretrained={"diffusion": str(tmp_path / "nope.pt")}))
    proc = snakemake(missing, "all", "--dry-run", check=False)
    assert proc.returncode != 0 and "config key 'pretrained.diffusion'" in proc.stdout + proc.stderr
