"""Generation requests: validation before any job starts, per-case seeds and stable shards."""

from __future__ import annotations

import pytest

from maisi.config import validate_config
from maisi.core.checks import ConfigError
from maisi.generate.requests import GenerationRequest, RequestError, latent_factor, parse_requests

BASE = {"n_cases": 5, "size": [128, 128, 128], "spacing": [3.0, 3.0, 3.0], "top_region": "chest", "bottom_region": "abdomen"}


def one(variant_name="tiny", trained=None, **changes):
    return parse_requests({"requests": {"r": {**BASE, **changes}}}, variant_name, trained)[0]


def test_defaults_and_anatomy_names():
    req = one(anatomy=["liver", 3])
    assert req.anatomy == (1, 3)
    assert (req.sampler, req.steps, req.masks) == ("rflow", 30, True)
    assert req.latent_shape == (32, 32, 32)
    assert one(sampler="ddpm").steps == 1000


def test_case_seeds_are_per_case_and_stable_when_cases_are_added():
    small, large = one(n_cases=3), one(n_cases=7)
    assert [c.seed for c in small.cases()] == [c.seed for c in large.cases()][:3]
    assert len({c.seed for c in large.cases()}) == 7
    assert large.cases()[0].case_id == "r_00000"
    # Full shards do not change when cases are added; new cases only add shards or fill the last one.
    assert small.shards()["0000"] == large.shards()["0000"]
    assert list(large.shards()) == ["0000", "0001", "0002", "0003"]
    assert one(seed=1).cases()[0].seed != small.cases()[0].seed
    case = small.cases()[0]
    assert case.attempt_seed(0) == case.seed != case.attempt_seed(1)


@pytest.mark.parametrize(
    "changes,variant_name,match",
    [
        ({"size": [120, 128, 128]}, "tiny", "multiple of the latent factor 16"),
        ({"size": [128, 128, 128]}, "rflow-ct", "x = y in"),
        ({"size": [256, 256, 256], "spacing": [0.4, 0.4, 1.0]}, "rflow-ct", "spacing"),
        ({"size": [256, 256, 256], "spacing": [0.8, 0.8, 1.0]}, "rflow-ct", "field of view"),
        ({"anatomy": ["unicorn"]}, "tiny", "unknown MAISI class"),
        ({"anatomy": ["brain"]}, "tiny", "brain lie outside chest -> abdomen"),
        ({"anatomy": ["liver"], "masks": False}, "tiny", "needs mask-conditioned"),
        ({"top_region": "abdomen", "bottom_region": "chest"}, "tiny", "lies below"),
        ({"top_region": "head_neck", "bottom_region": "lower_body", "spacing": [3, 3, 2]}, "tiny", "cannot reach"),
        ({"top_region": "chest", "bottom_region": "chest", "spacing": [3, 3, 10]}, "tiny", "far longer"),
        ({"top_region": "pelvis"}, "tiny", "unknown body region"),
        ({"spacing": [3, 3]}, "tiny", "three numbers"),
    ],
)
def test_impossible_requests_are_refused(changes, variant_name, match):
    with pytest.raises(RequestError, match=match):
        one(variant_name, **changes)


def test_unknown_request_keys_are_config_errors():
    cfg = {"sources": {"p": {"type": "phantom", "n_cases": 1}}, "generate": {"requests": {"r": {**BASE, "colour": "red"}}}}
    with pytest.raises(ConfigError, match=r"generate\.requests\.r.*'colour' was unexpected"):
        validate_config(cfg)


def test_released_architecture_accepts_maisi_sizes():
    req = one("rflow-ct", size=[512, 512, 768], spacing=[0.8, 0.8, 1.0], top_region="chest", bottom_region="lower_body")
    assert req.latent_shape == (128, 128, 192)
    assert latent_factor("rflow-ct") == 32 and latent_factor("tiny") == 16


def test_sampler_must_match_the_trained_model():
    with pytest.raises(RequestError, match="trained with 'rflow'"):
        one(trained="rflow", sampler="ddpm")


