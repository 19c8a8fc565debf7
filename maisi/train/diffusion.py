"""Latent diffusion UNet training (MAISI's second stage).

The UNet learns to denoise the autoencoder's latents, conditioned on the voxel spacing (mm) and the
top/bottom body-region one-hots (both x100, as MAISI feeds them). Every step draws fresh latents
``z = mu + sigma * eps`` from the cached posteriors (``.npz`` files), crops them (or takes whole
latents), scales them by the data's scale factor, adds noise with MONAI's RFlow (velocity target
``z - noise``) or DDPM (noise target) scheduler and minimises the L1 loss with Adam and a
polynomial learning-rate decay.

All random draws of step ``k`` come from ``step_generator(seed, stage, k)`` (RFlow's timestep
sampler, which uses torch's global generator, runs under a forked, re-seeded global generator), so
the same settings give the same weights and a resumed run continues exactly where it stopped.

The output is laid out like NVIDIA's released diffusion checkpoint, so
:func:`maisi.models.checkpoints.load_diffusion` reads both.

Fine-tuning: with ``init_from`` the UNet starts from a parent checkpoint (the factory's or NVIDIA's
layout) and keeps the parent's scale factor (the latents it learnt on were scaled by it), unless
``recompute_scale_factor`` asks for the data's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import pandas as pd
import torch

from maisi.core.io import sha256_file
from maisi.models.checkpoints import CheckpointError, load_parent
from maisi.models.networks import build_diffusion_unet, build_scheduler
from maisi.models.variants import variant
from maisi.train.batches import Batch, LatentCase, check_patch, conditions, l1_loss, noise_inputs, read_cases, sample_batch
from maisi.train.distributed import data_parallel, rank_device
from maisi.train.loop import (
    ResumeState,
    TrainLoop,
    cpu_state,
    files_fingerprint,
    fingerprint,
    loss_metrics,
    plot_losses,
    save_checkpoint,
    seed_everything,
    small_data_warning,
    step_generator,
)
from maisi.train.settings import DiffusionSettings
from maisi.train.validation import Validation, split_cases

__all__ = ["train_diffusion", "scale_factor_of", "parent_scale_factor"]

log = logging.getLogger(__name__)


STAGE = "train_diffusion"


#: How many cases (sorted by case id) the scale factor is computed from (MAISI: the first batch).
SCALE_FACTOR_CASES = 8


def scale_factor_of(cases: Sequence[LatentCase], seed: int, stage: str = STAGE) -> torch.Tensor:
    """MAISI's scale factor ``1 / std(z)`` of sampled latents ``z = mu + sigma * eps`` (whole latents of
    the first :data:`SCALE_FACTOR_CASES` cases by case id, eps from the step-0 generator), float32."""
    gen = step_generator(seed, stage, 0)
    chosen = sorted(cases, key=lambda c: c.case_id)[:SCALE_FACTOR_CASES]
    z = [(c.mu + c.sigma * torch.randn(c.mu.shape, generator=gen)).reshape(-1) for c in chosen]
    std = torch.cat(z).std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError("the sampled latents have zero or non-finite spread; cannot compute the scale factor")
    return (1.0 / std).to(torch.float32)


def parent_scale_factor(parent: Mapping[str, Any], path: str | os.PathLike, key: str = f"{STAGE}.init_from") -> torch.Tensor:
    """The scale factor a parent diffusion checkpoint records (its entries besides the weights), float32; a
    :class:`~maisi.models.checkpoints.CheckpointError` naming the file and the config ``key`` when it has none."""
    if "scale_factor" not in parent:
        raise CheckpointError(f"config key {key!r}: {path}: the diffusion checkpoint has no 'scale_factor'; "
                              f"set {STAGE}.recompute_scale_factor: true to compute it from the training latents")  # fmt: skip
    scale = torch.as_tensor(parent["scale_factor"], dtype=torch.float32).reshape(-1)[0].clone()
    if not torch.isfinite(scale) or scale <= 0:
        raise CheckpointError(
            f"config key {key!r}: {path}: the diffusion checkpoint's scale factor {float(scale)} is not a positive number"
        )
    return scale


def _check_parent(parent: Mapping[str, Any], settings: DiffusionSettings) -> None:
    """Warn when the parent recorded another scheduler or number of timesteps than this run trains with."""
    recorded = {"scheduler": parent.get("scheduler"), "num_train_timesteps": parent.get("num_train_timesteps")}
    ours = {"scheduler": settings.kind, "num_train_timesteps": settings.num_train_timesteps}
    for name, value in recorded.items():
        if value is not None and str(value if name == "scheduler" else int(value)) != str(ours[name]):
            log.warning("%s: the parent checkpoint %s was trained with %s %s; this run trains with %s", STAGE,
                        settings.init_from, name, value, ours[name])  # fmt: skip


@data_parallel  # settings.processes > 1: that many processes (DistributedDataParallel)
def train_diffusion(
    records: pd.DataFrame | Iterable[Mapping[str, Any]],
    settings: DiffusionSettings,
    checkpoint: str | os.PathLike,
    curve_png: str | os.PathLike,
    resume_path: str | os.PathLike,
) -> dict[str, Any]:
    """Train the latent diffusion UNet on cached latents (from ``settings.init_from`` when set); write the checkpoint
    (+ JSON sidecar) and the loss curve. Returns the sidecar's metadata plus the loss history."""
    cases, held_out = split_cases(read_cases(records), settings)  # held_out: model.validation_fold's cases, or none
    divisor = check_patch(settings, cases)
    data_fp = files_fingerprint([c.path for c in cases + held_out])
    parent_sha = sha256_file(settings.init_from) if settings.init_from is not None else None
    device = rank_device(settings.device)  # with several processes, cuda:<rank> (or the CPU)
    resume = ResumeState(resume_path, fingerprint({"stage": STAGE, "settings": settings.run_fingerprint(), "data": data_fp,
                                                   "parent": parent_sha}))  # fmt: skip

    seed_everything(settings.seed)
    var = variant(settings.variant)
    unet = build_diffusion_unet(var)
    keep_scale = settings.init_from is not None and not settings.recompute_scale_factor
    parent_scale = None
    if settings.init_from is not None:
        parent = load_parent(unet, settings.init_from, "diffusion UNet", settings.variant, key=f"{STAGE}.init_from")
        _check_parent(parent, settings)
        parent_scale = parent_scale_factor(parent, settings.init_from) if keep_scale else None
    unet = unet.to(device)
    scheduler = build_scheduler(settings.scheduler_spec())
    loop = TrainLoop(STAGE, unet, settings, device, resume)
    if "scale_factor" in loop.extra:
        scale = torch.as_tensor(loop.extra["scale_factor"], dtype=torch.float32)
    elif parent_scale is not None:
        scale = parent_scale
    else:
        scale = scale_factor_of(cases, settings.seed)
    log.info("%s: %d cases, variant %s, %s scheduler, device %s, scale factor %.5f (%s), steps %d (from %d), from %s", STAGE,
             len(cases), settings.variant, settings.kind, device, float(scale), "the parent's" if keep_scale else "the latents'",
             settings.steps, loop.start, settings.init_from or "random weights")  # fmt: skip

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        batch = sample_batch(cases, gen, settings.batch_size, settings.latent_patch, divisor, scale)  # the global batch
        noisy, timesteps, target = noise_inputs(scheduler, settings.kind, batch.z, gen, device, batch.whole, part=loop.part)
        prediction = loop.net(x=noisy, timesteps=timesteps, **conditions(batch.select(loop.part), device, var))
        return l1_loss(prediction, target)

    def validation_loss(batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l1_loss(unet(x=noisy, timesteps=timesteps, **conditions(batch, device, var)), target)  # rank 0, no gradients

    validation = None  # the held-out cases' loss every model.validation_every steps
    if held_out:
        validation = Validation(STAGE, held_out, settings, divisor, scale, scheduler, settings.kind, validation_loss, device)
    history = loop.run(loss_fn, extra={"scale_factor": scale}, validate=validation)
    metrics = {**loss_metrics(history), **loop.validation_metrics()}
    meta = {
        "stage": STAGE, "settings": asdict(settings), "scheduler": settings.kind, "data_fingerprint": data_fp, "metrics": metrics,
        "scale_factor": float(scale), "scale_factor_from": "init_from" if keep_scale else "latents",
        "init_from": settings.init_from, "init_from_sha256": parent_sha, "cases": [c.case_id for c in cases], "resumed_from": loop.start,
        "device": str(device), "train_seconds": round(resume.elapsed_s(), 1),
        "small_data_warning": small_data_warning(STAGE, len(cases), settings.min_cases),
    }  # fmt: skip
    if validation is not None:
        meta["validation"] = validation.record(loop.validation)
    payload = {
        "unet_state_dict": cpu_state(unet), "scale_factor": scale.clone(), "num_train_timesteps": int(settings.num_train_timesteps),
        "scheduler": settings.kind, "variant": settings.variant, "steps": int(settings.steps),
    }  # fmt: skip
    save_checkpoint(checkpoint, payload, meta, STAGE)
    plot_losses({"L1": history}, curve_png, f"diffusion UNet ({settings.kind}, {settings.variant})",
                validation={"L1, held-out cases": loop.validation})  # fmt: skip
    resume.clear()
    return {**meta, "history": history}
