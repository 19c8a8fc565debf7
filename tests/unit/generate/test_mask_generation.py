"""Mask generation from anatomy sizes, against NVIDIA's reference (``sample_mask.py``, ``sample.py``).

Random weights in NVIDIA's file layouts; the same float32 noise and DDPM step noise on both sides;
NVIDIA's post-processing is replaced by a recorder, since the factory's output is compared before it.
The mask autoencoder is built with ``num_splits`` 1 on both sides (NVIDIA's 8 splits need latents of
at least about 32 voxels per axis; splitting does not change the result).
"""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from helpers.nvidia import nvidia_config, nvidia_module
from monai.networks.schedulers import DDPMScheduler

from maisi.core.seeds import derive_seed
from maisi.generate.mask_generation import (
    ANATOMY_SIZE_ORDER,
    anatomy_size_condition,
    check_anatomy_sizes,
    decode_mask,
    generate_mask,
    load_mask_generator,
    read_size_conditions,
    sample_mask_latent,
)
from maisi.models.networks import build_mask_autoencoder, build_mask_diffusion, float32_norms
from maisi.models.variants import variant

SEED, STEPS, LATENT = 5, 4, (8, 8, 8)
#: Sizes exactly representable in float16 (NVIDIA rounds the condition to float16).
CONDITION = [0.5, 0.25, 0.125, 0.75, 0.375, -1.0, -1.0, 0.5, -1.0, -1.0]


def _small_variant():
    var = variant("rflow-ct")
    mg = json.loads(json.dumps(var.mask_generation))
    mg["networks"]["autoencoder"]["num_splits"] = 1
    return dataclasses.replace(var, mask_generation=mg)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for MONAI's zero-initialised layers: with a zero output layer the UNet predicts nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


@pytest.fixture(scope="module")
def mask_files(tmp_path_factory):
    """NVIDIA's layouts: a plain autoencoder state dict; ``{unet_state_dict, scale_factor}``."""
    root = tmp_path_factory.mktemp("mask_models")
    torch.manual_seed(1)
    var = _small_variant()
    paths = {"autoencoder": root / "mask_generation_autoencoder.pt", "diffusion": root / "mask_generation_diffusion_unet.pt"}
    torch.save(build_mask_autoencoder(var).state_dict(), paths["autoencoder"])
    unet = _randomise(build_mask_diffusion(var), 2)
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0055984258651733)}, paths["diffusion"])
    return paths


class _SeededDDPM(DDPMScheduler):
    """NVIDIA's mask scheduler with the factory's per-step generator (NVIDIA's draws from torch's global one)."""

    def __init__(self, generator: torch.Generator, definition: dict):
        super().__init__(**{k: v for k, v in definition.items() if k != "kind"})
        self._generator = generator

    def step(self, model_output, timestep, sample, generator=None):
        return super().step(model_output, timestep, sample, generator=self._generator)


