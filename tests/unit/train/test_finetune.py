"""Fine-tuning the diffusion UNet and the ControlNet from parent checkpoints in NVIDIA's layout (tiny variant, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.config import validated
from helpers.latent_data import latent_dataset
from helpers.models import randomise_zero_layers

import maisi.train.controlnet as tc
import maisi.train.loop as loop
from maisi.core.checks import ConfigError
from maisi.core.io import sha256_file
from maisi.models.checkpoints import CheckpointError, _shapes
from maisi.models.networks import build_controlnet, build_diffusion_unet
from maisi.train.controlnet import train_controlnet
from maisi.train.diffusion import train_diffusion
from maisi.train.loop import step_generator
from maisi.train.settings import ControlNetSettings, DiffusionSettings

FAST = {"variant": "tiny", "device": "cpu", "batch_size": 2, "latent_patch": (8, 8, 8), "checkpoint_every": 1}
PARENT_SCALE = 0.7
#: Adam moves every weight by about the learning rate per step: with this one a step leaves the parent's weights.
TINY_LR = 1e-9


def _nvidia_unet(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return randomise_zero_layers(build_diffusion_unet("tiny"), seed).state_dict()


def _save_nvidia_diffusion(path: Path, seed: int, **entries) -> Path:
    """A diffusion checkpoint as NVIDIA releases it: ``{unet_state_dict, scale_factor, num_train_timesteps}``."""
    torch.save({"unet_state_dict": _nvidia_unet(seed), **entries}, path)
    return path


def _save_nvidia_controlnet(path: Path, seed: int) -> Path:
    """A ControlNet checkpoint as NVIDIA releases it (``{controlnet_state_dict}``), its weights unlike the UNet's copy and
    its zero convolutions set (a strong control, so that a tumour changes the prediction)."""
    torch.manual_seed(seed)
    torch.save({"controlnet_state_dict": randomise_zero_layers(build_controlnet("tiny"), seed, scale=0.3).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three labelled cases (c1 holds a lung tumour) and parent checkpoints of the tiny variant in NVIDIA's layout."""
    folder = tmp_path_factory.mktemp("finetune")
    return {
        "records": latent_dataset(folder, ["c0", "c1", "c2"], tumours=["c1"]),
        "diffusion": _save_nvidia_diffusion(folder / "diff_unet_3d_tiny.pt", 1, scale_factor=torch.tensor(PARENT_SCALE),
                                            num_train_timesteps=1000),
        "controlnet": _save_nvidia_controlnet(folder / "controlnet_3d_tiny.pt", 2),
    }  # fmt: skip


def _train(records, out: Path, **overrides):
    settings = DiffusionSettings(**{**FAST, "steps": 1, **overrides})
    return train_diffusion(records, settings, out / "diffusion.pt", out / "diffusion.png", out / ".resume" / "diffusion.pt")


def _train_cn(records, diffusion, out: Path, **overrides):
    settings = ControlNetSettings(**{**FAST, "steps": 1, **overrides})
    return train_controlnet(
        records, diffusion, settings, out / "controlnet.pt", out / "controlnet.png", out / ".resume" / "cn.pt"
    )


def _state(path: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)[key]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- diffusion UNet


