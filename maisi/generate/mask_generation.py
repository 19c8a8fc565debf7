"""New 132-class label maps from NVIDIA's mask-generation model, conditioned on anatomy sizes.

NVIDIA's release has a second latent diffusion model for label maps: a DDPM (1000 steps) in the
latent space of a mask autoencoder (4 x 64^3 latents, 125 class logits out), conditioned through
cross-attention on ten anatomy sizes (:data:`ANATOMY_SIZE_ORDER`, each in [0, 1], or -1 for absent).
A request names the sizes it controls (``controllable_anatomy_size``; :mod:`maisi.generate.anatomy_sizes`
checks them and completes them from NVIDIA's database of real anatomy-size combinations).

The latent is denoised with the case's own generators (float32 noise; DDPM's per-step noise from a
derived seed), decoded whole by the mask autoencoder, and each voxel takes the class of its largest
logit, mapped from the model's 125 outputs to MAISI ids (the variant's ``mask_generation.classes``),
then post-processed as NVIDIA does (:mod:`maisi.generate.mask_postprocess`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maisi.core.seeds import derive_seed
from maisi.generate.anatomy_sizes import anatomy_size_condition, check_anatomy_sizes
from maisi.generate.mask_postprocess import TUMOUR_SIZE_LABELS, post_process_mask
from maisi.models.networks import build_scheduler, float32_norms, select_device
from maisi.models.variants import Variant, variant

__all__ = ["MASK_FILES", "MaskModels", "GeneratedMasks", "load_mask_generator", "load_generated_masks", "sample_mask_latent", "decode_mask", "generate_mask", "target_tumour"]

#: The inputs of a request with generated masks, besides the image models (NVIDIA's three files).
MASK_FILES = ("mask_autoencoder", "mask_diffusion", "size_conditions")

@dataclass
class MaskModels:
    """The mask-generation networks on their device, with the variant they belong to."""

    autoencoder: torch.nn.Module
    unet: torch.nn.Module
    scale_factor: float
    device: torch.device
    variant: Variant


def load_mask_generator(autoencoder: str | os.PathLike, diffusion: str | os.PathLike, var: str | Variant, device: str = "auto") -> MaskModels:
    """NVIDIA's mask-generation checkpoints (``mask_generation_autoencoder.pt``, ``mask_generation_diffusion_unet.pt``)."""
    from maisi.models.checkpoints import load_mask_models

    var = var if isinstance(var, Variant) else variant(var)
    dev = select_device(device)
    ae, unet, scale = load_mask_models(autoencoder, diffusion, var)
    return MaskModels(ae.to(dev).eval(), unet.to(dev).eval(), scale, dev, var)


@torch.no_grad()
def sample_mask_latent(models: MaskModels, condition: Sequence[float], seed: int, steps: int | None = None,
                       latent_shape: Sequence[int] | None = None, progress: bool = True) -> torch.Tensor:  # fmt: skip
    """Denoise the mask model's latent conditioned on ten anatomy sizes; ``(1, 4, x, y, z)``, not yet
    divided by the scale factor. ``latent_shape`` (spatial) defaults to the model's 64^3."""
    from tqdm.auto import tqdm

    spec = models.variant.mask_generation
    shape = tuple(latent_shape or spec["latent_shape"][1:])
    scheduler = build_scheduler(spec["scheduler"])
    scheduler.set_timesteps(num_inference_steps=int(steps or spec["inference_steps"]))
    dev = models.device
    latents = torch.randn((1, spec["latent_shape"][0], *shape), generator=torch.Generator().manual_seed(int(seed))).to(dev)
    context = torch.tensor([[list(map(float, condition))]], dtype=torch.float32, device=dev)
    step_gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, "mask", "ddpm"))
    autocast = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for t in tqdm(scheduler.timesteps, desc="mask generation (ddpm)", unit="step", leave=False, disable=not progress, mininterval=1.0):
        with autocast:
            pred = models.unet(latents, timesteps=torch.as_tensor([t], device=dev), context=context).float()
        latents = scheduler.step(pred, t, latents, generator=step_gen)[0]
    return latents


