"""The factory's sampling against NVIDIA's reference loops (NV-Generate-CTMR) on the same weights, noise and conditions.

Random weights of both released variants are saved in NVIDIA's file layouts; the factory loads them
with its own loader, NVIDIA's code with its own (``load_image_models``). Both loops start from the
same float32 noise (NVIDIA's reference draws float16 on a GPU; on the CPU it takes float32, as its
README says) and, for DDPM, the same per-step noise. NVIDIA's loops decode at the end: the tests
record the latent their decoder is handed. Fewer steps than the variants' defaults (30 / 1000) keep
the tests short; the loops must agree at every step, whatever their number.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from helpers.models import randomise_zero_layers
from helpers.nvidia import SeededDDPM, nvidia_config, nvidia_module

from maisi.core.anatomy import one_hot
from maisi.core.seeds import derive_seed
from maisi.generate.augment import remove_tumours
from maisi.generate.requests import GenerationRequest
from maisi.generate.sampling import load_models, sample_latent
from maisi.generate.settings import DecodeSettings
from maisi.generate.tsp import decode_latent
from maisi.models.checkpoints import CheckpointError, load_diffusion
from maisi.models.networks import build_autoencoder, build_controlnet, build_diffusion_unet, float32_norms
from maisi.models.variants import read_network_config, variant

SIZE, SPACING, SEED, SCALE = (32, 32, 32), (1.5, 1.5, 2.0), 11, 0.8
STEPS = 5
LATENT_TOL = 1e-5
CONFIGS = {"rflow-ct": "config_network_rflow.json", "ddpm-ct": "config_network_ddpm.json"}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Per variant: checkpoint paths in NVIDIA's layouts (plain autoencoder state dict;
    ``{unet_state_dict, scale_factor, num_train_timesteps}``; ``{controlnet_state_dict}``)."""
    root = tmp_path_factory.mktemp("released")
    out = {}
    torch.manual_seed(0)
    ae_path = root / "autoencoder_v1.pt"
    torch.save(build_autoencoder("rflow-ct").state_dict(), ae_path)
    for i, name in enumerate(CONFIGS):
        unet = randomise_zero_layers(build_diffusion_unet(name), i)
        # A strong ControlNet, so that the tumour-free mask of guidance's unconditional branch changes the
        # latent well beyond the tolerance (about 6e-4 for ddpm-ct, which has no modality label to drop).
        controlnet = randomise_zero_layers(build_controlnet(name, unet), 10 + i, scale=0.3)
        paths = {"autoencoder": ae_path, "diffusion": root / f"diff_unet_3d_{name}.pt", "controlnet": root / f"controlnet_3d_{name}.pt"}
        torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(SCALE), "num_train_timesteps": 1000}, paths["diffusion"])
        torch.save({"controlnet_state_dict": controlnet.state_dict()}, paths["controlnet"])
        out[name] = paths
    return out


def _mask() -> np.ndarray:
    """Body, liver with a hepatic tumour, two lung lobes around a lung tumour (uint8 MAISI ids)."""
    m = np.zeros(SIZE, np.uint8)
    m[4:28, 4:28, 2:30] = 200
    m[6:16, 6:26, 4:14] = 1
    m[9:12, 10:14, 6:9] = 26
    m[17:26, 6:16, 16:28] = 28
    m[17:26, 16:26, 16:28] = 29
    m[20:23, 12:18, 20:23] = 23
    return m


@pytest.fixture(scope="module")
def nvidia_models(released):
    """Per variant, NVIDIA's ``load_image_models`` on its own network config (flash attention off: it needs
    a GPU): (autoencoder, unet, controlnet, scale factor, scheduler definition)."""
    utils_infer = nvidia_module("utils_infer")
    out = {}
    for name, paths in released.items():
        cfg = json.loads(nvidia_config(CONFIGS[name]).read_text(encoding="utf-8"))
        for key in ("diffusion_unet_def", "controlnet_def"):
            cfg[key]["use_flash_attention"] = False
        args = argparse.Namespace(**cfg, trained_autoencoder_path=str(paths["autoencoder"]), trained_diffusion_path=str(paths["diffusion"]),
                                  trained_controlnet_path=str(paths["controlnet"]))  # fmt: skip
        ae, unet, controlnet, scale, _ = utils_infer.load_image_models(args, torch.device("cpu"))
        out[name] = (ae, unet, controlnet, scale, cfg["noise_scheduler"], args)
    return out


@pytest.fixture(scope="module")
def factory_models(released):
    """Per variant, the factory's models loaded from the same files (the ControlNet is used only with a mask)."""
    return {name: load_models(p["autoencoder"], p["diffusion"], p["controlnet"], name, "cpu") for name, p in released.items()}


def _nvidia_scheduler(definition: dict, args):
    """A fresh scheduler from NVIDIA's definition; DDPM's with the factory's per-step noise (the case's derived seed)."""
    if definition["_target_"].endswith("DDPMScheduler"):
        return SeededDDPM(torch.Generator().manual_seed(derive_seed(SEED, "ddpm")), definition)
    return nvidia_module("utils").define_instance(args, "noise_scheduler")


