"""Synthetic CT generation: MAISI's latent sampling, ControlNet mask conditioning and TSP decoding.

For each case of a request (:mod:`maisi.generation_plan`):

1. with ``masks: true``, a label map is drawn from the mask database (:mod:`maisi.masks`: exact
   candidates with the requested anatomy, regions and grid, else the closest map resampled) and
   augmented (:mod:`maisi.mask_augment`); its 8 bit-channels condition the ControlNet;
2. Gaussian noise of the latent shape (``size / 4``) is denoised by the diffusion UNet, conditioned
   on the spacing and the top/bottom regions (x100, as MAISI), with MONAI's RFlow (30 steps by
   default) or DDPM (1000) scheduler, the ControlNet's residuals added at every step;
3. the latent, divided by the scale factor, is decoded (:mod:`maisi.tsp`; TSP by default), clipped
   to [0, 1] and mapped to [-1000, 1000] HU; voxels outside the body are set to -1000 HU;
4. the image (int16 HU), the label map (uint8; without a mask, the body found by thresholding
   as ``body`` = 200) and a JSON sidecar (seed, conditions, mask source and augmentation,
   checkpoint hashes, timings, device, peak memory) are written atomically.

Every random draw of a case comes from its own seed (mask choice, augmentation, noise and DDPM's
sampling noise), so a shard rerun gives identical outputs, and a case whose outputs and sidecar
already match its settings is not generated again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.checks import InputError
from maisi.generation_plan import GenCase, GenerationRequest
from maisi.io import current_sidecar, save_nifti, sha256_file, sidecar_path, write_with_sidecar
from maisi.labels import BODY
from maisi.mask_augment import augment_mask
from maisi.masks import MaskEntry, MaskQuery, NoMaskError, load_mask, mask_summary, read_mask_database, select_mask
from maisi.models import (
    build_scheduler,
    condition_tensors,
    diffusion_scheduler,
    label_to_bits,
    load_autoencoder,
    load_controlnet,
    load_diffusion,
    select_device,
)
from maisi.phantom import derive_seed
from maisi.regions import one_hot
from maisi.settings import GenerateSettings
from maisi.shards import write_table
from maisi.tsp import decode_latent

__all__ = [
    "GenerateSettings",
    "Models",
    "load_models",
    "sample_latent",
    "to_hu",
    "body_from_image",
    "grid_affine",
    "case_paths",
    "generate_case",
    "generate_shard",
    "load_request",
    "discard_case",
    "failed_row",
    "raise_on_errors",
    "CASE_ERRORS",
    "GENERATED_COLUMNS",
    "HU_RANGE",
]

log = logging.getLogger(__name__)
STEP = "generate"
HU_RANGE = (-1000.0, 1000.0)
#: Errors that fail one case (bad input such as no fitting mask) and not its whole shard.
CASE_ERRORS = (NoMaskError, InputError, FileNotFoundError)
#: Threshold (HU) that separates the body from air when no mask gives the body.
BODY_THRESHOLD_HU = -500.0
GENERATED_COLUMNS = (
    "request", "case_id", "index", "status", "reason", "image", "label", "seed", "attempt", "mask_source", "mask_resampled",
    "top_region", "bottom_region", "size", "spacing", "anatomy", "seconds",
)  # fmt: skip


# --------------------------------------------------------------------------- models


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
    """Load the checkpoints (released or trained: :mod:`maisi.models`) for inference on ``device``."""
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


# --------------------------------------------------------------------------- sampling and decoding


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


def body_from_image(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The body of a CT volume without a mask: voxels above ``threshold``, largest connected
    component, holes (lungs, bowel gas) filled slice by slice."""
    from scipy import ndimage

    fg = hu > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    return body


def grid_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world matrix of the output grid, centred on the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(size, float) - 1) * np.asarray(spacing, float)
    return affine


# --------------------------------------------------------------------------- cases and shards


def case_paths(out_root: str | os.PathLike, request: str, case_id: str) -> dict[str, Path]:
    """Where a case's outputs go (the Medical Segmentation Decathlon layout)."""
    root = Path(out_root) / request
    return {"image": root / "imagesTr" / f"{case_id}.nii.gz", "label": root / "labelsTr" / f"{case_id}.nii.gz"}


