"""Generating a shard of a request, case by case.

For each case (:mod:`maisi.generate.requests`):

1. with ``masks: true``, a label map is drawn from the mask database (:mod:`maisi.generate.mask_database`:
   exact candidates with the requested anatomy, regions and grid, else the closest map resampled) and
   augmented (:mod:`maisi.generate.augment`); its 8 bit-channels condition the ControlNet;
2. a latent is sampled (:mod:`maisi.generate.sampling`);
3. the latent, divided by the scale factor, is decoded (:mod:`maisi.generate.tsp`; TSP by default),
   clipped to [0, 1] and mapped to [-1000, 1000] HU; voxels outside the body are set to -1000 HU;
4. the image (int16 HU), the label map (uint8; without a mask, the body mask of the image as
   ``body`` = 200) and a JSON sidecar (seed, conditions, mask source and augmentation, checkpoint
   hashes, timings, device, peak memory) are written atomically.

Every random draw of a case comes from its own seed (mask choice, augmentation, noise and DDPM's
sampling noise), so a shard rerun gives identical outputs, and a case whose outputs and sidecar
already match its settings is not generated again.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.core.anatomy import BODY_THRESHOLD_HU, body_mask
from maisi.core.checks import InputError
from maisi.core.io import current_sidecar, save_nifti, sidecar_path, write_with_sidecar
from maisi.core.labels import BODY
from maisi.core.seeds import derive_seed
from maisi.core.shards import raise_first, run_in_turn
from maisi.core.tables import write_table
from maisi.generate.augment import augment_mask
from maisi.generate.mask_database import (
    MaskEntry,
    MaskQuery,
    NoMaskError,
    load_mask,
    mask_summary,
    select_mask,
)
from maisi.generate.requests import GenCase, GenerationRequest
from maisi.generate.sampling import Models, grid_affine, load_request, sample_latent, to_hu
from maisi.generate.settings import GenerateSettings
from maisi.generate.tsp import decode_latent

__all__ = ["case_paths", "generate_case", "generate_shard", "discard_case", "fail_case", "CASE_ERRORS", "GENERATED_COLUMNS"]

log = logging.getLogger(__name__)


STEP = "generate"


#: Errors that fail one case (bad input such as no fitting mask) and not its whole shard.
CASE_ERRORS = (NoMaskError, InputError, FileNotFoundError)


GENERATED_COLUMNS = (
    "request", "case_id", "index", "status", "reason", "image", "label", "seed", "attempt", "mask_source", "mask_resampled",
    "top_region", "bottom_region", "size", "spacing", "anatomy", "seconds",
)  # fmt: skip


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
        "masks": masks_sha256, "augment": settings.augment.to_dict() if request.masks else None,
        "decoder": {k: v for k, v in settings.decoder.to_dict().items() if k in ("method", "storage_dtype", "roi", "overlap")},
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
        body = body_mask(to_hu(volume, None).astype(np.float32))
        hu = to_hu(volume, body)
        label = np.where(body, BODY, 0).astype(np.uint8)
    affine = grid_affine(request.size, request.spacing)
    timings = {"mask_s": t1 - t0, "sampling_s": t2 - t1, "decode_s": t3 - t2}
    record = {
        "fingerprint": fp, "case_id": case.case_id, "request": request.name, "index": case.index, "seed": seed, "attempt": attempt,
        "conditions": {
            "size": list(request.size), "spacing": list(request.spacing), "top_region": request.top_region,
            "bottom_region": request.bottom_region, "anatomy": list(request.anatomy), "sampler": request.sampler, "steps": request.steps,
            "variant": models.variant.name, "modality": request.modality if models.variant.takes_modality else None,
            "cfg_guidance_scale": request.cfg_guidance_scale,
        },
        "mask": mask_record, "label_source": "mask" if mask is not None else f"body threshold {BODY_THRESHOLD_HU:g} HU",
        "checkpoints": hashes, "scale_factor": models.scale_factor, "decoder": settings.decoder.to_dict(),
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

    Checking the cases and generating failing ones again is QC's part (:mod:`maisi.evaluate.qc_check`), so
    that a QC setting never reruns generation. A case that fails with a bad-input error (no mask
    fits, unreadable mask) is recorded as ``failed`` with its reason; the other cases still run and
    keep their outputs. With ``on_error: stop`` the first failure is raised after the table is written.
    """
    models, masks, masks_sha = load_request(request, checkpoints, mask_db, settings)
    rows, errors = run_in_turn(
        lambda case: generate_case(models, request, case, masks, settings, out_root, 0, progress, masks_sha),
        cases, case_id=lambda c: c.case_id, errors=CASE_ERRORS, failed=lambda case, exc: fail_case(request, case, exc, out_root),
        desc=f"generate {request.name}", progress=progress,
    )  # fmt: skip
    write_table(rows, table, STEP, GENERATED_COLUMNS)
    raise_first(errors, settings.on_error, f"request {request.name}")
    return rows


def fail_case(request: GenerationRequest, case: GenCase, exc: Exception, out_root: str | os.PathLike) -> dict[str, Any]:
    """Remove what a case that could not be generated left under ``out_root``; its table row (``failed``, with the reason)."""
    discard_case(case_paths(out_root, request.name, case.case_id))
    return {"request": request.name, "case_id": case.case_id, "index": case.index, "status": "failed", "reason": str(exc)}
