"""Tests of latent diffusion UNet and ControlNet training on tiny synthetic latents (tiny variant, CPU)."""

from __future__ import annotations

import copy
import json
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import validated

import maisi.train.controlnet as tc
import maisi.train.loop as loop
from maisi.core.checks import ConfigError
from maisi.core.io import sha256_file
from maisi.models.checkpoints import load_controlnet, load_diffusion
from maisi.train.batches import latent_records
from maisi.train.cache_latents import read_latent
from maisi.train.controlnet import train_controlnet, tumour_weights
from maisi.train.diffusion import train_diffusion
from maisi.train.loop import files_fingerprint, small_data_warning, step_generator
from maisi.train.settings import ControlNetSettings, DiffusionSettings, VaeSettings

LATENT = (4, 12, 10, 8)
FAST = {"variant": "tiny", "device": "cpu", "steps": 6, "batch_size": 2, "latent_patch": (8, 8, 8), "checkpoint_every": 2}


def _write_case(folder, case_id, mu, sigma, spacing=(1.5, 1.5, 2.0), top=(0, 1, 0, 0), bottom=(0, 0, 1, 0)):
    path = folder / f"{case_id}.npz"
    dim = np.array([4 * n for n in mu.shape[1:]])
    np.savez(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), affine=np.diag([*spacing, 1.0]), dim=dim,
             spacing=np.array(spacing), top_region_index=np.array(top), bottom_region_index=np.array(bottom))  # fmt: skip
    return path


def _label(seed: int, tumour: bool) -> np.ndarray:
    shape = tuple(4 * n for n in LATENT[1:])
    label = np.zeros(shape, np.uint8)
    label[4:44, 4:36, 2:30] = 200  # body
    label[10:30, 8:24, 6:20] = 1  # liver
    label[30:40, 20:34, 10:26] = 3 + seed  # another organ
    if tumour:
        label[14:22, 10:18, 8:16] = 23  # lung tumour
    return label


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three cases (c1 holds tumour label 23), their records (shuffled), and a one-case easy dataset."""
    folder = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    records = []
    for i, case_id in enumerate(["c2", "c0", "c1"]):
        mu = rng.normal(0, 2.0, LATENT)
        sigma = rng.uniform(0.01, 0.1, LATENT)
        latent = _write_case(folder, case_id, mu, sigma, spacing=(1.0 + i, 1.5, 2.0), top=np.eye(4, dtype=int)[i % 4])
        label = folder / f"{case_id}_label.nii.gz"
        nib.save(nib.Nifti1Image(_label(i, case_id == "c1"), np.eye(4)), str(label))
        records.append({"case_id": case_id, "latent": str(latent), "label": str(label)})
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 8)] * 3, indexing="ij")
    pattern = np.stack([np.sin(3 * x), np.cos(2 * y), x * z, np.sign(y)])
    easy = [{"case_id": "easy", "latent": str(_write_case(folder, "easy", pattern, np.full(pattern.shape, 1e-3)))}]
    return {"folder": folder, "records": records, "easy": easy}


def _train(records, out, **overrides):
    settings = DiffusionSettings(**{**FAST, **overrides})
    return train_diffusion(records, settings, out / "diffusion.pt", out / "diffusion.png", out / ".resume" / "diffusion.pt")


def _weights(path, key="unet_state_dict"):
    return torch.load(path, weights_only=True)[key]


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The reference diffusion run (rflow, 6 steps); its checkpoint also feeds the ControlNet tests."""
    out = tmp_path_factory.mktemp("reference")
    result = _train(data["records"], out)
    return {"out": out, "checkpoint": out / "diffusion.pt", "result": result}


def _expected_scale(records) -> float:
    gen = step_generator(0, "train_diffusion", 0)
    zs = []
    for rec in sorted(records, key=lambda r: r["case_id"]):
        lat = read_latent(rec["latent"])
        mu, sigma = torch.from_numpy(lat["mu"]), torch.from_numpy(lat["sigma"])
        zs.append((mu + sigma * torch.randn(mu.shape, generator=gen)).reshape(-1))
    return float(1.0 / torch.cat(zs).std())


# --------------------------------------------------------------------------- diffusion


