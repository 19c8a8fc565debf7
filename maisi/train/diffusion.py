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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import pandas as pd
import torch

from maisi.models.networks import build_diffusion_unet, build_scheduler, select_device
from maisi.models.variants import variant
from maisi.train.batches import LatentCase, check_patch, conditions, l1_loss, noise_inputs, read_cases, sample_batch
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

__all__ = ["train_diffusion", "scale_factor_of"]

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


def train_diffusion(
    records: pd.DataFrame | Iterable[Mapping[str, Any]],
    settings: DiffusionSettings,
    checkpoint: str | os.PathLike,
    curve_png: str | os.PathLike,
    resume_path: str | os.PathLike,
) -> dict[str, Any]:
    """Train the latent diffusion UNet on cached latents; write the checkpoint (+ JSON sidecar) and the
    loss curve. Returns the sidecar's metadata plus the loss history."""
    cases = read_cases(records)
    divisor = check_patch(settings, cases)
    data_fp = files_fingerprint([c.path for c in cases])
    device = select_device(settings.device)
    resume = ResumeState(resume_path, fingerprint({"stage": STAGE, "settings": settings.run_fingerprint(), "data": data_fp}))

    seed_everything(settings.seed)
    var = variant(settings.variant)
    unet = build_diffusion_unet(var).to(device)
    scheduler = build_scheduler(settings.scheduler_spec())
    loop = TrainLoop(STAGE, unet, settings, device, resume)
    if "scale_factor" in loop.extra:
        scale = torch.as_tensor(loop.extra["scale_factor"], dtype=torch.float32)
    else:
        scale = scale_factor_of(cases, settings.seed)
    log.info("%s: %d cases, variant %s, %s scheduler, device %s, scale factor %.5f, steps %d (from %d)", STAGE, len(cases),
             settings.variant, settings.kind, device, float(scale), settings.steps, loop.start)  # fmt: skip

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        batch = sample_batch(cases, gen, settings.batch_size, settings.latent_patch, divisor, scale)
        noisy, timesteps, target = noise_inputs(scheduler, settings.kind, batch.z, gen, device, batch.whole)
        prediction = unet(x=noisy, timesteps=timesteps, **conditions(batch, device, var))
        return l1_loss(prediction, target)

    history = loop.run(loss_fn, extra={"scale_factor": scale})
    metrics = loss_metrics(history)
    meta = {
        "stage": STAGE, "settings": asdict(settings), "scheduler": settings.kind, "data_fingerprint": data_fp, "metrics": metrics,
        "scale_factor": float(scale), "cases": [c.case_id for c in cases], "resumed_from": loop.start, "device": str(device),
        "small_data_warning": small_data_warning(STAGE, len(cases), settings.min_cases),
    }  # fmt: skip
    payload = {
        "unet_state_dict": cpu_state(unet), "scale_factor": scale.clone(), "num_train_timesteps": int(settings.num_train_timesteps),
        "scheduler": settings.kind, "variant": settings.variant, "steps": int(settings.steps),
    }  # fmt: skip
    save_checkpoint(checkpoint, payload, meta, STAGE)
    plot_losses({"L1": history}, curve_png, f"diffusion UNet ({settings.kind}, {settings.variant})")
    resume.clear()
    return {**meta, "history": history}