@torch.no_grad()
def decode_mask(models: MaskModels, latent: torch.Tensor) -> np.ndarray:
    """The mask autoencoder's class logits of the whole latent (divided by the scale factor), the largest
    per voxel, as MAISI ids (uint8); before NVIDIA's post-processing."""
    classes = torch.as_tensor(models.variant.mask_generation["classes"], dtype=torch.int64)
    z = latent.to(models.device) / models.scale_factor
    if models.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            logits = models.autoencoder.decode_stage_2_outputs(z)
    else:
        with float32_norms(models.autoencoder):
            logits = models.autoencoder.decode_stage_2_outputs(z)
    index = torch.argmax(torch.softmax(logits.float(), dim=1), dim=1)[0].cpu()
    return classes[index].numpy().astype(np.uint8)


def generate_mask(models: MaskModels, sizes: Sequence[Sequence], database: Sequence[Sequence[float]], seed: int,
                  steps: int | None = None, progress: bool = True) -> tuple[np.ndarray, dict]:  # fmt: skip
    """A new label map for ``sizes`` (``controllable_anatomy_size``); the map and a record for the case's sidecar."""
    pairs = check_anatomy_sizes(sizes)
    condition = anatomy_size_condition(pairs, database)
    raw = decode_mask(models, sample_mask_latent(models, condition, seed, steps, progress=progress))
    target = target_tumour(condition)
    label = post_process_mask(raw, target)
    record: Mapping = {"controllable_anatomy_size": [list(p) for p in pairs], "condition": condition, "seed": int(seed),
                       "steps": int(steps or models.variant.mask_generation["inference_steps"]), "target_tumour": target,
                       "post_processed": True}  # fmt: skip
    return label, dict(record)


def target_tumour(condition: Sequence[float]) -> int | None:
    """The tumour post-processing keeps: NVIDIA's rule, the last of the five tumour sizes that is not -1
    (a size taken from the database counts too)."""
    out = None
    for label, size in zip(TUMOUR_SIZE_LABELS, condition[5:10], strict=True):
        if size != -1.0:
            out = label
    return out


@dataclass
class GeneratedMasks:
    """Where a request's masks come from when they are generated: the models, the size database, the steps,
    and the sha256 of the three files (part of each case's fingerprint)."""

    models: MaskModels
    size_conditions: list[list[float]]
    steps: int | None
    sha256: str

    def draw(self, request, seed: int, progress: bool = True) -> tuple[np.ndarray, dict]:
        """A new post-processed map for ``request`` (its ``anatomy_sizes``) from ``seed``, on the request's grid:
        MONAI ``Spacing`` (nearest) from the model's grid, then ``ResizeWithPadOrCrop``, as NVIDIA does."""
        from monai.data import MetaTensor

        from maisi.generate.mask_database import MaskQuery, on_query_grid

        label, record = generate_mask(self.models, request.anatomy_sizes, self.size_conditions, seed, self.steps, progress)
        spacing = [float(s) for s in self.models.variant.mask_generation["spacing_mm"]]
        img = MetaTensor(torch.from_numpy(label.astype(np.float32))[None], affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))
        query = MaskQuery(request.size, request.spacing, anatomy=request.anatomy)
        array, _ = on_query_grid(img, query, f"the map generated from seed {seed}", f"dim {list(label.shape)}, spacing {spacing}")
        return array, {**record, "case_id": "generated", "model_grid": {"dim": list(label.shape), "spacing": spacing}}


def load_generated_masks(files: Mapping[str, str | os.PathLike], var: str | Variant, device: str, steps: int | None = None) -> GeneratedMasks:
    """``files``: ``mask_autoencoder``, ``mask_diffusion``, ``size_conditions`` (NVIDIA's three files)."""
    from maisi.core.io import sha256_file
    from maisi.generate.anatomy_sizes import read_size_conditions

    models = load_mask_generator(files["mask_autoencoder"], files["mask_diffusion"], var, device)
    digest = ":".join(sha256_file(files[k]) for k in MASK_FILES)
    return GeneratedMasks(models, read_size_conditions(files["size_conditions"]), steps, digest)
