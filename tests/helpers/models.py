"""Random-weight networks saved in the released checkpoint layouts, for generation tests."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_image_checkpoints", "randomise_zero_layers"]


def save_image_checkpoints(root: Path, variant: str = "tiny", scale_factor: float = 1.0, seed: int = 0, **extra) -> dict[str, str]:
    """Autoencoder (a plain state dict), diffusion UNet (``{unet_state_dict, scale_factor}`` plus ``extra``) and
    ControlNet (``{controlnet_state_dict}``) of ``variant`` with random weights; their paths by role."""
    from maisi.models.networks import build_autoencoder, build_controlnet, build_diffusion_unet

    torch.manual_seed(seed)
    unet = build_diffusion_unet(variant)
    paths = {k: Path(root) / f"{k}.pt" for k in ("autoencoder", "diffusion", "controlnet")}
    torch.save(build_autoencoder(variant).state_dict(), paths["autoencoder"])
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(scale_factor), **extra}, paths["diffusion"])
    torch.save({"controlnet_state_dict": build_controlnet(variant, unet).state_dict()}, paths["controlnet"])
    return {k: str(v) for k, v in paths.items()}


def randomise_zero_layers(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Random values for MONAI's zero-initialised layers (output convolutions, a ControlNet's zero convolutions):
    with them at zero a UNet predicts nothing and a ControlNet adds nothing, and a comparison proves nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model
