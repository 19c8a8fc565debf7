"""New 132-class label maps from NVIDIA's mask-generation model, conditioned on anatomy sizes.

NVIDIA's release has a second latent diffusion model for label maps: a DDPM (1000 steps) in the
latent space of a mask autoencoder (4 x 64^3 latents, 125 class logits out), conditioned through
cross-attention on ten anatomy sizes (:data:`ANATOMY_SIZE_ORDER`, each in [0, 1], or -1 for absent).
A request names the sizes it controls (``controllable_anatomy_size``: organs, and at most one tumour,
checked as NVIDIA's ``check_input_ct`` checks them); the other sizes come from the closest entry of
NVIDIA's database of real anatomy-size combinations (``all_anatomy_size_conditions.json``: the least
L1 distance over the given sizes, the first on ties), and the given sizes overwrite it.

The latent is denoised with the case's own generators (float32 noise; DDPM's per-step noise from a
derived seed), decoded whole by the mask autoencoder, and each voxel takes the class of its largest
logit, mapped from the model's 125 outputs to MAISI ids (the variant's ``mask_generation.classes``),
then post-processed as NVIDIA does (:mod:`maisi.generate.mask_postprocess`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maisi.core.seeds import derive_seed
from maisi.generate.mask_postprocess import TUMOUR_SIZE_LABELS, post_process_mask
from maisi.models.networks import build_scheduler, float32_norms, select_device
from maisi.models.variants import Variant, variant

__all__ = [
    "ANATOMY_SIZE_ORDER", "CONTROLLABLE_ORGANS", "CONTROLLABLE_TUMOURS", "MaskModels", "check_anatomy_sizes", "anatomy_size_condition",
    "read_size_conditions", "load_mask_generator", "sample_mask_latent", "decode_mask", "generate_mask", "target_tumour",
]  # fmt: skip

#: The ten anatomy sizes the mask model is conditioned on, in its order.
ANATOMY_SIZE_ORDER = (
    "gallbladder", "liver", "stomach", "pancreas", "colon", "lung tumor", "pancreatic tumor", "hepatic tumor",
    "colon cancer primaries", "bone lesion",
)  # fmt: skip


#: Which of them a request may set (NVIDIA's lists; the gallbladder is conditioned on but not controllable).
CONTROLLABLE_ORGANS = ("liver", "gallbladder", "stomach", "pancreas", "colon")
CONTROLLABLE_TUMOURS = ("hepatic tumor", "bone lesion", "lung tumor", "colon cancer primaries", "pancreatic tumor")


def check_anatomy_sizes(pairs: Sequence[Sequence], where: str = "controllable_anatomy_size") -> list[tuple[str, float]]:
    """``[(name, size), ...]`` checked as NVIDIA checks them: at most 10 entries, known names, each once,
    at most one tumour, sizes in [0, 1] or -1 (remove). A ``ValueError`` names the key and the entry."""
    if len(pairs) > 10:
        raise ValueError(f"{where}: at most 10 entries, got {len(pairs)}")
    out: list[tuple[str, float]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"{where}[{i}]: expected [name, size], got {pair!r}")
        name, size = pair
        if name not in CONTROLLABLE_ORGANS + CONTROLLABLE_TUMOURS:
            raise ValueError(f"{where}[{i}]: {name!r} is not controllable; choose from {', '.join(CONTROLLABLE_ORGANS + CONTROLLABLE_TUMOURS)}")
        if isinstance(size, bool) or not isinstance(size, (int, float)) or (size != -1 and not 0.0 <= size <= 1.0):
            raise ValueError(f"{where}[{i}]: size of {name} must be in [0, 1] or -1 (remove), got {size!r}")
        out.append((str(name), float(size)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: each anatomy at most once, got {names}")
    tumours = [n for n in names if n in CONTROLLABLE_TUMOURS]
    if len(tumours) > 1:
        raise ValueError(f"{where}: at most one tumour, got {tumours}")
    return out


def read_size_conditions(path: str | os.PathLike) -> list[list[float]]:
    """NVIDIA's database of real anatomy-size combinations (a list of ``{"organ_size": [10 numbers]}``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            rows = [list(map(float, r["organ_size"])) for r in json.load(fh)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an anatomy-size database ({type(exc).__name__}: {exc})") from None
    bad = [i for i, r in enumerate(rows) if len(r) != len(ANATOMY_SIZE_ORDER)]
    if not rows or bad:
        raise ValueError(f"{path}: every entry needs {len(ANATOMY_SIZE_ORDER)} sizes" + (f" (entry {bad[0]} has not)" if bad else ""))
    return rows


def anatomy_size_condition(pairs: Sequence[tuple[str, float]], database: Sequence[Sequence[float]]) -> list[float]:
    """The ten sizes for a request: the database entry closest to the given sizes (L1 over those given;
    the first on ties), with the given sizes written over it."""
    index = {name: i for i, name in enumerate(ANATOMY_SIZE_ORDER)}
    given = {index[name]: size for name, size in pairs}
    best = min(range(len(database)), key=lambda k: sum(abs(size - database[k][i]) for i, size in given.items()))
    out = [float(v) for v in database[best]]
    for i, size in given.items():
        out[i] = size
    return out


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
