"""ControlNet training (MAISI's third stage) on the frozen latent diffusion UNet.

The ControlNet is initialised from the UNet (MAISI's way) and learns to steer it with the case's
label map, given as 8 bit-channels at image resolution (4x the latent size per axis). The UNet is
frozen; only the ControlNet is optimised. The L1 loss weighs latent voxels whose 4x4x4 label block
holds a tumour label ``tumour_weight`` times (MAISI: 100). Sampling, noising, the loop, resume
states and checkpoints are those of :mod:`maisi.train.diffusion`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from maisi.core.io import sha256_file
from maisi.models.checkpoints import diffusion_scheduler, load_diffusion
from maisi.models.networks import build_controlnet, build_scheduler, label_to_bits, select_device
from maisi.models.variants import DOWNSAMPLE, scheduler_spec, variant
from maisi.train.batches import Batch, LatentCase, check_patch, conditions, l1_loss, noise_inputs, read_cases, sample_batch
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
)
from maisi.train.settings import ControlNetSettings

__all__ = ["train_controlnet", "LabelCache", "tumour_weights"]

log = logging.getLogger(__name__)


STAGE = "train_controlnet"


class LabelCache:
    """The cases' uint8 label maps (loaded once, on first use); shapes are checked up front from the headers.

    A label map must cover ``4 x`` the latent size per axis; one up to 3 voxels short per axis
    (an image size that is not a multiple of 4) is zero-padded at the far end.
    """

    def __init__(self, cases: Sequence[LatentCase]):
        self._arrays: dict[str, np.ndarray] = {}
        self._cases = {c.case_id: c for c in cases}
        for case in cases:
            path = case.label
            if path is None or not Path(path).is_file():
                raise ValueError(f"case {case.case_id}: label map {path} not found")
            try:
                shape = tuple(int(n) for n in nib.load(str(path)).shape)
            except Exception as exc:  # noqa: BLE001 - any read failure is a bad label file
                raise ValueError(f"case {case.case_id}: {path}: not a readable NIfTI label map ({exc})") from None
            want = tuple(DOWNSAMPLE * n for n in case.shape)
            if len(shape) != 3 or any(not w - DOWNSAMPLE < s <= w for s, w in zip(shape, want, strict=True)):
                raise ValueError(
                    f"case {case.case_id}: label map {path} has shape {shape}; expected {want} "
                    f"({DOWNSAMPLE}x the latent size {case.shape} of {case.path.name})"
                )

    def get(self, case: LatentCase) -> np.ndarray:
        """The case's label map as uint8, padded to 4x its latent size."""
        if case.case_id not in self._arrays:
            path = case.label
            data = np.asanyarray(nib.load(str(path)).dataobj)
            if data.min() < 0 or data.max() > 255 or (data.dtype.kind == "f" and not np.array_equal(data, np.round(data))):
                raise ValueError(f"case {case.case_id}: {path} is not a label map of integer ids 0-255")
            want = [DOWNSAMPLE * n for n in case.shape]
            data = np.pad(data.astype(np.uint8), [(0, w - s) for s, w in zip(data.shape, want, strict=True)])
            self._arrays[case.case_id] = data
        return self._arrays[case.case_id]

    def crops(self, batch: Batch) -> torch.Tensor:
        """The label crops (B, 1, 4x, 4y, 4z) matching a batch's latent crops (zero-padded alike)."""
        out = []
        size = [DOWNSAMPLE * n for n in batch.shape]
        for case, start in zip(batch.cases, batch.starts, strict=True):
            label = self.get(case)
            sl = tuple(slice(DOWNSAMPLE * s, DOWNSAMPLE * s + n) for s, n in zip(start, size, strict=True))
            crop = label[sl]
            crop = np.pad(crop, [(0, n - c) for c, n in zip(crop.shape, size, strict=True)])
            out.append(torch.from_numpy(np.ascontiguousarray(crop)))
        return torch.stack(out)[:, None]


