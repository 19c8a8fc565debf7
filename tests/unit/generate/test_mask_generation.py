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
from helpers.models import randomise_zero_layers, save_image_checkpoints
from helpers.nvidia import SeededDDPM, nvidia_config, nvidia_module

from maisi.core.seeds import derive_seed
from maisi.generate.anatomy_sizes import ANATOMY_SIZE_ORDER, anatomy_size_condition, check_anatomy_sizes, read_size_conditions
from maisi.generate.mask_generation import decode_mask, generate_mask, load_mask_generator, sample_mask_latent
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


@pytest.fixture(scope="module")
def mask_files(tmp_path_factory):
    """NVIDIA's layouts: a plain autoencoder state dict; ``{unet_state_dict, scale_factor}``."""
    root = tmp_path_factory.mktemp("mask_models")
    torch.manual_seed(1)
    var = _small_variant()
    paths = {"autoencoder": root / "mask_generation_autoencoder.pt", "diffusion": root / "mask_generation_diffusion_unet.pt"}
    torch.save(build_mask_autoencoder(var).state_dict(), paths["autoencoder"])
    unet = randomise_zero_layers(build_mask_diffusion(var), 2)
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0055984258651733)}, paths["diffusion"])
    return paths


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
    scheduler = SeededDDPM(torch.Generator().manual_seed(derive_seed(SEED, "mask", "ddpm")), variant("rflow-ct").mask_generation["scheduler"])
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
    assert record["condition"] == [0.6, 0.5] + [0.6] * 8 and record["post_processed"] is True
    assert record["target_tumour"] == 128  # NVIDIA's rule: the last tumour size that is not -1, here from the database
    with pytest.raises(ValueError, match="not an anatomy-size database"):
        read_size_conditions(tmp_path / "missing.json")


def _raw_generated_map() -> np.ndarray:
    """A raw generated map with what post-processing repairs: specks of organs and tumours away from
    their main parts, holes, a second body island, stray tumour classes, bowel pieces, vessels, airway."""
    rng = np.random.default_rng(4)
    m = np.zeros((48, 48, 40), np.int64)
    m[4:44, 4:44, :] = 200  # the body reaches the volume's ends along z (the erosion's padding counts there)
    m[1:3, 1:3, 1:3] = 200  # a body island
    m[8:24, 8:26, 4:20] = 1  # liver with a hole and a vessel
    m[14:16, 14:16, 10:12] = 200
    m[18:20, 10:12, 6:9] = 25
    m[10:13, 16:19, 12:15] = 26  # hepatic tumour
    m[26:34, 8:16, 22:34] = 28  # lobes with a lung tumour between them
    m[26:34, 16:24, 22:34] = 29
    m[28:31, 14:18, 26:29] = 23
    m[8:14, 30:38, 6:12] = 4  # pancreas with a pancreatic tumour
    m[10:12, 32:34, 8:10] = 24
    m[30:36, 30:38, 4:10] = 62  # colon with a tumour, a small-bowel piece away from the bowel
    m[32:34, 32:34, 6:8] = 27
    m[40:42, 38:40, 30:33] = 19
    m[20:24, 36:40, 26:34] = 33  # a vertebra with a bone lesion
    m[21:23, 37:39, 28:30] = 128
    m[36:38, 8:10, 32:34] = 132  # airway
    m[30:38, 38:44, 14:22] = 3  # spleen with a detached piece next to it
    m[30:32, 36:37, 24:26] = 3
    m[6:8, 40:42, 4:6] = 128  # a second bone lesion, a second colon tumour
    m[38:40, 30:32, 14:16] = 27
    for label in (1, 3, 28, 4, 23, 26, 24):  # specks
        x, y, z = rng.integers(5, 40, 3)
        m[x, y, z] = label
    return m


@pytest.mark.parametrize("target", [None, 23, 24, 26, 27, 128])
def test_post_processing_matches_nvidia(target, monkeypatch):
    from maisi.generate.mask_postprocess import post_process_mask

    monkeypatch.setattr(np, "long", np.int64, raising=False)  # NVIDIA's code predates NumPy 1.24
    raw = _raw_generated_map()
    theirs = nvidia_module("utils").general_mask_generation_post_process(raw.copy(), target_tumor_label=target, device="cpu")
    ours = post_process_mask(raw, target)
    assert ours.dtype == np.uint8 and np.array_equal(ours, theirs)
    assert not np.array_equal(ours, raw)  # it changed something (specks, stray tumours)
    stray = [t for t in (23, 24, 26, 27, 128) if t != target]
    assert not np.isin(ours, stray).any()


def test_generated_masks_in_a_generated_case(mask_files, tmp_path):
    """A request with ``masks: generated``: the map is generated, post-processed and put on the request's grid,
    the case is conditioned on it, and its sidecar says so; the same seed gives the same case."""
    import nibabel as nib

    from maisi.core.io import read_json, sidecar_path
    from maisi.generate.augment import AugmentSettings
    from maisi.generate.mask_generation import GeneratedMasks, load_generated_masks
    from maisi.generate.requests import GenerationRequest
    from maisi.generate.sampling import load_models
    from maisi.generate.settings import DecodeSettings, GenerateSettings
    from maisi.generate.shard import case_paths, generate_case
    image_files = save_image_checkpoints(tmp_path)
    models = load_models(image_files["autoencoder"], image_files["diffusion"], image_files["controlnet"], "tiny", "cpu")
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps([{"organ_size": [0.3] * 5 + [-1.0] * 5}]))
    var = _small_variant()
    var.mask_generation["latent_shape"] = [4, *LATENT]
    generated = load_generated_masks({"mask_autoencoder": mask_files["autoencoder"], "mask_diffusion": mask_files["diffusion"],
                                      "size_conditions": sizes}, var, "cpu", steps=2)  # fmt: skip
    assert isinstance(generated, GeneratedMasks) and generated.sha256.count(":") == 2
    req = GenerationRequest(name="gen", n_cases=2, size=(48, 48, 32), spacing=(1.0, 1.0, 1.5), top_region="chest",
                            bottom_region="abdomen", masks=True, mask_source="generated", anatomy_sizes=(("liver", 0.5),),
                            steps=2, seed=1)  # fmt: skip
    settings = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), augment=AugmentSettings())
    case = req.cases()[0]
    row = generate_case(models, req, case, generated, settings, tmp_path / "out", progress=False, masks_sha256=generated.sha256)
    paths = case_paths(tmp_path / "out", "gen", case.case_id)
    label = np.asanyarray(nib.load(str(paths["label"])).dataobj)
    record = read_json(sidecar_path(paths["image"]))
    assert label.shape == (48, 48, 32) and row["mask_source"] == "generated"
    assert record["mask"]["controllable_anatomy_size"] == [["liver", 0.5]] and record["mask"]["post_processed"] is True
    assert record["mask"]["model_grid"] == {"dim": [32, 32, 32], "spacing": [1.5, 1.5, 1.5]}
    assert record["fingerprint"]["augment"] is None and record["fingerprint"]["masks"] == generated.sha256
    # The map on the request's grid is the generated one resampled (the model's 32 voxels at 1.5 mm = 48 voxels at 1 mm in x, y).
    direct, _ = generated.draw(req, derive_seed(case.seed, "mask", "generated"), progress=False)
    assert np.array_equal(direct, label)