class _Recorder:
    """Stands in for the autoencoder's decoder in NVIDIA's loops: keeps the latent it is handed."""

    def __init__(self):
        self.z = None

    def __call__(self, z):
        self.z = z.detach().clone()
        return torch.zeros((z.shape[0], 1, *(4 * s for s in z.shape[2:])))


def _fp32_noise(shape, device):
    return torch.randn([1, *shape]).to(device)


def _nvidia_latent(nets, name: str, controlnet: bool, guidance: float, monkeypatch, noise=_fp32_noise) -> torch.Tensor:
    """NVIDIA's loop on the same inputs: its final latent (what its decoder gets, times the scale factor)."""
    utils_infer = nvidia_module("utils_infer")
    var = variant(name)
    ae, unet, ctrl, scale, definition, args = nets
    scheduler = _nvidia_scheduler(definition, args)
    recorder = _Recorder()
    monkeypatch.setattr(ae, "decode_stage_2_outputs", recorder, raising=False)
    spacing = torch.tensor([SPACING], dtype=torch.float32) * 100
    top = torch.tensor([one_hot("chest")], dtype=torch.float32) * 100 if var.takes_body_region else None
    bottom = torch.tensor([one_hot("abdomen")], dtype=torch.float32) * 100 if var.takes_body_region else None
    modality = torch.ones((1,), dtype=torch.long)
    latent_shape = (4, *(s // 4 for s in SIZE))
    torch.manual_seed(SEED)  # NVIDIA draws the noise from torch's global generator
    if controlnet:
        # float32 noise, as NVIDIA's README says for the CPU (its own rounds to float16 for CUDA)
        monkeypatch.setattr(utils_infer, "initialize_noise_latents", noise)
        binarize = nvidia_module("utils").binarize_labels
        label = torch.from_numpy(_mask().astype(np.int64))[None, None]
        cond = binarize(label).float()
        uncond = binarize(nvidia_module("augmentation").remove_tumors(label[0]).unsqueeze(0).long()).float() if guidance else None
        utils_infer.run_controlnet_conditioned_image_dm(
            autoencoder=ae, diffusion_unet=unet, controlnet=ctrl, noise_scheduler=scheduler, scale_factor=scale, device=torch.device("cpu"),
            controlnet_cond_tensor=cond, spacing_tensor=spacing, latent_shape=latent_shape, output_size=SIZE, noise_factor=1.0,
            top_region_index_tensor=top, bottom_region_index_tensor=bottom, modality_tensor=modality, num_inference_steps=STEPS,
            autoencoder_sliding_window_infer_size=(48, 48, 48), cfg_guidance_scale=guidance, controlnet_uncond_tensor=uncond,
        )  # fmt: skip
    else:
        diff_model_infer = nvidia_module("diff_model_infer")
        monkeypatch.setattr(diff_model_infer, "define_instance", lambda args, key: scheduler)
        args = argparse.Namespace(latent_channels=4, diffusion_unet_inference={"num_inference_steps": STEPS}, cfg_guidance_scale=guidance)
        diff_model_infer.run_inference(args, torch.device("cpu"), ae, unet, scale, top, bottom, spacing, modality, SIZE, 4,
                                       logging.getLogger("nvidia"))  # fmt: skip
    assert recorder.z is not None, "NVIDIA's loop never reached its decoder"
    return recorder.z * float(scale)


def _factory_latent(models, name: str, controlnet: bool, guidance: float) -> torch.Tensor:
    request = GenerationRequest(name="parity", n_cases=1, size=SIZE, spacing=SPACING, top_region="chest", bottom_region="abdomen",
                                masks=controlnet, sampler=variant(name).sampler, steps=STEPS, seed=SEED, modality=1,
                                cfg_guidance_scale=guidance)  # fmt: skip
    return sample_latent(models, request, SEED, _mask() if controlnet else None, progress=False)


CASES = [
    ("rflow-ct", False, 0.0), ("rflow-ct", False, 3.0), ("rflow-ct", True, 0.0), ("rflow-ct", True, 3.0),
    ("ddpm-ct", False, 0.0), ("ddpm-ct", True, 0.0), ("ddpm-ct", True, 3.0),
]  # fmt: skip


@pytest.mark.parametrize("name,controlnet,guidance", CASES)
def test_final_latent_matches_nvidia(factory_models, nvidia_models, name, controlnet, guidance, monkeypatch):
    ours = _factory_latent(factory_models[name], name, controlnet, guidance)
    theirs = _nvidia_latent(nvidia_models[name], name, controlnet, guidance, monkeypatch)
    assert ours.shape == theirs.shape == (1, 4, 8, 8, 8)
    assert float(theirs.abs().max()) > 0.5  # a real latent, not a degenerate one
    assert float((ours - theirs).abs().max()) <= LATENT_TOL


def test_guidance_and_the_controlnet_change_the_latent(factory_models):
    """The cases above would pass trivially if guidance or the ControlNet did nothing: they do not."""
    models = factory_models["rflow-ct"]
    plain = _factory_latent(models, "rflow-ct", True, 0.0)
    guided = _factory_latent(models, "rflow-ct", True, 3.0)
    free = _factory_latent(models, "rflow-ct", False, 0.0)
    assert float((plain - guided).abs().max()) > 1e-2 and float((plain - free).abs().max()) > 1e-2
    ddpm = factory_models["ddpm-ct"]  # guidance through the mask alone (tumours removed)
    assert float((_factory_latent(ddpm, "ddpm-ct", True, 0.0) - _factory_latent(ddpm, "ddpm-ct", True, 3.0)).abs().max()) > 1e-4


def test_ddpm_ct_without_a_scheduler_record_samples_with_ddpm(released, factory_models):
    """NVIDIA's ddpm-ct file does not say its scheduler: the variant decides (DDPM, 1000 steps by default)."""
    assert "scheduler" not in torch.load(released["ddpm-ct"]["diffusion"], weights_only=True, mmap=True)
    assert factory_models["ddpm-ct"].scheduler == "ddpm" and factory_models["ddpm-ct"].variant.inference_steps == 1000
    assert factory_models["rflow-ct"].scheduler == "rflow" and factory_models["rflow-ct"].variant.inference_steps == 30


def test_a_mismatched_variant_names_the_one_the_file_looks_like(released):
    with pytest.raises(CheckpointError, match="look like variant 'ddpm-ct': set model.variant: ddpm-ct"):
        load_diffusion(released["ddpm-ct"]["diffusion"], "rflow-ct")
    with pytest.raises(CheckpointError, match="look like variant 'rflow-ct'"):
        load_diffusion(released["rflow-ct"]["diffusion"], "tiny")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_variant_files_are_nvidias_network_configs(name):
    """The shipped variants hold what NVIDIA's released network configs say (read as data)."""
    theirs = read_network_config(nvidia_config(CONFIGS[name]), name).to_json()
    ours = variant(name).to_json()
    assert {k: v for k, v in ours.items() if k != "description"} == {k: v for k, v in theirs.items() if k != "description"}


@pytest.mark.parametrize("where", ["inside", "border", "no_lobe"])
def test_remove_tumours_matches_nvidia(where):
    remove_tumors = nvidia_module("augmentation").remove_tumors
    mask = _mask()
    if where == "border":  # a lung tumour on the volume's edge (NVIDIA's dilation pads with tumour)
        mask[17:26, 0:4, 16:28] = 29
        mask[18:21, 0:2, 18:21] = 23
    elif where == "no_lobe":  # no lobe anywhere: NVIDIA fills the tumour with lobe 28
        mask[mask == 28] = 200
        mask[mask == 29] = 200
    ours = remove_tumours(mask)
    theirs = remove_tumors(torch.from_numpy(mask.astype(np.int64))[None])[0].numpy()
    assert np.array_equal(ours, theirs) and not np.isin(ours, (23, 26)).any()


def test_decoding_matches_nvidias_whole_volume_decode(released):
    """The factory's exact decoder against NVIDIA's ``ReconModel`` on the whole latent (1e-4 on [0, 1]);
    NVIDIA's overlapping sliding window (used on large volumes) is measurably different."""
    utils_infer, utils = nvidia_module("utils_infer"), nvidia_module("utils")
    from monai.inferers.inferer import SlidingWindowInferer

    ae = build_autoencoder("tiny").eval()
    z = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(5)) * SCALE
    with torch.no_grad(), float32_norms(ae):
        theirs = utils_infer.ReconModel(ae, SCALE)(z)
        window = SlidingWindowInferer(roi_size=[4, 4, 4], sw_batch_size=1, mode="gaussian", overlap=0.5)
        windowed = utils.dynamic_infer(window, utils_infer.ReconModel(ae, SCALE), z)
    ours = decode_latent(ae, z / SCALE, DecodeSettings(), progress=False)
    assert ours.shape == theirs.shape == (1, 1, 32, 32, 32)
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert float((windowed - theirs).abs().max()) > 1e-3


def test_float16_noise_difference_is_measured(factory_models, nvidia_models, monkeypatch):
    """On a GPU NVIDIA rounds the initial noise to float16; the factory keeps float32. The same draws rounded
    give a final latent that differs measurably, though little (this is why the parity tests give NVIDIA's
    loop float32 noise)."""
    ours = _factory_latent(factory_models["rflow-ct"], "rflow-ct", True, 0.0)
    rounded = _nvidia_latent(nvidia_models["rflow-ct"], "rflow-ct", True, 0.0, monkeypatch,
                             noise=lambda shape, device: torch.randn([1, *shape]).half().float().to(device))  # fmt: skip
    diff = float((ours - rounded).abs().max())
    assert 1e-5 < diff < 0.05, diff  # measured: about 1e-3 (max |z| about 4)