def tumour_weights(labels: torch.Tensor, tumour_labels: Sequence[int], weight: float) -> torch.Tensor | None:
    """Per-latent-voxel loss weights (B, 1, x, y, z): ``weight`` where the 4x4x4 label block holds a
    tumour label, else 1. ``None`` when the weight is 1 (a plain mean)."""
    if weight == 1.0:
        return None
    ids = torch.as_tensor(list(tumour_labels), dtype=labels.dtype, device=labels.device)
    hit = F.max_pool3d(torch.isin(labels, ids).float(), kernel_size=DOWNSAMPLE, stride=DOWNSAMPLE)
    return 1.0 + (float(weight) - 1.0) * hit


def train_controlnet(
    records: pd.DataFrame | Iterable[Mapping[str, Any]],
    diffusion_checkpoint: str | os.PathLike,
    settings: ControlNetSettings,
    checkpoint: str | os.PathLike,
    curve_png: str | os.PathLike,
    resume_path: str | os.PathLike,
) -> dict[str, Any]:
    """Train the ControlNet on the frozen UNet of ``diffusion_checkpoint``; write the checkpoint
    (+ JSON sidecar) and the loss curve. Returns the sidecar's metadata plus the loss history."""
    cases = read_cases(records, need_label=True)
    labels = LabelCache(cases)
    divisor = check_patch(settings, cases)
    data_fp = files_fingerprint([c.path for c in cases] + [c.label for c in cases if c.label is not None])
    diffusion_sha = sha256_file(diffusion_checkpoint)
    device = select_device(settings.device)
    resume = ResumeState(resume_path, fingerprint({
        "stage": STAGE, "settings": settings.run_fingerprint(), "data": data_fp, "diffusion": diffusion_sha,
    }))  # fmt: skip

    unet, scale, num_train_timesteps = load_diffusion(diffusion_checkpoint, settings.variant)
    kind = diffusion_scheduler(diffusion_checkpoint, settings.kind)
    var = variant(settings.variant)
    unet = unet.to(device).eval().requires_grad_(False)
    seed_everything(settings.seed)
    controlnet = build_controlnet(settings.variant, unet).to(device)
    scheduler = build_scheduler(scheduler_spec(var, kind, num_train_timesteps))
    scale_t = torch.tensor(scale, dtype=torch.float32)
    loop = TrainLoop(STAGE, controlnet, settings, device, resume)
    log.info("%s: %d cases, variant %s, %s scheduler (%d timesteps), scale factor %.5f, device %s, steps %d (from %d)", STAGE,
             len(cases), settings.variant, kind, num_train_timesteps, scale, device, settings.steps, loop.start)  # fmt: skip

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        batch = sample_batch(cases, gen, settings.batch_size, settings.latent_patch, divisor, scale_t)
        noisy, timesteps, target = noise_inputs(scheduler, kind, batch.z, gen, device, batch.whole)
        label = labels.crops(batch).to(device)
        inputs = conditions(batch, device, var)
        down, mid = controlnet(x=noisy, timesteps=timesteps, controlnet_cond=label_to_bits(label), class_labels=inputs.get("class_labels"))
        prediction = unet(x=noisy, timesteps=timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid, **inputs)
        return l1_loss(prediction, target, tumour_weights(label, settings.tumour_labels, settings.tumour_weight))

    history = loop.run(loss_fn)
    metrics = loss_metrics(history)
    meta = {
        "stage": STAGE, "settings": asdict(settings), "data_fingerprint": data_fp, "diffusion_checkpoint": str(diffusion_checkpoint),
        "diffusion_sha256": diffusion_sha, "scheduler": kind, "scale_factor": float(scale), "metrics": metrics,
        "cases": [c.case_id for c in cases], "resumed_from": loop.start, "device": str(device),
        "small_data_warning": small_data_warning(STAGE, len(cases), settings.min_cases),
    }  # fmt: skip
    payload = {"controlnet_state_dict": cpu_state(controlnet), "variant": settings.variant, "steps": int(settings.steps)}
    save_checkpoint(checkpoint, payload, meta, STAGE)
    plot_losses({"weighted L1": history}, curve_png, f"ControlNet ({kind}, {settings.variant})")
    resume.clear()
    return {**meta, "history": history}
