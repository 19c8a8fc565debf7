"""MAISI's networks (MONAI's implementations) built from a preset, the noise schedulers, and conditioning inputs.

Two presets (:mod:`maisi.models.presets`): ``tiny`` (trains in minutes on two CPU cores; the default
config and the tests use it) and ``maisi`` (the released architecture: 4 latent channels, 4x
downsampling, autoencoder channels [64, 128, 256], diffusion UNet channels [64, 128, 256, 512] with
attention on the two deepest levels, spacing and top/bottom body-region inputs; ControlNet with 8
bit-channel mask conditioning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from maisi.models.presets import preset

__all__ = ["build_autoencoder", "build_diffusion_unet", "build_controlnet", "build_discriminator", "build_scheduler", "select_device", "label_to_bits", "condition_tensors", "float32_norms", "float32_norms_off"]

#: UNet keyword arguments the ControlNet shares (it copies the UNet's encoder half).
_CONTROLNET_SHARED = (
    "spatial_dims", "in_channels", "num_channels", "attention_levels", "num_head_channels", "num_res_blocks",
    "norm_num_groups", "norm_eps", "use_flash_attention",
)  # fmt: skip


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


@contextlib.contextmanager
def float32_norms(autoencoder: torch.nn.Module) -> Iterator[None]:
    """Make MAISI's group norms return float32 for the duration.

    The ``maisi`` preset's ``MaisiGroupNorm3D`` layers return float16 to save GPU memory
    (``norm_float16``); that only works under CUDA autocast, a CPU convolution rejects the mixed
    types. Outside CUDA the encoder therefore runs in float32 throughout.
    """
    changed = float32_norms_off(autoencoder)
    try:
        yield
    finally:
        for m in changed:
            m.norm_float16 = True


def float32_norms_off(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Make MAISI's float16 group norms (``norm_float16``) return float32 from now on; the modules changed.

    This changes no weight: float32 training and CPU inference need it (see :func:`float32_norms`).
    """
    changed = [m for m in model.modules() if getattr(m, "norm_float16", False)]
    for m in changed:
        m.norm_float16 = False
    return changed
