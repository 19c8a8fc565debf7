"""MAISI's latent sampling: the models of a request, the denoising loop with ControlNet residuals, HU output.

Gaussian noise of the latent shape (``size / 4``) is denoised by the diffusion UNet with the variant's
scheduler (MONAI's rectified flow, 30 steps, or DDPM, 1000) and the conditions the variant takes:
spacing, top/bottom body regions (x100, as MAISI; :func:`conditioning_regions` says which), the modality
class label; the ControlNet's
residuals are added at every step. With classifier-free guidance the conditional and unconditional
branches run as one batch of two, the unconditional one as NVIDIA builds it (class label 0, and the
mask with its tumours removed for the ControlNet), and the prediction is
``uncond + scale * (cond - uncond)``.

Where this differs from NVIDIA's loop on purpose: the noise is drawn in float32 from the case's own
generator (NVIDIA rounds it to float16), and DDPM's per-step noise comes from a generator derived
from the case's seed (NVIDIA's from torch's global one).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maisi.core.anatomy import RegionError, one_hot
from maisi.core.io import sha256_file
from maisi.core.seeds import derive_seed
from maisi.generate.augment import remove_tumours
from maisi.generate.mask_database import (
    MaskEntry,
    read_mask_database,
)
from maisi.generate.mask_generation import GeneratedMasks, load_generated_masks
from maisi.generate.requests import GenerationRequest
from maisi.generate.settings import GenerateSettings
from maisi.generate.user_masks import UserMasks, load_user_masks
from maisi.models.checkpoints import diffusion_scheduler, load_autoencoder, load_controlnet, load_diffusion
from maisi.models.networks import build_scheduler, condition_inputs, label_to_bits, select_device
from maisi.models.variants import Variant, scheduler_spec, variant
from maisi.prepare.regions import regions_from_label

__all__ = ["Models", "load_models", "sample_latent", "conditioning_regions", "to_hu", "grid_affine", "load_request", "HU_RANGE"]

log = logging.getLogger(__name__)

HU_RANGE = (-1000.0, 1000.0)


@dataclass
class Models:
    """The three networks on their device, with their variant and what they were loaded from."""

    autoencoder: torch.nn.Module
    unet: torch.nn.Module
    controlnet: torch.nn.Module | None
    scale_factor: float
    num_train_timesteps: int
    scheduler: str
    device: torch.device
    hashes: dict[str, str]
    variant: Variant


def load_models(
    autoencoder: str | os.PathLike, diffusion: str | os.PathLike, controlnet: str | os.PathLike | None, variant_name: str, device: str
) -> Models:
    """Load the checkpoints (released or trained: :mod:`maisi.models.checkpoints`) for inference on ``device``."""
    dev = select_device(device)
    var = variant(variant_name)
    ae = load_autoencoder(autoencoder, variant_name).eval()
    unet, scale, timesteps = load_diffusion(diffusion, variant_name)
    ctrl = load_controlnet(controlnet, variant_name).to(dev).eval() if controlnet else None
    hashes = {"autoencoder": sha256_file(autoencoder), "diffusion": sha256_file(diffusion)}
    if controlnet:
        hashes["controlnet"] = sha256_file(controlnet)
    kind = diffusion_scheduler(diffusion, var.sampler)
    return Models(ae, unet.to(dev).eval(), ctrl, scale, timesteps, kind, dev, hashes, var)


def load_request(
    request: GenerationRequest, checkpoints: Mapping[str, str | None], mask_db: str | os.PathLike | None, settings: GenerateSettings
) -> tuple[Models, list[MaskEntry] | GeneratedMasks | UserMasks | None, str]:
    """What generating a request's cases needs: the models (the ControlNet only for masked requests),
    and for masked requests their masks with a sha256: the mask database, or NVIDIA's mask-generation
    model (``checkpoints``: ``mask_autoencoder``, ``mask_diffusion``, ``size_conditions``) for generated ones,
    the request's own maps for ``folder`` ones."""
    models = load_models(checkpoints["autoencoder"], checkpoints["diffusion"], checkpoints.get("controlnet") if request.masks else None,
                         settings.variant, settings.device)  # fmt: skip
    if request.masks and request.mask_source == "generated":
        generated = load_generated_masks(checkpoints, settings.variant, settings.device, settings.mask_steps)
        return models, generated, generated.sha256
    if request.masks and request.mask_source == "folder":
        own, digest = load_user_masks(request.mask_folder or {}, f"generate.requests.{request.name}.mask_folder")
        return models, own, digest
    masked = bool(request.masks and mask_db)
    return models, read_mask_database(mask_db) if masked else None, sha256_file(mask_db) if masked else ""


def _scheduler(models: Models, steps: int, latent_shape: Sequence[int]):
    scheduler = build_scheduler(scheduler_spec(models.variant, models.scheduler, models.num_train_timesteps))
    if models.scheduler == "rflow":
        scheduler.set_timesteps(num_inference_steps=steps, device=models.device, input_img_size_numel=int(np.prod(latent_shape)))
    else:
        scheduler.set_timesteps(num_inference_steps=steps, device=models.device)
    return scheduler