@pytest.mark.parametrize("kind", ["rflow", "ddpm"])
def test_diffusion_writes_a_checkpoint_load_diffusion_reads(kind, data, reference, tmp_path):
    if kind == "rflow":
        out, result, steps = reference["out"], reference["result"], FAST["steps"]
    else:
        out, steps = tmp_path, 2
        result = _train(data["records"], out, scheduler="ddpm", steps=steps, batch_size=1, min_cases=3)
    ckpt = out / "diffusion.pt"
    unet, scale, timesteps = load_diffusion(ckpt, "tiny")
    assert timesteps == 1000 and isinstance(unet, torch.nn.Module)
    assert scale == pytest.approx(_expected_scale(data["records"]), rel=1e-6)
    assert 0.2 < scale < 1.0  # the latents' spread is about 2, not 1
    raw = torch.load(ckpt, weights_only=True)
    assert raw["scheduler"] == kind and raw["variant"] == "tiny" and raw["steps"] == steps
    sidecar = json.loads((out / "diffusion.pt.json").read_text(encoding="utf-8"))
    assert sidecar["stage"] == "train_diffusion" and sidecar["scheduler"] == kind
    assert sidecar["data_fingerprint"] == files_fingerprint([r["latent"] for r in data["records"]])
    assert sidecar["cases"] == ["c0", "c1", "c2"] and sidecar["scale_factor"] == pytest.approx(scale)
    if kind == "rflow":  # 3 cases against the default threshold of 50
        assert "train_diffusion: trained on 3 case(s), fewer than model.min_training_cases (50)" in sidecar["small_data_warning"]
    else:  # min_cases=3: enough
        assert sidecar["small_data_warning"] is None
    assert sidecar["metrics"]["final_loss"] == pytest.approx(result["history"][-1]) and len(result["history"]) == steps
    assert all(np.isfinite(result["history"]))
    assert (out / "diffusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".resume" / "diffusion.pt").exists()


def test_diffusion_learns_a_fixed_latent(data, tmp_path):
    result = _train(data["easy"], tmp_path, steps=24, lr=3e-3, batch_size=1, latent_patch=None, checkpoint_every=100)
    h = result["history"]  # rflow: the untrained UNet outputs zeros (loss ~1.2); the velocity is learnable
    assert np.mean(h[-6:]) < 0.9 * np.mean(h[:6]) and np.mean(h[-6:]) < 0.8 * h[0], h


# --------------------------------------------------------------------------- reproducibility and resume


def _crash_at(monkeypatch, stage: str, at: int) -> dict[str, int]:
    """Make the loop's step generator raise once at step ``at`` of ``stage``."""
    calls = {"n": 0}

    def failing(seed, name, step, device="cpu"):
        if name == stage and step == at and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError(f"simulated crash at step {step}")
        return step_generator(seed, name, step, device)

    monkeypatch.setattr(loop, "step_generator", failing)
    return calls


def test_diffusion_is_reproducible_and_resumes_bit_exactly(data, reference, tmp_path, monkeypatch):
    ref, ref_history = _weights(reference["checkpoint"]), reference["result"]["history"]
    crashed, other = tmp_path / "crash", tmp_path / "other"
    calls = _crash_at(monkeypatch, "train_diffusion", 4)
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        _train(data["records"], crashed)
    assert calls["n"] == 1 and not (crashed / "diffusion.pt").exists()
    state = torch.load(crashed / ".resume" / "diffusion.pt", weights_only=True)
    assert state["step"] == 4 and state["history"] == ref_history[:4]

    _crash_at(monkeypatch, "train_diffusion", 4)
    with pytest.raises(RuntimeError):
        _train(data["records"], other, seed=1)
    other_state = torch.load(other / ".resume" / "diffusion.pt", weights_only=True)
    assert other_state["step"] == 4 and not _same(state["model"], other_state["model"])  # another seed, other weights

    resumed = _train(data["records"], crashed)
    assert resumed["resumed_from"] == 4 and resumed["history"] == ref_history
    assert _same(ref, _weights(crashed / "diffusion.pt"))
    assert not (crashed / ".resume" / "diffusion.pt").exists()

    # The seed-1 resume state does not fit the reference settings: ignored, the run starts afresh
    # and (uninterrupted) reproduces the reference weights exactly.
    fresh = _train(data["records"], other)
    assert fresh["resumed_from"] == 0 and fresh["history"] == ref_history
    assert _same(ref, _weights(other / "diffusion.pt"))
    assert not (other / ".resume" / "diffusion.pt").exists()


# --------------------------------------------------------------------------- ControlNet

CN = {"steps": 4}


def _train_cn(records, diffusion, out, **overrides):
    settings = ControlNetSettings(**{**FAST, **CN, **overrides})
    return train_controlnet(records, diffusion, settings, out / "controlnet.pt", out / "controlnet.png", out / ".resume" / "cn.pt")


@pytest.fixture(scope="module")
def controlnet(data, reference, tmp_path_factory):
    """A ControlNet run (4 steps) that records the frozen UNet before and after training."""
    out = tmp_path_factory.mktemp("controlnet")
    seen = {}

    def spy(path, variant_name):
        unet, scale, steps = load_diffusion(path, variant_name)
        seen["unet"], seen["before"] = unet, copy.deepcopy(unet.state_dict())
        return unet, scale, steps

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tc, "load_diffusion", spy)
        result = _train_cn(data["records"], reference["checkpoint"], out)
    return {"out": out, "result": result, **seen}