def test_diffusion_starts_from_the_parent_and_keeps_its_scale_factor(data, tmp_path):
    parent = _state(data["diffusion"], "unet_state_dict")
    tuned = _train(data["records"], tmp_path / "tuned", init_from=data["diffusion"], lr=TINY_LR)
    scratch = _train(data["records"], tmp_path / "scratch", lr=TINY_LR)
    weights = _state(tmp_path / "tuned" / "diffusion.pt", "unet_state_dict")
    assert _max_diff(weights, parent) < 1e-6  # one step at a vanishing learning rate: the parent's weights
    assert _max_diff(_state(tmp_path / "scratch" / "diffusion.pt", "unet_state_dict"), parent) > 1e-2  # not a random start

    raw = torch.load(tmp_path / "tuned" / "diffusion.pt", weights_only=True)
    assert float(raw["scale_factor"]) == pytest.approx(PARENT_SCALE) and tuned["scale_factor"] == pytest.approx(PARENT_SCALE)
    assert scratch["scale_factor"] != pytest.approx(PARENT_SCALE, rel=0.05)  # the latents' own (about 1/2) differs
    sidecar = _sidecar(tmp_path / "tuned" / "diffusion.pt")
    assert sidecar["init_from"] == str(data["diffusion"]) and sidecar["init_from_sha256"] == sha256_file(data["diffusion"])
    assert sidecar["scale_factor_from"] == "init_from" and sidecar["settings"]["init_from"] == str(data["diffusion"])
    assert _sidecar(tmp_path / "scratch" / "diffusion.pt")["init_from"] is None

    recomputed = _train(
        data["records"], tmp_path / "recomputed", init_from=data["diffusion"], lr=TINY_LR, recompute_scale_factor=True
    )
    assert recomputed["scale_factor"] == pytest.approx(scratch["scale_factor"], rel=1e-6)  # the latents' 1/std
    assert recomputed["scale_factor_from"] == "latents"
    assert _max_diff(_state(tmp_path / "recomputed" / "diffusion.pt", "unet_state_dict"), parent) < 1e-6


def _crash_at(monkeypatch, stage: str, at: int) -> None:
    """Make the loop's step generator raise once at step ``at`` of ``stage``."""
    calls = {"n": 0}

    def failing(seed, name, step, device="cpu"):
        if name == stage and step == at and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError(f"simulated crash at step {step}")
        return step_generator(seed, name, step, device)

    monkeypatch.setattr(loop, "step_generator", failing)