def _peak_memory(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _row(request: GenerationRequest, case: GenCase, record: Mapping[str, Any], paths: Mapping[str, Path]) -> dict[str, Any]:
    mask = record.get("mask") or {}
    return {
        "request": request.name, "case_id": case.case_id, "index": case.index, "status": "ok", "reason": "", "image": str(paths["image"]),
        "label": str(paths["label"]), "seed": record["seed"], "attempt": record["attempt"], "mask_source": mask.get("case_id", ""),
        "mask_resampled": bool(mask.get("resampled", False)), "top_region": request.top_region, "bottom_region": request.bottom_region,
        "size": json.dumps(list(request.size)), "spacing": json.dumps(list(request.spacing)),
        "anatomy": json.dumps(list(request.anatomy)), "seconds": round(float(record["timings"]["total_s"]), 2),
    }  # fmt: skip


def _used_hashes(models: Models, request: GenerationRequest) -> dict[str, str]:
    return {k: v for k, v in models.hashes.items() if k != "controlnet" or request.masks}  # what this case uses


def case_fingerprint(
    models: Models, request: GenerationRequest, case: GenCase, settings: GenerateSettings, attempt: int, masks_sha256: str = ""
) -> dict[str, Any]:
    """What decides a case's outputs at ``attempt``: a case whose sidecar holds it is not generated again."""
    return {
        "request": request.to_json(), "seed": case.attempt_seed(attempt), "attempt": attempt, "models": _used_hashes(models, request),
        "masks": masks_sha256, "augment": json.loads(settings.augment.to_json()) if request.masks else None,
        "decoder": {k: v for k, v in settings.decoder.to_json().items() if k in ("method", "storage_dtype", "roi", "overlap")},
    }  # fmt: skip


def generate_case(
    models: Models,
    request: GenerationRequest,
    case: GenCase,
    masks: Sequence[MaskEntry] | None,
    settings: GenerateSettings,
    out_root: str | os.PathLike,
    attempt: int = 0,
    progress: bool = True,
    masks_sha256: str = "",
) -> dict[str, Any]:
    """Generate one case (or reuse its outputs when they match); returns its table row."""
    paths = case_paths(out_root, request.name, case.case_id)
    seed = case.attempt_seed(attempt)
    hashes = _used_hashes(models, request)
    fp = case_fingerprint(models, request, case, settings, attempt, masks_sha256)
    done = current_sidecar(paths["image"], fp)
    if done is not None and current_sidecar(paths["label"], fp) is not None:
        log.info("%s: outputs are current, not generated again", case.case_id)
        return _row(request, case, done, paths)

    t0 = time.perf_counter()
    rng = np.random.default_rng(derive_seed(seed, "mask"))
    mask_record: dict[str, Any] | None = None
    mask = None
    if request.masks:
        if not masks:
            raise NoMaskError(f"request {request.name}: the mask database is empty")
        query = MaskQuery(request.size, request.spacing, request.top_region, request.bottom_region, request.anatomy, request.allow_tumour)
        entry, resampled = select_mask(masks, query, rng)
        mask, _ = load_mask(entry, query)
        mask_record = {**mask_summary(entry), "resampled": bool(resampled)}
        if settings.augment.enabled:
            mask, aug = augment_mask(mask, settings.augment, derive_seed(seed, "augment"))
            mask_record["augmentation"] = aug
    t1 = time.perf_counter()
    z = sample_latent(models, request, seed, mask, progress=progress)
    t2 = time.perf_counter()
    volume = decode_latent(models.autoencoder, z / models.scale_factor, settings.decoder, progress=progress)[0, 0].numpy()
    t3 = time.perf_counter()
    if mask is not None:
        label = mask.astype(np.uint8)
        hu = to_hu(volume, label > 0)
    else:
        body = body_from_image(to_hu(volume, None).astype(np.float32))
        hu = to_hu(volume, body)
        label = np.where(body, BODY, 0).astype(np.uint8)
    affine = grid_affine(request.size, request.spacing)
    timings = {"mask_s": t1 - t0, "sampling_s": t2 - t1, "decode_s": t3 - t2}
    record = {
        "fingerprint": fp, "case_id": case.case_id, "request": request.name, "index": case.index, "seed": seed, "attempt": attempt,
        "conditions": {
            "size": list(request.size), "spacing": list(request.spacing), "top_region": request.top_region,
            "bottom_region": request.bottom_region, "anatomy": list(request.anatomy), "sampler": request.sampler, "steps": request.steps,
        },
        "mask": mask_record, "label_source": "mask" if mask is not None else f"body threshold {BODY_THRESHOLD_HU:g} HU",
        "checkpoints": hashes, "scale_factor": models.scale_factor, "decoder": settings.decoder.to_json(),
        "device": str(models.device), "torch_threads": torch.get_num_threads(), "memory": _peak_memory(models.device),
        "hu_range": [int(hu.min()), int(hu.max())],
    }  # fmt: skip
    write_with_sidecar(paths["label"], lambda tmp: save_nifti(label, affine, tmp, np.uint8),
                       {"fingerprint": fp, "case_id": case.case_id, "image": paths["image"].name}, STEP)  # fmt: skip
    timings["total_s"] = time.perf_counter() - t0
    record["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_with_sidecar(paths["image"], lambda tmp: save_nifti(hu, affine, tmp, np.int16), record, STEP)
    log.info("%s: %s, sampled %.1f s, decoded %.1f s", case.case_id, request.describe(count=False), t2 - t1, t3 - t2)
    return _row(request, case, record, paths)


def discard_case(paths: Mapping[str, Path]) -> None:
    """Remove a case's outputs and sidecars (a case that failed leaves nothing stale behind)."""
    for p in paths.values():
        p.unlink(missing_ok=True)
        sidecar_path(p).unlink(missing_ok=True)


def generate_shard(
    request: GenerationRequest,
    cases: Sequence[GenCase],
    checkpoints: Mapping[str, str | None],
    mask_db: str | os.PathLike | None,
    settings: GenerateSettings,
    out_root: str | os.PathLike,
    table: str | os.PathLike,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate a shard's cases (first attempt, the case's own seed) one after another, then write its table.

    Checking the cases and generating failing ones again is QC's part (:mod:`maisi.qc_shard`), so
    that a QC setting never reruns generation. A case that fails with a bad-input error (no mask
    fits, unreadable mask) is recorded as ``failed`` with its reason; the other cases still run and
    keep their outputs. With ``on_error: stop`` the first failure is raised after the table is written.
    """
    from tqdm.auto import tqdm

    models, masks, masks_sha = load_request(request, checkpoints, mask_db, settings)
    rows, errors = [], []
    for case in tqdm(cases, desc=f"generate {request.name}", unit="case", disable=not progress):
        try:
            rows.append(generate_case(models, request, case, masks, settings, out_root, 0, progress, masks_sha))
        except CASE_ERRORS as exc:
            log.error("case %s failed: %s", case.case_id, exc)
            errors.append(exc)
            discard_case(case_paths(out_root, request.name, case.case_id))
            rows.append(failed_row(request, case, exc))
    write_table(rows, table, STEP, GENERATED_COLUMNS)
    raise_on_errors(errors, request, settings)
    return rows


def failed_row(request: GenerationRequest, case: GenCase, exc: Exception) -> dict[str, Any]:
    """The table row of a case that could not be generated."""
    return {"request": request.name, "case_id": case.case_id, "index": case.index, "status": "failed", "reason": str(exc)}


def raise_on_errors(errors: Sequence[Exception], request: GenerationRequest, settings: GenerateSettings) -> None:
    """With ``on_error: stop``, raise the first case error (after the shard's table is written)."""
    if errors and settings.on_error == "stop":
        raise RuntimeError(f"{len(errors)} case(s) of request {request.name} failed, first: {errors[0]}. "
                           "Set 'on_error: skip' to keep going.") from errors[0]  # fmt: skip
