"""End-to-end: the training stages and latent caching on the phantom, what reruns, and pretrained weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from workflow_runner import make_workdir, planned_jobs, snakemake

from maisi.models import build_autoencoder, build_diffusion_unet, load_controlnet, load_diffusion

pytestmark = pytest.mark.e2e

TRAINING = {
    "train_vae": {"steps": 4, "checkpoint_every": 2},
    "train_diffusion": {"steps": 4, "checkpoint_every": 2},
    "train_controlnet": {"steps": 3, "checkpoint_every": 2},
}


def _config(**extra):
    cfg = {
        "run_name": "training",
        "shards": 2,
        "sources": {"phantom": {"type": "phantom", "n_cases": 3, "spacing_xy": [3.0, 4.0], "spacing_z": [4.0, 5.0]}},
        "model": {"preset": "tiny", "device": "cpu"},
        **json.loads(json.dumps(TRAINING)),
    }
    cfg.update(extra)
    return cfg


def _edit(work, section, **values):
    path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("training") / "work", _config())
    snakemake(work, "all", timeout=1500)
    return work


def test_all_trains_every_stage(trained):
    models = trained / "results" / "models"
    for name in ("autoencoder", "diffusion_unet", "controlnet"):
        assert (models / f"{name}.pt").is_file() and (models / f"{name}_loss.png").is_file()
        sidecar = json.loads((models / f"{name}.pt.json").read_text(encoding="utf-8"))
        assert sidecar["sha256"] and sidecar["settings"] and sidecar["data_fingerprint"] and sidecar["metrics"]
        assert not (models / ".resume" / f"{name}.pt").exists()
    unet, scale, steps = load_diffusion(models / "diffusion_unet.pt", "tiny")
    assert 0 < scale < 1e3 and steps == 1000
    load_controlnet(models / "controlnet.pt", "tiny")
    tables = sorted((trained / "results" / "latents" / "phantom" / "shards").glob("*.tsv"))
    rows = sum(len(t.read_text(encoding="utf-8").splitlines()) - 1 for t in tables)
    assert rows == 3
    for name in ("train_vae", "train_diffusion", "train_controlnet"):
        assert (trained / "results" / "benchmarks" / f"{name}.tsv").is_file()
    assert planned_jobs(trained, "all") == {}


def test_diffusion_hyperparameter_reruns_diffusion_and_controlnet_only(trained):
    _edit(trained, "train_diffusion", lr=2.0e-4)
    try:
        assert planned_jobs(trained, "all") == {"train_diffusion": 1, "train_controlnet": 1, "all": 1}
    finally:
        _edit(trained, "train_diffusion", lr=1.0e-4)
    assert planned_jobs(trained, "all") == {}


def _n_shards(work):
    return len(list((work / "results" / "latents" / "phantom" / "shards").glob("*.tsv")))


def test_latent_and_vae_settings_rerun_their_stage_and_below(trained):
    _edit(trained, "cache_latents", overlap=0.5)
    jobs = planned_jobs(trained, "all")
    assert jobs.get("cache_latents") == _n_shards(trained) and {"train_diffusion", "train_controlnet"} <= set(jobs)
    assert not {"train_vae", "preprocess", "regions", "phantom"} & set(jobs)
    _edit(trained, "cache_latents", overlap=0.25)
    _edit(trained, "train_vae", kl_weight=1.0e-6)
    jobs = planned_jobs(trained, "all")
    assert jobs.get("train_vae") == 1 and jobs.get("cache_latents") == _n_shards(trained)
    assert not {"preprocess", "regions", "phantom", "dataset"} & set(jobs)
    _edit(trained, "train_vae", kl_weight=1.0e-7)
    assert planned_jobs(trained, "all") == {}


def _released_checkpoints(folder):
    """Tiny networks saved in the layout of NVIDIA's released MAISI files."""
    folder.mkdir()
    torch.manual_seed(1)
    torch.save(build_autoencoder("tiny").state_dict(), folder / "autoencoder.pt")  # a plain state dict
    unet = build_diffusion_unet("tiny")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.8), "num_train_timesteps": 1000},
               folder / "diffusion.pt")  # fmt: skip
    return folder


def test_pretrained_checkpoints_skip_their_training(tmp_path):
    released = _released_checkpoints(tmp_path / "released")
    pretrained = {"autoencoder": str(released / "autoencoder.pt"), "diffusion": str(released / "diffusion.pt")}
    work = make_workdir(tmp_path / "work", _config(pretrained=pretrained))
    jobs = planned_jobs(work, "all")
    assert "train_vae" not in jobs and "train_diffusion" not in jobs
    assert jobs["cache_latents"] >= 1 and jobs["train_controlnet"] == 1
    snakemake(work, "all", timeout=1500)
    models = work / "results" / "models"
    assert not (models / "autoencoder.pt").exists() and not (models / "diffusion_unet.pt").exists()
    sidecar = json.loads((models / "controlnet.pt.json").read_text(encoding="utf-8"))
    assert sidecar["diffusion_sha256"] == __import__("hashlib").sha256((released / "diffusion.pt").read_bytes()).hexdigest()


def test_pretrained_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    released = _released_checkpoints(tmp_path / "released")
    state = torch.load(released / "autoencoder.pt", weights_only=True)
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 5)
    state[key] = torch.zeros(3, *state[key].shape[1:])
    torch.save(state, released / "autoencoder.pt")
    work = make_workdir(tmp_path / "work", _config(pretrained={"autoencoder": str(released / "autoencoder.pt")}))
    proc = snakemake(work, "all", check=False, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "autoencoder.pt: the autoencoder checkpoint does not fit the chosen preset" in out and key in out
    assert not list((work / "results").glob("latents/**/*.npz"))

    missing = make_workdir(tmp_path / "work2", _config(pretrained={"diffusion": str(tmp_path / "nope.pt")}))
    proc = snakemake(missing, "all", "--dry-run", check=False)
    assert proc.returncode != 0 and "config key 'pretrained.diffusion'" in proc.stdout + proc.stderr