def test_controlnet_trains_on_the_frozen_unet(data, reference, controlnet):
    out = controlnet["out"]
    after = {k: v.cpu() for k, v in controlnet["unet"].state_dict().items()}
    assert _same(controlnet["before"], after) and _same(after, _weights(reference["checkpoint"]))
    assert not any(p.requires_grad for p in controlnet["unet"].parameters())

    model = load_controlnet(out / "controlnet.pt", "tiny")
    zero_init = [p for n, p in model.named_parameters() if n.startswith(("controlnet_mid_block", "controlnet_down_blocks"))]
    assert zero_init and all(p.abs().sum() > 0 for p in zero_init)  # the zero-initialised output convs have learnt
    raw = torch.load(out / "controlnet.pt", weights_only=True)
    assert raw["variant"] == "tiny" and raw["steps"] == CN["steps"]
    sidecar = json.loads((out / "controlnet.pt.json").read_text(encoding="utf-8"))
    assert sidecar["stage"] == "train_controlnet" and sidecar["scheduler"] == "rflow"
    assert sidecar["diffusion_sha256"] == sha256_file(reference["checkpoint"])
    assert sidecar["small_data_warning"].startswith("train_controlnet: trained on 3 case(s)") and "may blur" in sidecar["small_data_warning"]
    labels = [r["label"] for r in data["records"]]
    assert sidecar["data_fingerprint"] == files_fingerprint([r["latent"] for r in data["records"]] + labels)
    assert sidecar["metrics"]["final_loss"] == pytest.approx(controlnet["result"]["history"][-1])
    assert (out / "controlnet.png").is_file() and not (out / ".resume" / "cn.pt").exists()


def test_controlnet_resumes_bit_exactly(data, reference, controlnet, tmp_path, monkeypatch):
    calls = _crash_at(monkeypatch, "train_controlnet", 2)
    with pytest.raises(RuntimeError, match="step 2"):
        _train_cn(data["records"], reference["checkpoint"], tmp_path, checkpoint_every=2)
    resumed = _train_cn(data["records"], reference["checkpoint"], tmp_path, checkpoint_every=2)
    assert calls["n"] == 1 and resumed["resumed_from"] == 2 and resumed["history"] == controlnet["result"]["history"]
    key = "controlnet_state_dict"
    assert _same(_weights(controlnet["out"] / "controlnet.pt", key), _weights(tmp_path / "controlnet.pt", key))


def test_tumour_weight_changes_the_loss(data, reference, tmp_path):
    tumour_case = [r for r in data["records"] if r["case_id"] == "c1"]
    losses = {}
    for weight in (1.0, 100.0):
        result = _train_cn(tumour_case, reference["checkpoint"], tmp_path / str(weight), steps=1, latent_patch=None,
                           batch_size=1, tumour_weight=weight)  # fmt: skip
        losses[weight] = result["history"][0]
    assert losses[100.0] > 1.5 * losses[1.0]


def test_tumour_weights_mark_latent_voxels_whose_block_holds_a_tumour():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
    label[0, 0, 5, 1, 2] = 23  # latent voxel (1, 0, 0)
    label[0, 0, 0, 6, 6] = 22  # not a tumour
    w = tumour_weights(label, (23, 24), 100.0)
    assert w.shape == (1, 1, 2, 2, 2) and w[0, 0, 1, 0, 0] == 100.0 and float(w.sum()) == 100.0 + 7
    assert tumour_weights(label, (23,), 1.0) is None


def test_controlnet_needs_a_label_per_case(data, reference, tmp_path):
    records = copy.deepcopy(data["records"])
    next(r for r in records if r["case_id"] == "c2")["label"] = ""
    with pytest.raises(ValueError, match="case c2"):
        _train_cn(records, reference["checkpoint"], tmp_path)
    records = copy.deepcopy(data["records"])
    records[0]["label"] = str(tmp_path / "gone.nii.gz")
    with pytest.raises(ValueError, match="gone.nii.gz"):
        _train_cn(records, reference["checkpoint"], tmp_path)


# --------------------------------------------------------------------------- inputs and errors


