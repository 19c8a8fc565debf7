"""MAISI's networks (MONAI's implementations) built from a model variant, the noise schedulers, and conditioning inputs.

The variants (:mod:`maisi.models.variants`): ``tiny`` (trains in minutes on two CPU cores; the
default config and the tests use it), ``ddpm-ct`` and ``rflow-ct`` (NVIDIA's released CT models:
4 latent channels, 4x downsampling, autoencoder channels [64, 128, 256], diffusion UNet channels
[64, 128, 256, 512] with attention on the two deepest levels; ``rflow-ct`` adds a modality class
embedding and drops the body-region inputs; the ControlNet takes masks as 8 bit-channels).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from maisi.models.variants import Variant, variant

__all__ = ["build_autoencoder", "build_diffusion_unet", "build_controlnet", "build_mask_autoencoder", "build_mask_diffusion", "build_discriminator", "build_scheduler", "select_device", "label_to_bits", "condition_tensors", "condition_inputs", "float32_norms", "float32_norms_off"]


def _variant(var: str | Variant) -> Variant:
    return var if isinstance(var, Variant) else variant(var)


def build_autoencoder(var: str | Variant):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(**_variant(var).network("autoencoder"))


def build_diffusion_unet(var: str | Variant):
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    return DiffusionModelUNetMaisi(**_variant(var).network("diffusion"))


def build_controlnet(var: str | Variant, unet: torch.nn.Module | None = None):
    """ControlNet of a variant; initialised from ``unet``'s matching weights when given (MAISI's way)."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    controlnet = ControlNetMaisi(**_variant(var).network("controlnet"))
    if unet is not None:
        from monai.networks.utils import copy_model_state

        # Same-named, same-shaped weights only: the UNet's time embedding also carries the
        # region and spacing inputs, which the ControlNet does not take (as in MAISI).
        copy_model_state(controlnet, unet.state_dict())
    return controlnet


def _mask_networks(var: str | Variant) -> dict[str, Any]:
    var = _variant(var)
    if not var.mask_generation:
        raise ValueError(f"variant {var.name!r} has no mask-generation model")
    return var.mask_generation["networks"]


def build_mask_autoencoder(var: str | Variant):
    """The mask-generation autoencoder (125 class logits out of 4 latent channels) of a released variant."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(**copy.deepcopy(_mask_networks(var)["autoencoder"]))


def build_mask_diffusion(var: str | Variant):
    """The mask-generation diffusion UNet (MONAI's ``DiffusionModelUNet``, cross-attention on 10 anatomy sizes)."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**copy.deepcopy(_mask_networks(var)["diffusion"]))


def build_discriminator(var: str | Variant):
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(**_variant(var).network("discriminator"))


def build_scheduler(spec: Mapping[str, Any]):
    """MONAI's ``RFlowScheduler`` (velocity target) or ``DDPMScheduler`` (noise target) from a scheduler
    spec (``{"kind": ..., **arguments}``: :func:`maisi.models.variants.scheduler_spec`)."""
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "rflow":
        return RFlowScheduler(**kwargs)
    if spec["kind"] == "ddpm":
        return DDPMScheduler(**{"prediction_type": "epsilon", **kwargs})
    raise ValueError(f"unknown scheduler {spec['kind']!r}; expected 'rflow' or 'ddpm'")


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


def condition_inputs(
    var: Variant, top: Sequence[Sequence[int]], bottom: Sequence[Sequence[int]], spacing: Sequence[Sequence[float]],
    modality: Sequence[int], device,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The UNet's (and ControlNet's) condition keyword inputs that ``var`` takes, one row per sample: the
    spacing, the top/bottom region one-hots (both x100) and the modality class labels."""
    top_t, bottom_t, spacing_t = condition_tensors(top, bottom, spacing, device)
    out = {"spacing_tensor": spacing_t}
    if var.takes_body_region:
        out.update(top_region_index_tensor=top_t, bottom_region_index_tensor=bottom_t)
    if var.takes_modality:
        out["class_labels"] = torch.as_tensor(list(modality), dtype=torch.long, device=device)
    return out


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
