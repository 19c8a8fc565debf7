"""MAISI's latent sampling: the models of a request, the denoising loop with ControlNet residuals, HU output.

Gaussian noise of the latent shape (``size / 4``) is denoised by the diffusion UNet, conditioned on
the spacing and the top/bottom regions (x100, as MAISI), with MONAI's RFlow (30 steps by default) or
DDPM (1000) scheduler, the ControlNet's residuals added at every step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maisi.core.anatomy import one_hot
from maisi.core.io import sha256_file
from maisi.core.seeds import derive_seed
from maisi.generate.mask_database import (
    MaskEntry,
    read_mask_database,
)
from maisi.generate.requests import GenerationRequest
from maisi.generate.settings import GenerateSettings
from maisi.models.checkpoints import diffusion_scheduler, load_autoencoder, load_controlnet, load_diffusion
from maisi.models.networks import build_scheduler, condition_tensors, label_to_bits, select_device

__all__ = ["Models", "load_models", "sample_latent", "to_hu", "grid_affine", "load_request", "HU_RANGE"]

HU_RANGE = (-1000.0, 1000.0)


@dataclass
class Models:
    """The three networks on their device, with what they were loaded from."""

    autoencoder: torch.nn.Module
    unet: torch.nn.Module
    controlnet: torch.nn.Module | None
    scale_factor: float
    num_train_timesteps: int
    scheduler: str
    device: torch.device
    hashes: dict[str, str]


def load_models(
    autoencoder: str | os.PathLike, diffusion: str | os.PathLike, controlnet: str | os.PathLike | None, preset_name: str, device: str
) -> Models:
    """Load the checkpoints (released or trained: :mod:`maisi.models.networks`) for inference on ``device``."""
    dev = select_device(device)
    ae = load_autoencoder(autoencoder, preset_name).eval()
    unet, scale, timesteps = load_diffusion(diffusion, preset_name)
    ctrl = load_controlnet(controlnet, preset_name).to(dev).eval() if controlnet else None
    hashes = {"autoencoder": sha256_file(autoencoder), "diffusion": sha256_file(diffusion)}
    if controlnet:
        hashes["controlnet"] = sha256_file(controlnet)
    return Models(ae, unet.to(dev).eval(), ctrl, scale, timesteps, diffusion_scheduler(diffusion), dev, hashes)


def load_request(
    request: GenerationRequest, checkpoints: Mapping[str, str | None], mask_db: str | os.PathLike | None, settings: GenerateSettings
) -> tuple[Models, list[MaskEntry] | None, str]:
    """What generating a request's cases needs: the models (the ControlNet only for masked requests),
    and for masked requests the mask database with its sha256."""
    masked = bool(request.masks and mask_db)
    models = load_models(checkpoints["autoencoder"], checkpoints["diffusion"], checkpoints.get("controlnet") if request.masks else None,
                         settings.preset, settings.device)  # fmt: skip
    return models, read_mask_database(mask_db) if masked else None, sha256_file(mask_db) if masked else ""


def _scheduler(kind: str, num_train_timesteps: int, steps: int, latent_shape: Sequence[int], device: torch.device):
    scheduler = build_scheduler(kind, num_train_timesteps)
    if kind == "rflow":
        scheduler.set_timesteps(num_inference_steps=steps, device=device, input_img_size_numel=int(np.prod(latent_shape)))
    else:
        scheduler.set_timesteps(num_inference_steps=steps, device=device)
    return scheduler


@torch.no_grad()
def sample_latent(
    models: Models, request: GenerationRequest, seed: int, mask: np.ndarray | None = None, progress: bool = True
) -> torch.Tensor:
    """Denoise Gaussian noise of the request's latent shape (MAISI's sampling loop); ``(1, 4, x, y, z)``
    on the models' device, not yet divided by the scale factor."""
    from tqdm.auto import tqdm

    dev = models.device
    if request.sampler != models.scheduler:
        raise ValueError(f"request {request.name}: sampler {request.sampler!r} differs from the diffusion model's {models.scheduler!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    latents = torch.randn((1, 4, *request.latent_shape), generator=gen).to(dev)
    scheduler = _scheduler(request.sampler, models.num_train_timesteps, request.steps, request.latent_shape, dev)
    top, bottom, spacing = condition_tensors([one_hot(request.top_region)], [one_hot(request.bottom_region)], [request.spacing], dev)
    cond = None
    if mask is not None:
        if models.controlnet is None:
            raise ValueError(f"request {request.name}: mask-conditioned generation needs a ControlNet checkpoint")
        cond = label_to_bits(torch.from_numpy(np.ascontiguousarray(mask)).to(dev)[None, None])
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)))
    ddpm_gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, "ddpm"))
    autocast = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=len(timesteps), desc=f"sampling ({request.sampler})", unit="step", leave=False, disable=not progress, mininterval=1.0)
    with _fixed_condition(models.controlnet, cond, autocast):
        for t, next_t in zip(timesteps, next_timesteps, strict=True):
            latents = _step(models, scheduler, request.sampler, latents, t, next_t, cond, (top, bottom, spacing), autocast, ddpm_gen)
            bar.update()
    bar.close()
    return latents


def _step(models: Models, scheduler, sampler: str, latents, t, next_t, cond, conditions, autocast, ddpm_gen) -> torch.Tensor:
    """One denoising step (MAISI's loop body): ControlNet residuals, UNet prediction, scheduler update."""
    dev = models.device
    top, bottom, spacing = conditions
    t_batch = torch.as_tensor([t], device=dev)
    with autocast:
        extra = {}
        if cond is not None:
            down, mid = models.controlnet(x=latents, timesteps=t_batch, controlnet_cond=cond, conditioning_scale=1.0)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        pred = models.unet(
            x=latents, timesteps=t_batch, spacing_tensor=spacing, top_region_index_tensor=top, bottom_region_index_tensor=bottom,
            **extra,
        ).float()  # fmt: skip
    if sampler == "rflow":
        return scheduler.step(pred, t, latents, next_t)[0]
    return scheduler.step(pred, t, latents, generator=ddpm_gen)[0]


class _Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.value


@contextlib.contextmanager
def _fixed_condition(controlnet: torch.nn.Module | None, cond: torch.Tensor | None, autocast) -> Iterator[None]:
    """Embed the mask once for all steps: the ControlNet's conditioning embedding (full-resolution
    convolutions, the larger part of its cost) depends on the mask only, not on the step."""
    if controlnet is None or cond is None:
        yield
        return
    original = controlnet.controlnet_cond_embedding
    with autocast:
        embedded = original(cond)
    controlnet.controlnet_cond_embedding = _Constant(embedded)
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = original


def to_hu(volume: np.ndarray, body: np.ndarray | None) -> np.ndarray:
    """MAISI's output mapping: clip to [0, 1], map to [-1000, 1000] HU, -1000 outside ``body``; int16."""
    lo, hi = HU_RANGE
    hu = np.clip(volume, 0.0, 1.0) * (hi - lo) + lo
    if body is not None:
        hu[~body] = lo
    return np.rint(hu).astype(np.int16)


def grid_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world matrix of the output grid, centred on the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(size, float) - 1) * np.asarray(spacing, float)
    return affine
