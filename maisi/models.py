"""MAISI's networks (MONAI's implementations), model presets, checkpoints and conditioning inputs.

Two presets: ``tiny`` (trains in minutes on two CPU cores; the default config and the tests use it)
and ``maisi`` (the released architecture: 4 latent channels, 4x downsampling, autoencoder channels
[64, 128, 256], diffusion UNet channels [64, 128, 256, 512] with attention on the two deepest levels,
spacing and top/bottom body-region inputs; ControlNet with 8 bit-channel mask conditioning).

Checkpoints use the released files' layout, so NVIDIA's weights load unchanged:
autoencoder = a plain state dict (or ``{"autoencoder_state_dict": ...}``); diffusion =
``{"unet_state_dict", "scale_factor", "num_train_timesteps"}``; ControlNet = ``{"controlnet_state_dict"}``.
All are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maisi.presets import DOWNSAMPLE, LATENT_CHANNELS, PRESETS, preset

__all__ = [
    "PRESETS",
    "CheckpointError",
    "preset",
    "build_autoencoder",
    "build_diffusion_unet",
    "build_controlnet",
    "build_discriminator",
    "build_scheduler",
    "select_device",
    "read_checkpoint",
    "load_weights",
    "load_autoencoder",
    "load_diffusion",
    "diffusion_scheduler",
    "load_controlnet",
    "label_to_bits",
    "condition_tensors",
    "LATENT_CHANNELS",
    "DOWNSAMPLE",
]

#: UNet keyword arguments the ControlNet shares (it copies the UNet's encoder half).
_CONTROLNET_SHARED = (
    "spatial_dims", "in_channels", "num_channels", "attention_levels", "num_head_channels", "num_res_blocks",
    "norm_num_groups", "norm_eps", "use_flash_attention",
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the chosen preset; the message names the file."""


def build_autoencoder(preset_name: str):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(**preset(preset_name)["autoencoder"])


def build_diffusion_unet(preset_name: str):
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    return DiffusionModelUNetMaisi(**preset(preset_name)["diffusion"])


def build_controlnet(preset_name: str, unet: torch.nn.Module | None = None):
    """ControlNet of a preset; initialised from ``unet``'s matching weights when given (MAISI's way)."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    p = preset(preset_name)
    kwargs = {k: p["diffusion"][k] for k in _CONTROLNET_SHARED}
    controlnet = ControlNetMaisi(**kwargs, **p["controlnet"], use_checkpointing=False)
    if unet is not None:
        from monai.networks.utils import copy_model_state

        # Same-named, same-shaped weights only: the UNet's time embedding also carries the
        # region and spacing inputs, which the ControlNet does not take (as in MAISI).
        copy_model_state(controlnet, unet.state_dict())
    return controlnet


def build_discriminator(preset_name: str):
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(**preset(preset_name)["discriminator"])


def build_scheduler(kind: str = "rflow", num_train_timesteps: int = 1000, base_img_size_numel: int | None = None):
    """MONAI's ``RFlowScheduler`` (velocity target) or ``DDPMScheduler`` (noise target), set up as in MAISI."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    if kind == "rflow":
        kwargs: dict[str, Any] = {"use_discrete_timesteps": False, "sample_method": "logit-normal", "use_timestep_transform": True}
        if base_img_size_numel:
            kwargs["base_img_size_numel"] = int(base_img_size_numel)
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, **kwargs)
    if kind == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
            clip_sample=False, prediction_type="epsilon",
        )  # fmt: skip
    raise ValueError(f"unknown scheduler {kind!r}; expected 'rflow' or 'ddpm'")


def select_device(setting: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when present, else the CPU; or an explicit ``cpu``/``cuda[:N]``."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but CUDA is not available")
    return torch.device(setting)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return dict(data)


def _state_dict(data: Mapping[str, Any], keys: Sequence[str], path) -> Mapping[str, torch.Tensor]:
    for key in keys:
        if key in data and isinstance(data[key], Mapping):
            return data[key]
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data  # a plain state dict
    raise CheckpointError(f"{path}: no state dict under {' / '.join(repr(k) for k in keys)} and not a plain state dict")


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path, what: str) -> None:
    """Load ``state`` strictly; a key or shape mismatch is a :class:`CheckpointError` that lists it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k, got, want = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {got}, preset {want})")
        raise CheckpointError(f"{path}: the {what} checkpoint does not fit the chosen preset: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_autoencoder(path, preset_name: str):
    data = read_checkpoint(path)
    model = build_autoencoder(preset_name)
    load_weights(model, _state_dict(data, ("autoencoder_state_dict", "state_dict"), path), path, "autoencoder")
    return model


def load_diffusion(path, preset_name: str):
    """(unet, scale_factor, num_train_timesteps) from a diffusion checkpoint."""
    data = read_checkpoint(path)
    unet = build_diffusion_unet(preset_name)
    load_weights(unet, _state_dict(data, ("unet_state_dict",), path), path, "diffusion UNet")
    if "scale_factor" not in data:
        raise CheckpointError(f"{path}: the diffusion checkpoint has no 'scale_factor'")
    scale = float(torch.as_tensor(data["scale_factor"]).reshape(-1)[0])
    return unet, scale, int(data.get("num_train_timesteps", 1000))


def diffusion_scheduler(path: str | os.PathLike, default: str = "rflow") -> str:
    """The scheduler a diffusion checkpoint was trained with (``default`` when it does not say, as in MAISI's release)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip checkpoint: mmap is unsupported
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    return str(data.get("scheduler", default)) if isinstance(data, Mapping) else default


def load_controlnet(path, preset_name: str):
    data = read_checkpoint(path)
    controlnet = build_controlnet(preset_name)
    load_weights(controlnet, _state_dict(data, ("controlnet_state_dict",), path), path, "ControlNet")
    return controlnet


def label_to_bits(label: torch.Tensor) -> torch.Tensor:
    """MAISI's mask conditioning: label ids 0-255 (B, 1, ...) as 8 binary channels (B, 8, ...), bit 0 first."""
    lab = label.long()
    if lab.ndim < 3 or lab.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, ...) label tensor, got shape {tuple(lab.shape)}")
    bits = torch.arange(8, device=lab.device).view(1, 8, *([1] * (lab.ndim - 2)))
    return ((lab >> bits) & 1).float()


def condition_tensors(
    top: Sequence[Sequence[int]], bottom: Sequence[Sequence[int]], spacing: Sequence[Sequence[float]], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region one-hots and spacings as the UNet takes them: float tensors multiplied by 100 (as MAISI does)."""

    def t(x):
        return torch.as_tensor(x, dtype=torch.float32, device=device) * 100.0

    return t(top), t(bottom), t(spacing)