class _FloatContext(torch.nn.Module):
    """NVIDIA hands the UNet a float16 condition (for CUDA autocast); on the CPU it takes float32."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context=None):
        return self.unet(x, timesteps=timesteps, context=context.float())


def test_generated_mask_matches_nvidia_before_post_processing(mask_files, monkeypatch):
    ours = load_mask_generator(mask_files["autoencoder"], mask_files["diffusion"], _small_variant(), "cpu")
    z = sample_mask_latent(ours, CONDITION, SEED, STEPS, LATENT, progress=False)
    label = decode_mask(ours, z)

    sample_mask = nvidia_module("sample_mask")
    theirs = load_mask_generator(mask_files["autoencoder"], mask_files["diffusion"], _small_variant(), "cpu")  # separate modules
    recorded: dict = {}
    decode = theirs.autoencoder.decode_stage_2_outputs
    monkeypatch.setattr(theirs.autoencoder, "decode_stage_2_outputs", lambda x: recorded.setdefault("z", x.clone()) is not None and decode(x),
                        raising=False)  # fmt: skip
    monkeypatch.setattr(sample_mask, "initialize_noise_latents", lambda shape, device: torch.randn([1, *shape]).to(device))
    monkeypatch.setattr(sample_mask, "general_mask_generation_post_process",
                        lambda data, target_tumor_label=None, device=None: recorded.setdefault("data", data.copy()))  # fmt: skip
    scheduler = _SeededDDPM(torch.Generator().manual_seed(derive_seed(SEED, "mask", "ddpm")), variant("rflow-ct").mask_generation["scheduler"])
    torch.manual_seed(SEED)
    with float32_norms(theirs.autoencoder):
        sample_mask.ldm_conditional_sample_one_mask(
            theirs.autoencoder, _FloatContext(theirs.unet), scheduler, theirs.scale_factor, CONDITION, torch.device("cpu"), (4, *LATENT),
            label_dict_remap_json=str(nvidia_config("label_dict_124_to_132.json")), num_inference_steps=STEPS,
        )  # fmt: skip
    assert float((z / ours.scale_factor - recorded["z"]).abs().max()) <= 1e-5
    assert float(z.abs().max()) > 0.5
    assert label.shape == recorded["data"].shape == (32, 32, 32)
    assert np.array_equal(label, recorded["data"].astype(np.uint8))
    assert len(np.unique(label)) > 3  # random weights give many classes: a mapping error would show


def test_channel_classes_are_nvidias_remapping():
    remap = json.loads(nvidia_config("label_dict_124_to_132.json").read_text())
    assert [v[1] for v in sorted(remap.values())] == variant("rflow-ct").mask_generation["classes"]


@pytest.mark.parametrize(
    "sizes,ok",
    [
        ([("liver", 0.5), ("hepatic tumor", 0.2)], True),
        ([("pancreas", -1)], True),
        ([("liver", 1.2)], False),
        ([("heart", 0.5)], False),
        ([("lung tumor", 0.3), ("bone lesion", 0.3)], False),
        ([("liver", 0.3), ("liver", 0.4)], False),
    ],
)
def test_anatomy_size_checks_agree_with_nvidia(sizes, ok, tmp_path):
    check_input_ct = nvidia_module("sample_mask").check_input_ct
    try:
        check_input_ct(["chest"], [], str(nvidia_config("label_dict.json")), (256, 256, 256), (1.5, 1.5, 1.5), sizes)
        nvidia_ok = True
    except ValueError:
        nvidia_ok = False
    assert nvidia_ok == ok
    if ok:
        assert check_anatomy_sizes(sizes) == [(n, float(s)) for n, s in sizes]
    else:
        with pytest.raises(ValueError, match="controllable_anatomy_size"):
            check_anatomy_sizes(sizes)


def test_condition_from_the_size_database_matches_nvidia(tmp_path):
    rng = np.random.default_rng(0)
    database = [{"organ_size": [round(float(v), 3) for v in rng.uniform(0, 1, 10)]} for _ in range(50)]
    path = tmp_path / "all_anatomy_size_conditions.json"
    path.write_text(json.dumps(database))
    sampler = types.SimpleNamespace(all_anatomy_size_conditions_json=str(path))
    prepare = nvidia_module("sample").LDMSampler.prepare_anatomy_size_condition
    for sizes in ([("liver", 0.3)], [("pancreas", 0.9), ("pancreatic tumor", 0.1)], [("colon", -1), ("stomach", 0.5)]):
        theirs = prepare(sampler, [list(s) for s in sizes])
        ours = anatomy_size_condition(check_anatomy_sizes(sizes), read_size_conditions(path))
        assert ours == pytest.approx(theirs)
    assert len(ANATOMY_SIZE_ORDER) == 10


def test_generate_mask_records_what_it_did(mask_files, tmp_path):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps([{"organ_size": [0.1] * 10}, {"organ_size": [0.6] * 10}]))
    models = load_mask_generator(mask_files["autoencoder"], mask_files["diffusion"], _small_variant(), "cpu")
    models.variant.mask_generation["latent_shape"] = [4, *LATENT]
    label, record = generate_mask(models, [("liver", 0.5)], read_size_conditions(path), seed=3, steps=2, progress=False)
    again, _ = generate_mask(models, [("liver", 0.5)], read_size_conditions(path), seed=3, steps=2, progress=False)
    assert label.shape == (32, 32, 32) and np.array_equal(label, again)  # the same seed, the same map
    assert record["condition"] == [0.6, 0.5] + [0.6] * 8 and record["post_processed"] is False
    with pytest.raises(ValueError, match="not an anatomy-size database"):
        read_size_conditions(tmp_path / "missing.json")