def test_a_changed_parent_restarts_training(data, tmp_path, monkeypatch):
    parent = shutil.copy(data["diffusion"], tmp_path / "parent.pt")
    out = tmp_path / "run"
    _crash_at(monkeypatch, "train_diffusion", 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(data["records"], out, init_from=parent, steps=3)
    assert (out / ".resume" / "diffusion.pt").is_file()
    _save_nvidia_diffusion(Path(parent), 5, scale_factor=torch.tensor(PARENT_SCALE))  # the same path, other weights
    assert _train(data["records"], out, init_from=parent, steps=3)["resumed_from"] == 0  # the old state does not fit
    _crash_at(monkeypatch, "train_diffusion", 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(data["records"], out, init_from=parent, steps=3)
    resumed = _train(data["records"], out, init_from=parent, steps=3)  # the parent unchanged: resumed
    assert resumed["resumed_from"] == 2 and resumed["init_from_sha256"] == sha256_file(parent)


def test_a_parent_without_a_scale_factor_needs_recompute(data, tmp_path):
    parent = _save_nvidia_diffusion(tmp_path / "no_scale.pt", 3)
    with pytest.raises(
        CheckpointError, match=r"no_scale\.pt: the diffusion checkpoint has no 'scale_factor'.*recompute_scale_factor: true"
    ):
        _train(data["records"], tmp_path, init_from=parent)
    assert not (tmp_path / "diffusion.pt").exists()
    assert _train(data["records"], tmp_path, init_from=parent, recompute_scale_factor=True)["scale_factor_from"] == "latents"


# --------------------------------------------------------------------------- ControlNet


def test_controlnet_starts_from_the_parent(data, tmp_path, monkeypatch):
    fingerprints = []

    def spy(obj):
        fingerprints.append(obj)
        return loop.fingerprint(obj)

    monkeypatch.setattr(tc, "fingerprint", spy)
    parent = _state(data["controlnet"], "controlnet_state_dict")
    result = _train_cn(data["records"], data["diffusion"], tmp_path / "tuned", init_from=data["controlnet"], lr=TINY_LR)
    _train_cn(data["records"], data["diffusion"], tmp_path / "scratch", lr=TINY_LR)
    assert _max_diff(_state(tmp_path / "tuned" / "controlnet.pt", "controlnet_state_dict"), parent) < 1e-6
    assert _max_diff(_state(tmp_path / "scratch" / "controlnet.pt", "controlnet_state_dict"), parent) > 1e-2  # the UNet's copy

    sidecar = _sidecar(tmp_path / "tuned" / "controlnet.pt")
    assert sidecar["init_from"] == str(data["controlnet"]) and sidecar["init_from_sha256"] == sha256_file(data["controlnet"])
    assert sidecar["diffusion_sha256"] == sha256_file(data["diffusion"]) and result["scale_factor"] == pytest.approx(PARENT_SCALE)
    assert sidecar["contrastive_loss"] == {"weight": 0.0, "max": 2.0}  # the tiny variant: off
    # The resume fingerprint holds the parent's sha256: another parent file, another fingerprint.
    assert fingerprints[0]["parent"] == sha256_file(data["controlnet"]) and fingerprints[1]["parent"] is None


# --------------------------------------------------------------------------- refused parents


def _released_shapes(what: str, name: str, path: Path, key: str) -> Path:
    """A checkpoint with the weight names and shapes of released variant ``name`` (stride-0 tensors: a small file)."""
    state = {k: torch.zeros(()).expand(shape) for k, shape in _shapes(what, name).items()}
    torch.save({key: state, "scale_factor": torch.tensor(1.0)}, path)
    return path


@pytest.mark.parametrize("stage", ["train_diffusion", "train_controlnet"])
def test_a_parent_of_another_variant_is_refused(data, tmp_path, stage):
    diffusion = stage == "train_diffusion"
    what, key = ("diffusion UNet", "unet_state_dict") if diffusion else ("ControlNet", "controlnet_state_dict")
    train = (lambda **kw: _train(data["records"], tmp_path, **kw)) if diffusion else (
        lambda **kw: _train_cn(data["records"], data["diffusion"], tmp_path, **kw))  # fmt: skip

    released = _released_shapes(what, "rflow-ct", tmp_path / "released.pt", key)
    with pytest.raises(CheckpointError) as err:
        train(init_from=released)
    message = str(err.value)
    assert f"config key '{stage}.init_from'" in message and str(released) in message
    assert "the chosen variant 'tiny'" in message and "look like variant 'rflow-ct'" in message

    # The factory's own checkpoint records its variant.
    own = tmp_path / "own.pt"
    state = _state(data["diffusion"], "unet_state_dict") if diffusion else _state(data["controlnet"], "controlnet_state_dict")
    torch.save({key: state, "variant": "ddpm-ct", "scale_factor": torch.tensor(1.0)}, own)
    recorded = rf"{stage}\.init_from.*own\.pt: the {what} checkpoint records variant 'ddpm-ct', but model\.variant is 'tiny'"
    with pytest.raises(CheckpointError, match=recorded):
        train(init_from=own)

    # The other network's file.
    other = data["controlnet"] if diffusion else data["diffusion"]
    with pytest.raises(CheckpointError, match=rf"{other.name}: no state dict under '{key}'"):
        train(init_from=other)
    assert not list(tmp_path.glob("*.pt.json"))


# --------------------------------------------------------------------------- config and settings


def test_init_from_in_the_config(data, tmp_path, monkeypatch):
    cfg = validated(
        train_diffusion={"init_from": str(data["diffusion"])}, train_controlnet={"init_from": str(data["controlnet"])}
    )
    assert DiffusionSettings.from_config(cfg).init_from == str(data["diffusion"])
    settings = ControlNetSettings.from_config(cfg)
    assert settings.init_from == str(data["controlnet"]) and ControlNetSettings.from_json(settings.to_json()) == settings
    assert DiffusionSettings(init_from=Path("x.pt")).init_from == "x.pt"
    with pytest.raises(ConfigError, match=r"'train_controlnet\.init_from': checkpoint file .*gone\.pt does not exist"):
        validated(train_controlnet={"init_from": str(tmp_path / "gone.pt")})
    with pytest.raises(ConfigError, match=r"'train_diffusion\.init_from': 'pretrained\.diffusion' is given too"):
        validated(train_diffusion={"init_from": str(data["diffusion"])}, pretrained={"diffusion": str(data["diffusion"])})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "models").mkdir(parents=True)
    shutil.copy(data["controlnet"], tmp_path / "results" / "models" / "controlnet.pt")
    with pytest.raises(ConfigError, match="the stage's own output"):
        validated(train_controlnet={"init_from": "results/models/controlnet.pt"})
    with pytest.raises(ConfigError, match="recompute_scale_factor"):
        validated(train_diffusion={"recompute_scale_factor": "yes"})