def test_empty_or_missing_latents_are_clear_errors(data, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        _train([], tmp_path)
    with pytest.raises(ValueError, match="empty"):
        _train(pd.DataFrame(columns=["case_id", "latent"]), tmp_path)
    missing = [*data["records"][:2], {"case_id": "c9", "latent": str(tmp_path / "c9.npz")}]
    with pytest.raises(ValueError, match="c9.npz: latent file not found"):
        _train(missing, tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a readable latent"):
        _train([{"case_id": "bad", "latent": str(tmp_path / "bad.npz")}], tmp_path)
    assert not (tmp_path / "diffusion.pt").exists()


def test_settings_from_config_and_json():
    cfg = validated(train_diffusion={"scheduler": "ddpm", "latent_patch": [8, 8, 8], "steps": 3}, model={"variant": "tiny", "device": "cpu"})
    s = DiffusionSettings.from_config(cfg)
    assert s.latent_patch == (8, 8, 8) and s.device == "cpu" and DiffusionSettings.from_json(s.to_json()) == s
    assert DiffusionSettings.from_config(validated(train_diffusion={"latent_patch": None})).latent_patch is None
    c = ControlNetSettings.from_config({**cfg, "train_controlnet": {**cfg["train_controlnet"], "tumour_labels": [23, 24]}})
    assert c.tumour_labels == (23, 24) and ControlNetSettings.from_json(c.to_json()) == c
    assert c.scheduler == "ddpm"  # the diffusion model's scheduler, from train_diffusion
    with pytest.raises(ValueError, match="scheduler"):
        DiffusionSettings(scheduler="ddim")
    with pytest.raises(ValueError, match="scheduler"):
        ControlNetSettings(scheduler="ddim")
    with pytest.raises(ConfigError, match="bogus"):
        validated(train_diffusion={"bogus": 1})
    few = validated(model={"min_training_cases": 2})
    assert DiffusionSettings.from_config(few).min_cases == ControlNetSettings.from_config(few).min_cases == VaeSettings.from_config(few).min_cases == 2
    assert DiffusionSettings.from_config(validated()).min_cases == 50
    with pytest.raises(ConfigError, match="min_training_cases"):
        validated(model={"min_training_cases": -1})


def test_small_data_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="maisi.train.loop"):
        assert small_data_warning("train_x", 5, 5) is None and small_data_warning("train_x", 9, 0) is None
        assert not caplog.records
        message = small_data_warning("train_x", 4, 5)
    assert message.startswith("train_x: trained on 4 case(s), fewer than model.min_training_cases (5)") and caplog.records[0].message == message


def test_latent_records_join_labels_from_the_case_table(data, tmp_path):
    recs = data["records"]
    table = pd.DataFrame({"source": "phantom", "case_id": [r["case_id"] for r in recs], "status": "ok", "latent": [r["latent"] for r in recs]})
    table.loc[len(table)] = {"source": "phantom", "case_id": "c3", "status": "error", "latent": ""}
    table.to_csv(tmp_path / "latents.tsv", sep="\t", index=False)
    cases = pd.DataFrame({"source": "phantom", "case_id": [r["case_id"] for r in recs], "label": [r["label"] for r in recs]})
    cases.to_csv(tmp_path / "cases.tsv", sep="\t", index=False)
    frame = latent_records([tmp_path / "latents.tsv"], cases=tmp_path / "cases.tsv")
    assert sorted(frame.case_id) == ["c0", "c1", "c2"]
    assert dict(zip(frame.case_id, frame.label, strict=True)) == {r["case_id"]: r["label"] for r in recs}


def test_resume_fingerprint_ignores_the_device():
    a = DiffusionSettings(**{**FAST, "device": "cpu"}).run_fingerprint()
    assert a == DiffusionSettings(**{**FAST, "device": "auto"}).run_fingerprint()
    assert a != DiffusionSettings(**{**FAST, "seed": 3}).run_fingerprint()
    assert a == DiffusionSettings(**{**FAST, "device": "cpu", "min_cases": 1}).run_fingerprint()  # a warning threshold, not a weight


def test_rflow_noise_levels_of_crops_follow_their_whole_latents():
    """Crops of a 32^3 latent get the noise levels RFlow gives 32^3 latents (what generation walks through),
    not the lower ones of 16^3 latents."""
    from monai.networks.schedulers import RFlowScheduler

    from maisi.train.batches import noise_inputs

    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False, use_timestep_transform=True, sample_method="logit-normal")
    z = torch.zeros(2, 4, 16, 16, 16)
    crops, wholes = [], []
    for k in range(1000):
        for whole, into in ((None, crops), ([(32, 32, 32)] * 2, wholes)):
            _, t, _ = noise_inputs(scheduler, "rflow", z, torch.Generator().manual_seed(k), torch.device("cpu"), whole)
            into.append(t)
    crops, wholes = torch.cat(crops), torch.cat(wholes)
    # logit-normal noise levels: the 32^3 latent is RFlow's base size (no shift), 16^3 halves the odds of noise
    assert abs(float(wholes.mean()) - 500) < 15 and float((wholes > 800).float().mean()) > 0.07
    assert float(crops.mean()) < 380 and float((crops > 800).float().mean()) < 0.03