def test_config_error_names_the_request_key():
    cfg = {"sources": {"p": {"type": "phantom", "n_cases": 1}},
           "generate": {"requests": {"bad": {**BASE, "size": [100, 128, 128]}}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"config key 'generate\.requests\.bad\.size'"):
        validate_config(cfg)
    cfg["generate"]["requests"]["bad"]["size"] = [128, 128, 128]
    assert validate_config(cfg)["generate"]["decoder"]["method"] == "tsp"


def test_requests_are_parsed_once_per_config(monkeypatch):
    """Config validation and the rules both ask for the requests; they are parsed once."""
    import maisi.generate.requests as requests

    calls = []
    real = requests.parse_requests
    monkeypatch.setattr(requests, "parse_requests", lambda *a, **k: calls.append(a) or real(*a, **k))
    requests._parsed.cache_clear()
    cfg = validate_config({"sources": {"p": {"type": "phantom", "n_cases": 1}}, "generate": {"requests": {"r": BASE}}})
    again = requests.config_requests(cfg)
    assert list(again) == ["r"] and again["r"].n_cases == 5
    assert len(calls) == 1
    other = {**cfg, "generate": {**cfg["generate"], "requests": {"r": {**BASE, "n_cases": 2}}}}
    assert requests.config_requests(other)["r"].n_cases == 2 and len(calls) == 2


RELEASED = {"size": [256, 256, 256], "spacing": [1.5, 1.5, 1.5]}


def test_variant_decides_sampler_steps_and_modality():
    assert (one("rflow-ct", **RELEASED).sampler, one("rflow-ct", **RELEASED).steps) == ("rflow", 30)
    ddpm = one("ddpm-ct", **RELEASED)
    assert (ddpm.sampler, ddpm.steps, ddpm.modality, ddpm.cfg_guidance_scale) == ("ddpm", 1000, 1, 0.0)
    assert one("rflow-ct", modality="ct_contrast", **RELEASED).modality == 3 and one("rflow-ct", modality=2, **RELEASED).modality == 2
    guided = one("rflow-ct", cfg_guidance_scale=2.5, masks=False, **RELEASED)
    assert guided.cfg_guidance_scale == 2.5 and guided.to_json()["cfg_guidance_scale"] == 2.5 and guided.to_json()["modality"] == 1
    assert one("ddpm-ct", cfg_guidance_scale=2.0, **RELEASED).cfg_guidance_scale == 2.0  # masked: the ControlNet's branch differs


@pytest.mark.parametrize(
    "variant_name,changes,match",
    [
        ("rflow-ct", {"sampler": "ddpm"}, "sampled with 'rflow', not 'ddpm'"),
        ("ddpm-ct", {"sampler": "rflow"}, "sampled with 'ddpm', not 'rflow'"),
        ("rflow-ct", {"modality": "mri_t1"}, r"modality.*not a CT modality"),
        ("rflow-ct", {"modality": 9}, "not a CT modality"),
        ("rflow-ct", {"modality": "xray"}, "unknown modality 'xray'"),
        ("ddpm-ct", {"modality": "ct_contrast"}, "takes no modality input"),
        ("ddpm-ct", {"cfg_guidance_scale": 2.0, "masks": False}, "guidance would change nothing"),
    ],
)
def test_variant_conditions_are_checked(variant_name, changes, match):
    with pytest.raises(RequestError, match=match):
        one(variant_name, **{**RELEASED, **changes})


def test_config_validation_and_generation_agree_on_the_sampler(tmp_path):
    """A released variant's given checkpoint is sampled with the variant's scheduler: validation refuses another."""
    ckpt = tmp_path / "diffusion.pt"
    ckpt.write_bytes(b"x")
    cfg = {"sources": {"p": {"type": "phantom", "n_cases": 1}}, "model": {"variant": "ddpm-ct"}, "pretrained": {"diffusion": str(ckpt)},
           "generate": {"sampler": "rflow", "requests": {"r": {**BASE, **RELEASED}}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"generate\.requests\.r\.sampler'?: the diffusion model is trained with 'ddpm', cannot sample with 'rflow'"):
        validate_config(cfg)
    cfg["generate"]["sampler"] = None
    assert validate_config(cfg)["generate"]["requests"]["r"]["size"] == [256, 256, 256]
    with pytest.raises(ConfigError, match=r"train_diffusion\.scheduler.*trained with the 'ddpm' scheduler, not 'rflow'"):
        validate_config({**cfg, "train_diffusion": {"scheduler": "rflow"}})


def test_generated_masks_requests():
    req = one("rflow-ct", masks="generated", controllable_anatomy_size=[["liver", 0.5], ["hepatic tumor", 0.2]], **RELEASED)
    assert req.masks and req.mask_source == "generated" and req.anatomy_sizes == (("liver", 0.5), ("hepatic tumor", 0.2))
    assert GenerationRequest.from_json(req.to_json()).to_json() == req.to_json() and "generated mask (liver 0.5" in req.describe()
    assert one("rflow-ct", **RELEASED).mask_source == "database" and one(masks="database").masks
    for changes, match in [
        ({"masks": "generated"}, "at least one"),
        ({"masks": "generated", "controllable_anatomy_size": [["liver", 0.5], ["lung tumor", 0.1], ["bone lesion", 0.2]]}, "one tumour"),
        ({"masks": "generated", "controllable_anatomy_size": [["heart", 0.5]]}, "not controllable"),
        ({"controllable_anatomy_size": [["liver", 0.5]]}, "only generated masks"),
        ({"masks": "cloud"}, "expected true, false"),
        ({"masks": "folder"}, "masks 'folder' and mask_folder go together"),
    ]:
        with pytest.raises(RequestError, match=match):
            one("rflow-ct", **{**RELEASED, **changes})
    with pytest.raises(RequestError, match="released variant with NVIDIA's mask-generation model"):
        one("tiny", masks="generated", controllable_anatomy_size=[["liver", 0.5]])


def test_generated_masks_need_nvidias_files(tmp_path):
    cfg = {"sources": {"p": {"type": "phantom", "n_cases": 1}}, "model": {"variant": "rflow-ct"},
           "generate": {"requests": {"r": {**BASE, **RELEASED, "masks": "generated", "controllable_anatomy_size": [["liver", 0.5]]}}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"generate\.mask_generation\.autoencoder'.*request\(s\) r generate their masks"):
        validate_config(cfg)
    files = {k: tmp_path / f"{k}.bin" for k in ("autoencoder", "diffusion", "size_conditions")}
    for f in files.values():
        f.write_bytes(b"x")
    cfg["generate"]["mask_generation"] = {k: str(v) for k, v in files.items()}
    assert validate_config(cfg)["generate"]["mask_generation"]["steps"] is None