def conditioning_regions(
    var: Variant, request: GenerationRequest, mask: np.ndarray | None, where: str = "the mask"
) -> dict[str, str]:
    """The body regions the diffusion UNet is conditioned on (``top_region``, ``bottom_region``) and where they come
    from (``regions_from``: ``mask`` or ``request``).

    As NVIDIA's sampler (``get_body_region_index_from_mask``): for a variant with region inputs and a ``mask``, the
    first and last region, head to foot, whose marker organs (:data:`maisi.core.anatomy.REGION_LABELS`, any voxel;
    vertebrae do not count) the map holds, with a warning where they differ from the request's. Otherwise the
    request's: cases without a mask, variants without region inputs (rflow-ct), and a map without any marker organ
    (where NVIDIA's function fails; a warning naming ``where``).
    """
    top, bottom = request.top_region, request.bottom_region
    requested = {"top_region": top, "bottom_region": bottom, "regions_from": "request"}
    if mask is None or not var.takes_body_region:
        return requested
    try:
        found = regions_from_label(mask, min_voxels=1, vertebrae="off")
    except RegionError:
        log.warning("%s holds no body-region marker organ (brain or skull, lung lobes, liver, spleen, pancreas or kidneys, "
                    "femurs): the diffusion model is conditioned on the request's regions, %s -> %s", where, top, bottom)  # fmt: skip
        return requested
    if (found.top, found.bottom) != (top, bottom):
        log.warning("%s: body regions %s -> %s differ from the request's (%s -> %s); the diffusion model is conditioned "
                    "on the map's, as NVIDIA's sampler derives them", where, found.top, found.bottom, top, bottom)  # fmt: skip
    return {"top_region": found.top, "bottom_region": found.bottom, "regions_from": "mask"}


def _unet_inputs(models: Models, request: GenerationRequest, guided: bool, regions: tuple[str, str]) -> dict[str, torch.Tensor]:
    """The condition inputs the variant takes; with guidance, a batch of two (conditional, unconditional: class label 0)."""
    rows = 2 if guided else 1
    top, bottom = regions
    return condition_inputs(models.variant, [one_hot(top)] * rows, [one_hot(bottom)] * rows,
                            [request.spacing] * rows, [request.modality, 0][:rows], models.device)  # fmt: skip


@torch.no_grad()
def sample_latent(
    models: Models, request: GenerationRequest, seed: int, mask: np.ndarray | None = None, progress: bool = True,
    regions: tuple[str, str] | None = None,
) -> torch.Tensor:
    """Denoise Gaussian noise of the request's latent shape (MAISI's sampling loop); ``(1, 4, x, y, z)``
    on the models' device, not yet divided by the scale factor. ``regions`` (top, bottom): the body regions of
    the UNet's inputs (:func:`conditioning_regions`), the request's by default."""
    from tqdm.auto import tqdm

    dev = models.device
    if request.sampler != models.scheduler:
        raise ValueError(f"request {request.name}: sampler {request.sampler!r} differs from the diffusion model's {models.scheduler!r}")
    guided = request.cfg_guidance_scale > 0
    if guided and not models.variant.takes_modality and mask is None:
        raise ValueError(f"request {request.name}: guidance without a modality input or a mask would change nothing")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    latents = torch.randn((1, 4, *request.latent_shape), generator=gen).to(dev)
    scheduler = _scheduler(models, request.steps, request.latent_shape)
    inputs = _unet_inputs(models, request, guided, regions or (request.top_region, request.bottom_region))
    cond = None
    if mask is not None:
        if models.controlnet is None:
            raise ValueError(f"request {request.name}: mask-conditioned generation needs a ControlNet checkpoint")
        maps = [mask, remove_tumours(mask)] if guided else [mask]
        cond = label_to_bits(torch.from_numpy(np.stack([np.ascontiguousarray(m) for m in maps])).to(dev)[:, None])
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)))
    ddpm_gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, "ddpm"))
    autocast = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=len(timesteps), desc=f"sampling ({request.sampler})", unit="step", leave=False, disable=not progress, mininterval=1.0)
    with _fixed_condition(models.controlnet, cond, autocast):
        for t, next_t in zip(timesteps, next_timesteps, strict=True):
            pred = _predict(models, latents, t, cond, inputs, request.cfg_guidance_scale, autocast)
            if models.scheduler == "rflow":
                latents = scheduler.step(pred, t, latents, next_t)[0]
            else:
                latents = scheduler.step(pred, t, latents, generator=ddpm_gen)[0]
            bar.update()
    bar.close()
    return latents


def _predict(models: Models, latents, t, cond, inputs: Mapping[str, torch.Tensor], guidance: float, autocast) -> torch.Tensor:
    """One step's model output (MAISI's loop body): ControlNet residuals, UNet prediction, guidance."""
    x = torch.cat([latents, latents]) if guidance > 0 else latents
    t_batch = torch.as_tensor(t, device=models.device).reshape(1).repeat(x.shape[0])
    with autocast:
        extra = {}
        if cond is not None:
            down, mid = models.controlnet(x=x, timesteps=t_batch, controlnet_cond=cond, conditioning_scale=1.0,
                                          class_labels=inputs.get("class_labels"))  # fmt: skip
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        pred = models.unet(x=x, timesteps=t_batch, **inputs, **extra).float()
    if guidance > 0:
        conditional, unconditional = pred.chunk(2)
        pred = unconditional + guidance * (conditional - unconditional)
    return pred


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


def to_hu(volume: np.ndarray, body: np.ndarray | None, intensity: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """MAISI's output mapping (a variant's ``intensity``; CT's by default): clip to the autoencoder's range
    ([0, 1]), map it linearly to the HU range ([-1000, 1000]), the lower HU bound outside ``body``; int16."""
    lo, hi = intensity["hu"] if intensity else HU_RANGE
    b_lo, b_hi = intensity["autoencoder"] if intensity else (0.0, 1.0)
    hu = (np.clip(volume, b_lo, b_hi) - b_lo) / (b_hi - b_lo) * (hi - lo) + lo
    if body is not None:
        hu[~body] = lo
    return np.rint(hu).astype(np.int16)


def grid_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world matrix of the output grid, centred on the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(size, float) - 1) * np.asarray(spacing, float)
    return affine
